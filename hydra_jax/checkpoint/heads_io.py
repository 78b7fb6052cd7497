"""Draft-head checkpoints: ours (orbax + heads_config.json) and the released PyTorch ones.

Our directory layout:
  heads_config.json   {"format": "hydra_jax.heads", "format_version": 1, "heads": HeadsConfig,
                       "base": {hidden_size, vocab_size, fingerprint, config|null}, "extra": {...}}
  params/             the heads' params (f32), written by orbax's StandardCheckpointer

`load_heads` also accepts a released Hydra directory (hydra_lm_head.pt + config.json) or a
released Medusa one (medusa_lm_head.safetensors or .pt + config.json); see `released.py`.
With a base config it refuses heads made for another base model, saying what differs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.checkpoint import released
from hydra_jax.checkpoint.hf import CheckpointError
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import HeadsConfig, HeadsMismatchError, param_shapes

FORMAT = "hydra_jax.heads"
FORMAT_VERSION = 1
CONFIG_FILE = "heads_config.json"
PARAMS_DIR = "params"

__all__ = ["save_heads", "load_heads", "read_heads_meta", "detect_heads_format",
           "HeadsMismatchError", "CheckpointError"]


def save_heads(directory: str, params, heads_cfg: HeadsConfig, extra_meta: Optional[dict] = None,
               base_cfg: Optional[ModelConfig] = None, param_dtype: str = "float32") -> None:
  """Writes the heads' params (f32 by default) and heads_config.json; overwrites a previous save.

  `base_cfg` (optional) is recorded so that the checkpoint can be checked in full (the Hydra++
  prefix layer's shapes) even when it is later loaded without a base model. `param_dtype`
  "bfloat16" halves the files (shipped heads); `load_heads` casts back to its param_dtype.
  """
  if param_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"param_dtype must be 'float32' or 'bfloat16', got {param_dtype!r}")
  import orbax.checkpoint as ocp
  if base_cfg is not None:
    heads_cfg.check_compatible(base_cfg)
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  store = np.float32 if param_dtype == "float32" else jnp.bfloat16
  tree = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), dtype=store),
                                nn.meta.unbox(params))
  _check_tree(tree, _expected(heads_cfg, base_cfg), "the params to save")
  # Config last and atomically: a directory with heads_config.json has complete params.
  cfg_path = os.path.join(directory, CONFIG_FILE)
  if os.path.exists(cfg_path):
    os.remove(cfg_path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, PARAMS_DIR), tree, force=True)
  meta = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "heads": heads_cfg.to_dict(),
      "base": {
          "hidden_size": heads_cfg.hidden_size,
          "vocab_size": heads_cfg.vocab_size,
          "fingerprint": heads_cfg.base_fingerprint,
          "config": None if base_cfg is None else base_cfg.to_dict(),
      },
      "param_dtype": param_dtype,
      "extra": extra_meta or {},
  }
  tmp = cfg_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  os.replace(tmp, cfg_path)


def detect_heads_format(directory: str) -> str:
  """'ours', 'hydra' or 'medusa'; a clear error when the directory is none of them."""
  directory = os.path.expanduser(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f"heads directory {directory!r} does not exist")
  if os.path.isfile(os.path.join(directory, CONFIG_FILE)):
    return "ours"
  kind = released.detect_released(directory)
  if kind is not None:
    return kind
  found = sorted(os.listdir(directory))[:8]
  raise CheckpointError(
      f"{directory} is not a heads directory: it needs one of {CONFIG_FILE} + {PARAMS_DIR}/ "
      f"(saved by hydra_jax), {released.HYDRA_FILE} + config.json (released Hydra), or "
      f"{' / '.join(released.MEDUSA_FILES)} + config.json (released Medusa); found "
      f"{', '.join(found) if found else 'nothing'}")


def read_heads_meta(directory: str) -> dict:
  """The parsed heads_config.json of one of our checkpoints (heads, base, extra)."""
  path = os.path.join(os.path.expanduser(directory), CONFIG_FILE)
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is corrupt") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT or "heads" not in meta:
    raise CheckpointError(f"{path} is not a hydra_jax heads config (no format {FORMAT!r})")
  if meta.get("format_version", 0) > FORMAT_VERSION:
    raise CheckpointError(f"{path} has format version {meta['format_version']}, newer than this "
                          f"hydra_jax reads ({FORMAT_VERSION}): upgrade hydra_jax")
  return meta


def load_heads(directory: str, base_cfg: Optional[ModelConfig] = None,
               param_dtype=jnp.float32) -> Tuple[HeadsConfig, Any]:
  """(HeadsConfig, params) from our format, a released Hydra or a released Medusa directory.

  With `base_cfg`, heads made for another base (hidden size, vocab size, config fingerprint)
  raise HeadsMismatchError naming what differs.
  """
  directory = os.path.expanduser(directory)
  kind = detect_heads_format(directory)
  if kind in ("hydra", "medusa"):
    cfg, params = released.load_released(directory, base_cfg, param_dtype)
    if base_cfg is not None:
      cfg.check_compatible(base_cfg)
    return cfg, params

  meta = read_heads_meta(directory)
  try:
    cfg = HeadsConfig.from_dict(meta["heads"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{os.path.join(directory, CONFIG_FILE)}: bad heads config: {e}") from e
  if base_cfg is not None:
    cfg.check_compatible(base_cfg)
  saved_base = (meta.get("base") or {}).get("config")
  if base_cfg is None and saved_base is not None:
    base_cfg = ModelConfig.from_dict(saved_base)

  import orbax.checkpoint as ocp
  params_dir = os.path.abspath(os.path.join(directory, PARAMS_DIR))
  if not os.path.isdir(params_dir):
    raise CheckpointError(f"{params_dir} is missing: the heads checkpoint is incomplete "
                          f"(heads_config.json without its params); save it again")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(params_dir)
  except Exception as e:  # orbax raises many types for truncated/missing files
    raise CheckpointError(f"cannot read the heads params in {params_dir}: {type(e).__name__}: "
                          f"{str(e)[:300]} (the checkpoint is corrupt or partial; save it "
                          f"again)") from e
  _check_tree(tree, _expected(cfg, base_cfg), f"the checkpoint in {params_dir}")
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=param_dtype), tree)
  return cfg, params


def _expected(cfg: HeadsConfig, base_cfg: Optional[ModelConfig]):
  """Expected {path: shape}. Without a base config the prefix layer is checked only for presence."""
  if base_cfg is not None:
    shapes = param_shapes(cfg, base_cfg)
  else:
    # The heads do not depend on the base beyond D and V; a stand-in base gives their shapes.
    stand_in = ModelConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                           intermediate_size=1, num_layers=1, num_heads=1, num_kv_heads=1,
                           head_dim=2)
    shapes = param_shapes(cfg.replace(arch="hydra") if cfg.prefix_layer else cfg, stand_in)
    if cfg.prefix_layer:
      shapes = dict(shapes, prefix_layer=None, prefix_norm={"scale": (cfg.hidden_size,)})
  return _flatten(shapes)


def _flatten(tree, prefix="") -> dict:
  out = {}
  if tree is None:
    return {prefix.rstrip("/") + "/*": None}  # a subtree whose content is not checked
  if isinstance(tree, dict) or hasattr(tree, "items"):
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}/"))
    return out
  return {prefix.rstrip("/"): tuple(getattr(tree, "shape", tree))}


def _check_tree(tree, expected: dict, what: str) -> None:
  got = _flatten(tree)
  wildcards = [k[:-2] for k, v in expected.items() if k.endswith("/*")]

  def covered(path):
    return any(path == w or path.startswith(w + "/") for w in wildcards)

  missing = [k for k in expected if not k.endswith("/*") and k not in got]
  missing += [w for w in wildcards if not any(p.startswith(w + "/") for p in got)]
  unexpected = [k for k in got if k not in expected and not covered(k)]
  wrong = [f"{k} {got[k]} (expected {expected[k]})" for k in got
           if k in expected and got[k] != expected[k]]
  problems = []
  if missing:
    problems.append(f"missing {', '.join(missing[:5])}")
  if unexpected:
    problems.append(f"unexpected {', '.join(unexpected[:5])}")
  if wrong:
    problems.append(f"wrong shape {', '.join(wrong[:5])}")
  if problems:
    raise CheckpointError(f"{what} does not match its heads config: {'; '.join(problems)}")
