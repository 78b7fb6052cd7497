"""Hugging Face checkpoints: load a model directory into our params, and export back.

One ordered table maps every HF tensor name to a param path, a layout transform and the
shape it must have. Loading is strict: an unmapped key, a missing key, a duplicate or a
shape mismatch raises `CheckpointError` naming the key and the file. Tensors are streamed
one at a time from (possibly sharded) safetensors files, in fp32, fp16 or bf16.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from hydra_jax.model.config import ModelConfig, UnsupportedModelError, from_hf_config, to_hf_config

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint that does not match what the model needs; the message names key and file."""


@dataclasses.dataclass
class HFModel:
  """A loaded base model: config, params pytree, tokenizer (or None) and where it came from."""
  config: ModelConfig
  params: Any
  tokenizer: Any
  path: str
  dtype: Any = jnp.float32


# --- the key table -------------------------------------------------------------------------
# Each rule: HF name regex -> (param path template, slot(cfg), to_ours(np, cfg), to_hf(np, cfg),
# shape(cfg)). Torch Linear weights are [out, in]; ours put the contraction dim first.
#
# Some of our params fuse several HF tensors that read the same input (one matmul instead of
# two or three, which small-T decoding on CPUs pays for per op): q/k/v live in one
# qkv_proj [D, K, G + 2, H] (per kv head: its G query heads, then k, then v, so that sharding
# the kv-head axis keeps each group on one device) and gate/up in one gate_up_proj [D, 2, F].
# `slot` is the index of the HF tensor's part inside the fused param (None: the whole param).


def _group(c):
  return c.num_heads // c.num_kv_heads


def _qkv_kernel(part):
  """q (part "q"), k or v weight <-> its slot of qkv_proj/kernel [D, K, G + 2, H]."""
  def slot(c):
    g = _group(c)
    return np.s_[:, :, :g] if part == "q" else np.s_[:, :, g + (part == "v")]

  def to_ours(w, c):
    heads = (_group(c),) if part == "q" else ()
    return w.T.reshape((c.hidden_size, c.num_kv_heads) + heads + (c.head_dim,))

  def to_hf(w, c):
    return w.reshape(c.hidden_size, -1).T

  def shape(c):
    heads = c.num_heads if part == "q" else c.num_kv_heads
    return (heads * c.head_dim, c.hidden_size)
  return slot, to_ours, to_hf, shape


def _qkv_bias(part):
  def slot(c):
    g = _group(c)
    return np.s_[:, :g] if part == "q" else np.s_[:, g + (part == "v")]

  def to_ours(b, c):
    heads = (_group(c),) if part == "q" else ()
    return b.reshape((c.num_kv_heads,) + heads + (c.head_dim,))

  def shape(c):
    return ((c.num_heads if part == "q" else c.num_kv_heads) * c.head_dim,)
  return slot, to_ours, lambda b, c: b.reshape(-1), shape


_T = (lambda w, c: w.T, lambda w, c: w.T)
_ID = (lambda w, c: w, lambda w, c: w)
_WHOLE = lambda c: None
_LAYER = r"model\.layers\.(\d+)\."

