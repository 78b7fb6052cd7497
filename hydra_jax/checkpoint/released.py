"""Import the released PyTorch draft-head checkpoints (zankner/Hydra, FasterDecoding/Medusa).

Hydra:  hydra_lm_head.pt (torch state_dict of the head module) + config.json with
        hydra_num_heads, hydra_num_layers, hydra_head_arch ("mlp" | "prefix-mlp"), grounded_heads.
Medusa: medusa_lm_head.safetensors (or .pt) + config.json with medusa_num_heads, medusa_num_layers.

Key layouts (reference doc section 2), head i, L layers, torch Linear weights [out, in]:
  hydra "mlp":        hydra_mlp.{i}.0.{linear,res_connection}.{weight,bias}   first block
                      hydra_mlp.{i}.{1..L-1}.linear.{weight,bias}             the shared inner block
                      hydra_lm_head.{i}.{weight,bias}
  hydra "prefix-mlp": Sequential(Dropout, First, Dropout, Inner, ...): first block at .1, inner at
                      .3, .5, ...; hydra_lm_head.{i}.1.{weight,bias}; prefix_embeding_layer.layers.0.*
                      and prefix_embeding_layer.norm.weight (one Llama decoder layer + norm).
  medusa:             {i}.{j}.linear.{weight,bias} for j < L (one shared ResBlock), {i}.{L}.weight.

The public loaders use strict=False, which hides mismatches; this one raises on an unmapped key,
a missing key or a wrong shape, naming the key and the file. A shared block is stored once per
use: the copies are checked equal and loaded once (shared_inner=True), or untied if they differ.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from hydra_jax.checkpoint.hf import (CheckpointError, _iter_tensors, _match, expected_hf_keys,
                                     fused_param_shape)
from hydra_jax.model.config import ModelConfig, UnsupportedModelError, from_hf_config
from hydra_jax.model.heads import HeadsConfig, HeadsMismatchError

HYDRA_FILE = "hydra_lm_head.pt"
MEDUSA_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
CONFIG_FILE = "config.json"

# Buffers and copies the released files carry that hold no head weights.
_HYDRA_IGNORED = [re.compile(p) for p in (
    r"input_embed_fn\.weight",  # a copy of the base embedding E
    r"prefix_embeding_layer\.embed_tokens\.weight",  # unused: the prefix layer reads hidden states
    r"prefix_embeding_layer\.layers\.0\.self_attn\.rotary_emb\.inv_freq",  # a RoPE buffer
)]


def detect_released(directory: str) -> Optional[str]:
  """'hydra', 'medusa' or None, from the weight file names alone."""
  if os.path.isfile(os.path.join(directory, HYDRA_FILE)):
    return "hydra"
  if any(os.path.isfile(os.path.join(directory, f)) for f in MEDUSA_FILES):
    return "medusa"
  return None


def read_state_dict(fname: str) -> Dict[str, np.ndarray]:
  """A torch .pt state_dict or a .safetensors file as {key: f32 numpy array}."""
  if fname.endswith(".safetensors"):
    return {key: np.asarray(t, dtype=np.float32)
            for _, key, t in _iter_tensors({fname: []})}
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"reading {fname} needs PyTorch (`pip install torch`), which is not "
                          f"installed; or convert it to safetensors") from e
  try:
    state = torch.load(fname, map_location="cpu", weights_only=True)
  except Exception as e:  # truncated, not a torch file, pickled code, ...
    raise CheckpointError(f"cannot read {fname}: {type(e).__name__}: {e} (the file is corrupt "
                          f"or not a torch state_dict)") from e
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise CheckpointError(f"{fname} does not hold a state_dict (a dict of tensors)")
  return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in state.items()}


def _read_config(directory: str, weights: str) -> dict:
  cfg_file = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"{cfg_file} is missing: a released checkpoint needs config.json "
                          f"next to {weights}")
  try:
    with open(cfg_file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e


def _require(conf: dict, keys, cfg_file: str):
  missing = [k for k in keys if k not in conf]
  if missing:
    raise CheckpointError(f"{cfg_file} lacks {', '.join(missing)}, which a released "
                          f"checkpoint's config.json must give")


class _Table:
  """Expected tensors: key -> (param path, torch shape, torch->ours transform, slot).

  slot: None, or the index of the tensor's part inside a fused param whose full shape is
  `fused[path]` (Hydra's first block keeps W and W_res in one kernel [in, 2, D]).
  """

  def __init__(self):
    self.rules: Dict[str, Tuple[str, tuple, Callable, Any]] = {}
    self.fused: Dict[str, tuple] = {}

  def linear(self, key: str, path: str, d_in: int, d_out: int, bias: bool = True):
    self.rules[key + ".weight"] = (path + "/kernel", (d_out, d_in), lambda w: w.T, None)
    if bias:
      self.rules[key + ".bias"] = (path + "/bias", (d_out,), lambda b: b, None)

  def first_block(self, key: str, path: str, d_in: int, d_out: int):
    """Hydra's first block: `key`.linear -> [.., 0, :], `key`.res_connection -> [.., 1, :]."""
    self.fused[path + "/kernel"] = (d_in, 2, d_out)
    self.fused[path + "/bias"] = (2, d_out)
    for j, part in enumerate(("linear", "res_connection")):
      self.rules[f"{key}.{part}.weight"] = (path + "/kernel", (d_out, d_in), lambda w: w.T,
                                            np.s_[:, j])
      self.rules[f"{key}.{part}.bias"] = (path + "/bias", (d_out,), lambda b: b, np.s_[j])


def _set(tree: dict, path: str, value):
  parts = path.split("/")
  for p in parts[:-1]:
    tree = tree.setdefault(p, {})
  tree[parts[-1]] = value


def _check_sizes(hidden: int, vocab: int, base_cfg: Optional[ModelConfig], fname: str):
  if base_cfg is None:
    return
  HeadsConfig(arch="hydra", hidden_size=hidden, vocab_size=vocab).check_compatible(base_cfg)


def _build(state: Dict[str, np.ndarray], fname: str, table: _Table, ignored,
           inner_groups: List[List[str]], param_dtype) -> Tuple[dict, bool]:
  """Strict key/shape checks, the shared-block decision, and the params tree.

  inner_groups: per head, the key prefixes of its inner-block copies (shared in the source code).
  """
  for key, value in state.items():
    if any(p.fullmatch(key) for p in ignored):
      continue
    if key not in table.rules:
      raise CheckpointError(f"unexpected tensor {key} in {fname}: no parameter of these heads "
                            f"maps to it (wrong head count, layer count or head arch in "
                            f"config.json?)")
    _, shape, _, _ = table.rules[key]
    if tuple(value.shape) != shape:
      raise CheckpointError(f"tensor {key} in {fname} has shape {tuple(value.shape)}, but "
                            f"config.json and the LM head imply {shape}")
  missing = [k for k in table.rules if k not in state]
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise CheckpointError(f"missing tensor(s) in {fname}: {', '.join(missing[:5])}{more}")

  # The released code multiplies one module into a list, so every copy is the same tensor.
  shared = all(
      np.array_equal(state[f"{group[0]}.linear.{p}"], state[f"{other}.linear.{p}"])
      for group in inner_groups for other in group[1:] for p in ("weight", "bias"))
  params: dict = {}
  fused = {path: np.zeros(shape, np.float32) for path, shape in table.fused.items()}
  for key, (path, _, to_ours, slot) in table.rules.items():
    m = re.fullmatch(r"(heads_\d+)/inner_(\d+)/(.*)", path)
    if m and shared:
      if m.group(2) != "0":
        continue  # loaded once, from the first copy
      path = f"{m.group(1)}/inner/{m.group(3)}"
    value = np.asarray(to_ours(np.asarray(state[key], np.float32)))
    if slot is None:
      _set(params, path, jnp.asarray(value, dtype=param_dtype))
    else:
      fused[path][slot] = value  # every part is present: nothing is missing
  for path, value in fused.items():
    _set(params, path, jnp.asarray(value, dtype=param_dtype))
  return params, shared


def _prefix_rules(table: _Table, base_cfg: ModelConfig):
  """The Hydra++ prefix layer: a 1-layer Llama model's layers.0 and norm, HF key conventions
  (the HF table's layout, fused q/k/v and gate/up included)."""
  one = base_cfg.replace(num_layers=1)
  for hf_key in expected_hf_keys(one):
    if not (hf_key.startswith("model.layers.0.") or hf_key == "model.norm.weight"):
      continue
    target, slot, to_ours, _, shape = _match(hf_key)
    if slot(one) is not None:
      table.fused.setdefault(_prefix_path(target), fused_param_shape(target, one))
    table.rules["prefix_embeding_layer." + hf_key[len("model."):]] = (
        _prefix_path(target), tuple(shape(one)), lambda w, f=to_ours, c=one: f(w, c), slot(one))


def _prefix_path(target: str) -> str:
  return ("prefix_norm/scale" if target == "norm/scale"
          else "prefix_layer/" + target[len("layers_0/"):])


def load_released_hydra(directory: str, base_cfg: Optional[ModelConfig] = None,
                        param_dtype=jnp.float32) -> Tuple[HeadsConfig, dict]:
  fname = os.path.join(directory, HYDRA_FILE)
  conf = _read_config(directory, HYDRA_FILE)
  cfg_file = os.path.join(directory, CONFIG_FILE)
  _require(conf, ("hydra_num_heads", "hydra_num_layers", "hydra_head_arch"), cfg_file)
  if not conf.get("grounded_heads", True):
    raise UnsupportedModelError(
        f"{cfg_file}: grounded_heads=false (heads that do not read the path tokens) is not "
        f"supported; use grounded Hydra heads, or Medusa heads for the ungrounded case")
  head_arch = conf["hydra_head_arch"]
  if head_arch not in ("mlp", "prefix-mlp"):
    raise UnsupportedModelError(f"{cfg_file}: hydra_head_arch {head_arch!r} is not supported "
                                f"(supported: 'mlp' = Hydra, 'prefix-mlp' = Hydra++)")
  num_heads, num_layers = int(conf["hydra_num_heads"]), int(conf["hydra_num_layers"])
  prefix = head_arch == "prefix-mlp"
  state = read_state_dict(fname)

  lm0 = "hydra_lm_head.0.1.weight" if prefix else "hydra_lm_head.0.weight"
  if lm0 not in state:
    raise CheckpointError(f"missing tensor {lm0} in {fname} (hydra_head_arch is {head_arch!r})")
  vocab, hidden = state[lm0].shape
  _check_sizes(hidden, vocab, base_cfg, fname)
  if prefix and base_cfg is None:
    try:
      base_cfg = from_hf_config(conf, where=cfg_file)
    except UnsupportedModelError as e:
      raise CheckpointError(
          f"{fname} holds a Hydra++ prefix layer, whose shapes (attention heads, head dim, mlp "
          f"width) come from the base model: pass the base model config ({e})") from e

  table = _Table()
  first, step = (1, 2) if prefix else (0, 1)
  inner_groups = []
  for i in range(num_heads):
    base = f"hydra_mlp.{i}"
    table.first_block(f"{base}.{first}", f"heads_{i}/first", (i + 2) * hidden, hidden)
    group = []
    for j in range(num_layers - 1):
      idx = first + step * (j + 1)
      table.linear(f"{base}.{idx}.linear", f"heads_{i}/inner_{j}/linear", hidden, hidden)
      group.append(f"{base}.{idx}")
    if len(group) > 1:
      inner_groups.append(group)
    table.linear(f"hydra_lm_head.{i}.1" if prefix else f"hydra_lm_head.{i}",
                 f"heads_{i}/lm_head", hidden, vocab)
  if prefix:
    _prefix_rules(table, base_cfg)
  params, shared = _build(state, fname, table, _HYDRA_IGNORED, inner_groups, param_dtype)
  cfg = HeadsConfig(arch="hydra++" if prefix else "hydra", hidden_size=hidden, vocab_size=vocab,
                    num_heads=num_heads, num_layers=num_layers, shared_inner=shared,
                    base_fingerprint=base_cfg.fingerprint() if base_cfg is not None else "")
  return cfg, params


def load_released_medusa(directory: str, base_cfg: Optional[ModelConfig] = None,
                         param_dtype=jnp.float32) -> Tuple[HeadsConfig, dict]:
  fname = next(os.path.join(directory, f) for f in MEDUSA_FILES
               if os.path.isfile(os.path.join(directory, f)))
  conf = _read_config(directory, os.path.basename(fname))
  cfg_file = os.path.join(directory, CONFIG_FILE)
  _require(conf, ("medusa_num_heads", "medusa_num_layers"), cfg_file)
  num_heads, num_layers = int(conf["medusa_num_heads"]), int(conf["medusa_num_layers"])
  state = read_state_dict(fname)
  lm0 = f"0.{num_layers}.weight"
  if lm0 not in state:
    raise CheckpointError(f"missing tensor {lm0} in {fname} (config.json says "
                          f"medusa_num_layers={num_layers})")
  vocab, hidden = state[lm0].shape
  _check_sizes(hidden, vocab, base_cfg, fname)
  table = _Table()
  inner_groups = []
  for i in range(num_heads):
    group = []
    for j in range(num_layers):
      table.linear(f"{i}.{j}.linear", f"heads_{i}/inner_{j}/linear", hidden, hidden)
      group.append(f"{i}.{j}")
    if len(group) > 1:
      inner_groups.append(group)
    table.linear(f"{i}.{num_layers}", f"heads_{i}/lm_head", hidden, vocab, bias=False)
  params, shared = _build(state, fname, table, [], inner_groups, param_dtype)
  cfg = HeadsConfig(arch="medusa", hidden_size=hidden, vocab_size=vocab, num_heads=num_heads,
                    num_layers=num_layers, shared_inner=shared,
                    base_fingerprint=base_cfg.fingerprint() if base_cfg is not None else "")
  return cfg, params


def load_released(directory: str, base_cfg: Optional[ModelConfig] = None,
                  param_dtype=jnp.float32) -> Tuple[HeadsConfig, dict]:
  """(HeadsConfig, params) from a released Hydra or Medusa directory."""
  kind = detect_released(directory)
  if kind == "hydra":
    return load_released_hydra(directory, base_cfg, param_dtype)
  if kind == "medusa":
    return load_released_medusa(directory, base_cfg, param_dtype)
  raise CheckpointError(f"{directory} holds neither {HYDRA_FILE} nor "
                        f"{' / '.join(MEDUSA_FILES)}")


__all__ = ["load_released", "load_released_hydra", "load_released_medusa", "detect_released",
           "read_state_dict", "HeadsMismatchError"]