_RULES: List[Tuple[str, str, Callable, Callable, Callable, Callable]] = [
    (r"model\.embed_tokens\.weight", "embed_tokens/embedding", _WHOLE, *_ID,
     lambda c: (c.vocab_size, c.hidden_size)),
    (r"model\.norm\.weight", "norm/scale", _WHOLE, *_ID, lambda c: (c.hidden_size,)),
    (r"lm_head\.weight", "lm_head/kernel", _WHOLE, *_T, lambda c: (c.vocab_size, c.hidden_size)),
    *[(_LAYER + rf"self_attn\.{x}_proj\.weight", "layers_{0}/self_attn/qkv_proj/kernel",
       *_qkv_kernel(x)) for x in "qkv"],
    *[(_LAYER + rf"self_attn\.{x}_proj\.bias", "layers_{0}/self_attn/qkv_proj/bias",
       *_qkv_bias(x)) for x in "qkv"],
    (_LAYER + r"self_attn\.o_proj\.weight", "layers_{0}/self_attn/o_proj/kernel", _WHOLE,
     lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
     lambda w, c: w.reshape(-1, c.hidden_size).T,
     lambda c: (c.hidden_size, c.num_heads * c.head_dim)),
    (_LAYER + r"mlp\.gate_proj\.weight", "layers_{0}/mlp/gate_up_proj/kernel",
     lambda c: np.s_[:, 0], *_T, lambda c: (c.intermediate_size, c.hidden_size)),
    (_LAYER + r"mlp\.up_proj\.weight", "layers_{0}/mlp/gate_up_proj/kernel",
     lambda c: np.s_[:, 1], *_T, lambda c: (c.intermediate_size, c.hidden_size)),
    (_LAYER + r"mlp\.down_proj\.weight", "layers_{0}/mlp/down_proj/kernel", _WHOLE, *_T,
     lambda c: (c.hidden_size, c.intermediate_size)),
    (_LAYER + r"input_layernorm\.weight", "layers_{0}/input_layernorm/scale", _WHOLE, *_ID,
     lambda c: (c.hidden_size,)),
    (_LAYER + r"post_attention_layernorm\.weight", "layers_{0}/post_attention_layernorm/scale",
     _WHOLE, *_ID, lambda c: (c.hidden_size,)),
]

# Full shapes of the fused params, by path suffix.
_FUSED_SHAPES: Dict[str, Callable[[ModelConfig], Tuple[int, ...]]] = {
    "qkv_proj/kernel": lambda c: (c.hidden_size, c.num_kv_heads, _group(c) + 2, c.head_dim),
    "qkv_proj/bias": lambda c: (c.num_kv_heads, _group(c) + 2, c.head_dim),
    "gate_up_proj/kernel": lambda c: (c.hidden_size, 2, c.intermediate_size),
}
# Buffers some exporters write that carry no weights.
_IGNORED = [re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")]


def expected_hf_keys(cfg: ModelConfig) -> List[str]:
  """Every tensor name a complete checkpoint for `cfg` must hold."""
  keys = ["model.embed_tokens.weight", "model.norm.weight"]
  if not cfg.tie_word_embeddings:
    keys.append("lm_head.weight")
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    keys += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
    if cfg.attention_bias:
      keys += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    keys += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
  return keys


def _match(key: str):
  """(param path, slot, to_ours, to_hf, shape) for an HF tensor name, or None."""
  for pattern, template, slot, to_ours, to_hf, shape in _RULES:
    m = re.fullmatch(pattern, key)
    if m:
      return template.format(*m.groups()), slot, to_ours, to_hf, shape
  return None


# --- reading -------------------------------------------------------------------------------


def read_hf_config(path: str) -> ModelConfig:
  if not os.path.isdir(path):
    raise CheckpointError(f"model directory {path!r} does not exist (pass --model DIR with a "
                          f"Hugging Face model directory: config.json + safetensors)")
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"{cfg_file} is missing: a Hugging Face model directory needs "
                          f"config.json next to its safetensors weights")
  try:
    with open(cfg_file) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
  return from_hf_config(hf, where=cfg_file)


def _weight_files(path: str) -> Dict[str, List[str]]:
  """Maps each safetensors file in the directory to the keys the index says it holds."""
  index_file = os.path.join(path, SAFETENSORS_INDEX)
  single = os.path.join(path, SAFETENSORS_FILE)
  if os.path.isfile(index_file):
    with open(index_file) as f:
      weight_map = json.load(f).get("weight_map", {})
    files: Dict[str, List[str]] = {}
    for key, fname in weight_map.items():
      files.setdefault(os.path.join(path, fname), []).append(key)
    for fname in files:
      if not os.path.isfile(fname):
        raise CheckpointError(f"{index_file} names shard {os.path.basename(fname)}, which is "
                              f"missing from {path}")
    return files
  if os.path.isfile(single):
    return {single: []}
  others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
  hint = (f" (found {', '.join(others)}: convert PyTorch .bin weights with "
          f"`model.save_pretrained(dir, safe_serialization=True)`)" if others else "")
  raise CheckpointError(f"no weights in {path}: expected {SAFETENSORS_FILE} or "
                        f"{SAFETENSORS_INDEX}{hint}")


def _iter_tensors(files: Dict[str, List[str]]) -> Iterator[Tuple[str, str, np.ndarray]]:
  """Yields (file, key, array) one tensor at a time, so a big checkpoint never sits in RAM twice."""
  from safetensors import safe_open
  for fname in files:
    try:
      handle = safe_open(fname, framework="numpy")
    except Exception as e:  # corrupt header, truncated file, ...
      raise CheckpointError(f"cannot read {fname}: {e} (the file is corrupt or not safetensors)")
    with handle as f:
      for key in f.keys():
        try:
          yield fname, key, f.get_tensor(key)
        except TypeError:
          # numpy has no bf16: read the raw bytes as ml_dtypes.bfloat16 through the pt-free path.
          yield fname, key, _read_bf16(fname, key)


def _read_bf16(fname: str, key: str) -> np.ndarray:
  with open(fname, "rb") as fh:
    n = int.from_bytes(fh.read(8), "little")
    header = json.loads(fh.read(n))
    info = header[key]
    start, end = info["data_offsets"]
    fh.seek(8 + n + start)
    raw = fh.read(end - start)
  if info["dtype"] != "BF16":
    raise CheckpointError(f"{fname}: tensor {key} has unsupported dtype {info['dtype']}")
  return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(info["shape"])


def _set(tree: dict, path: str, value):
  parts = path.split("/")
  for p in parts[:-1]:
    tree = tree.setdefault(p, {})
  tree[parts[-1]] = value


def load_params(path: str, cfg: ModelConfig, param_dtype=jnp.float32) -> dict:
  """Reads and checks every tensor; returns the params pytree (jax arrays of param_dtype)."""
  files = _weight_files(path)
  where = ", ".join(sorted(os.path.basename(f) for f in files))
  return params_from_hf_tensors(_iter_tensors(files), cfg, param_dtype, where)


def check_hf_tensor(fname: str, key: str, shape, cfg: ModelConfig, seen: Dict[str, str]):
  """The rule (as `_match`) for one tensor of a checkpoint, after the strict checks (see the
  module doc); None for a tensor that carries no weights. Records it in `seen`."""
  if any(p.fullmatch(key) for p in _IGNORED):
    return None
  if key in seen:
    raise CheckpointError(f"tensor {key} appears twice: in {seen[key]} and {fname}")
  seen[key] = fname
  rule = _match(key)
  if rule is None or (key == "lm_head.weight" and cfg.tie_word_embeddings):
    why = ("the config ties the embeddings, so no lm_head.weight is expected"
           if key == "lm_head.weight" else "no parameter of this model maps to it")
    raise CheckpointError(f"unexpected tensor {key} in {fname}: {why}")
  target, _, _, _, want = rule
  layer = re.match(r"layers_(\d+)/", target)
  if layer and int(layer.group(1)) >= cfg.num_layers:
    raise CheckpointError(f"unexpected tensor {key} in {fname}: config.json has only "
                          f"{cfg.num_layers} layers")
  if key.endswith("_proj.bias") and not cfg.attention_bias:
    raise CheckpointError(f"unexpected tensor {key} in {fname}: the config has no attention bias")
  if tuple(shape) != tuple(want(cfg)):
    raise CheckpointError(f"tensor {key} in {fname} has shape {tuple(shape)}, but "
                          f"config.json implies {tuple(want(cfg))}")
  return rule


def check_complete(seen: Dict[str, str], cfg: ModelConfig, where: str) -> None:
  """Raises naming the first missing tensors of a complete checkpoint for `cfg`."""
  missing = [k for k in expected_hf_keys(cfg) if k not in seen]
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise CheckpointError(f"missing tensor(s) in {where}: {', '.join(missing[:5])}{more}")


def params_from_hf_tensors(tensors: Iterable[Tuple[str, str, np.ndarray]], cfg: ModelConfig,
                           param_dtype=jnp.float32, where: str = "the checkpoint") -> dict:
  """Our params from (file, HF tensor name, array) triples, strictly (see the module doc).

  The one mapping from Hugging Face names to our layout: other formats (GGUF) rename their
  tensors to HF names and come through here (and `sharded_load` reads slices by it).
  """
  params: dict = {}
  fused: Dict[str, np.ndarray] = {}
  seen: Dict[str, str] = {}
  for fname, key, tensor in tensors:
    rule = check_hf_tensor(fname, key, tensor.shape, cfg, seen)
    if rule is None:
      continue
    target, slot, to_ours, _, shape = rule
    arr = to_ours(np.asarray(tensor).astype(np.float32), cfg)
    if slot(cfg) is None:
      _set(params, target, jnp.asarray(arr, dtype=param_dtype))
    else:
      if target not in fused:
        fused[target] = np.zeros(fused_param_shape(target, cfg), np.float32)
      fused[target][slot(cfg)] = arr
  check_complete(seen, cfg, where)
  for target, arr in fused.items():  # every part is present: no key is missing
    _set(params, target, jnp.asarray(arr, dtype=param_dtype))
  return params


def fused_param_shape(target: str, cfg: ModelConfig) -> Tuple[int, ...]:
  """Full shape of a fused param (qkv_proj, gate_up_proj) given its path."""
  suffix = "/".join(target.split("/")[-2:])
  return _FUSED_SHAPES[suffix](cfg)


def load_tokenizer(path: str):
  """The tokenizer saved with the model (with its chat template, if it has one), or None."""
  marker_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
  if not any(os.path.isfile(os.path.join(path, f)) for f in marker_files):
    return None
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(path)


def load_hf_model(path: str, param_dtype=jnp.float32, dtype=jnp.float32,
                  tokenizer: bool = True) -> HFModel:
  """Loads config, params and tokenizer from a Hugging Face model directory."""
  path = os.path.expanduser(path)
  cfg = read_hf_config(path)
  params = load_params(path, cfg, param_dtype)
  tok = load_tokenizer(path) if tokenizer else None
  return HFModel(config=cfg, params=params, tokenizer=tok, path=path, dtype=dtype)


# --- writing -------------------------------------------------------------------------------


def _get(tree: dict, path: str):
  for p in path.split("/"):
    tree = tree[p]
  return tree


def export_hf(params: dict, cfg: ModelConfig, path: str, dtype: str = "float32",
              tokenizer=None) -> None:
  """Writes config.json + model.safetensors (+ the tokenizer) that transformers loads."""
  from safetensors.numpy import save_file
  np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
  os.makedirs(path, exist_ok=True)
  tensors = {}
  for key in expected_hf_keys(cfg):
    target, slot, _, to_hf, shape = _match(key)
    value = np.asarray(jax.device_get(_get(params, target)), dtype=np.float32)
    if slot(cfg) is not None:
      value = value[slot(cfg)]
    out = np.ascontiguousarray(to_hf(value, cfg))
    assert out.shape == tuple(shape(cfg)), (key, out.shape)
    tensors[key] = out.astype(np_dtype)
  if dtype == "bfloat16":
    _save_bf16(tensors, os.path.join(path, SAFETENSORS_FILE))
  else:
    save_file(tensors, os.path.join(path, SAFETENSORS_FILE), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(to_hf_config(cfg, dtype), f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)


def _save_bf16(tensors: Dict[str, np.ndarray], fname: str) -> None:
  """safetensors' numpy writer does not know ml_dtypes' bf16; write the format by hand."""
  header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
  for key in sorted(tensors):
    raw = np.ascontiguousarray(tensors[key]).tobytes()
    header[key] = {"dtype": "BF16", "shape": list(tensors[key].shape),
                   "data_offsets": [offset, offset + len(raw)]}
    offset += len(raw)
    blobs.append(raw)
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  with open(fname, "wb") as f:
    f.write(len(head).to_bytes(8, "little"))
    f.write(head)
    for b in blobs:
      f.write(b)


__all__ = ["CheckpointError", "HFModel", "UnsupportedModelError", "check_complete",
           "check_hf_tensor", "export_hf", "load_hf_model",
           "load_params", "params_from_hf_tensors", "read_hf_config", "expected_hf_keys", "load_tokenizer"]
