"""Draft-head checkpoints: ours (orbax + heads_config.json) and the released PyTorch ones.

Our directory layout:
  heads_config.json   {"format": "hydra_jax.heads", "format_version": 2, "heads": HeadsConfig,
                       "base": {hidden_size, vocab_size, fingerprint, config|null,
                                weights|absent}, "params_sha256": {file: sha256}, "extra": {...}}
  params/             the heads' params (f32 or bf16), written by orbax's StandardCheckpointer

Two records guard against loading the wrong thing without a word:
- "params_sha256" holds the sha256 of every file under params/. `load_heads` checks them
  BEFORE orbax reads anything, so a truncated or overwritten file is one clear error
  (orbax itself may load flipped bytes silently, or fail with TensorStore noise).
- "base"."weights" holds a few fixed samples of the base model's embedding and LM head
  (`base_weights_fingerprint`). The config fingerprint alone cannot tell two models of the
  same shapes apart; with `base_params`, `load_heads` refuses heads recorded for other
  weights unless `allow_mismatch=True`.
Heads saved before these records existed load without the checks.

`load_heads` also accepts a released Hydra directory (hydra_lm_head.pt + config.json) or a
released Medusa one (medusa_lm_head.safetensors or .pt + config.json); see `released.py`.
With a base config it refuses heads made for another base model, saying what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.checkpoint import released
from hydra_jax.checkpoint.heads_layout import FORMAT_VERSION, upgrade_params
from hydra_jax.checkpoint.hf import CheckpointError
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import HeadsConfig, HeadsMismatchError, param_shapes

FORMAT = "hydra_jax.heads"
CONFIG_FILE = "heads_config.json"
PARAMS_DIR = "params"
CHECKSUMS_KEY = "params_sha256"

# The base-weights fingerprint: WEIGHT_SAMPLES fixed entries of the embedding [V, D] and of
# the LM head [D, V]. Compared with a tolerance rather than hashed, so the same base loaded
# in f32 or bf16 (or exported in another dtype) matches, while another model does not.
WEIGHTS_METHOD = "embed_lm_head_samples_v1"
WEIGHT_SAMPLES = 16
WEIGHTS_RTOL = 2e-2  # bf16 keeps 8 bits of mantissa: 0.4% per value
WEIGHTS_ATOL = 1e-5

FIX_CORRUPT = ("re-export the heads (train.py writes WORKDIR/heads) or download them again")

__all__ = ["save_heads", "load_heads", "ship_heads", "read_heads_meta", "detect_heads_format",
           "base_weights_fingerprint", "HeadsMismatchError", "HeadsCorruptError",
           "CheckpointError"]

log = logging.getLogger("hydra_jax.checkpoint")


class HeadsCorruptError(CheckpointError):
  """A heads file differs from what was saved (truncated, overwritten, missing)."""


class _DropOrbaxUnretrievedTasks(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not ("Task exception was never retrieved" in text
                and f"{os.sep}orbax{os.sep}" in text)


def silence_aborted_reads() -> None:
  """Stops the noise orbax leaves after a failed restore (or save), for the rest of the process.

  When one TensorStore read (or write) fails, orbax's event loop closes while the others are
  still in flight; as they finish they print "Event loop is closed" tracebacks and
  "Exception ignored in <coroutine>" reports (sys.unraisablehook), from the moment of the
  failure to seconds later, over the error message the caller shows. Where several reads
  failed, orbax raises the first, and asyncio logs each other one ("Task exception was never
  retrieved", with its traceback) whenever the garbage collector frees its task. Called
  before a read that may fail (and after a failed write); only those kinds of report are
  dropped.
  """
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropOrbaxUnretrievedTasks) for f in asyncio_log.filters):
    asyncio_log.addFilter(_DropOrbaxUnretrievedTasks())
  previous = sys.unraisablehook
  if getattr(previous, "_hydra_jax_quiet", False):
    return

  def hook(unraisable):
    exc, obj = unraisable.exc_value, unraisable.object
    code = getattr(obj, "cr_code", None)
    from_orbax = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
    loop_closed = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
    if not (loop_closed or from_orbax):
      previous(unraisable)

  hook._hydra_jax_quiet = True
  sys.unraisablehook = hook


# --- integrity and base-weights records ---------------------------------------------------


def file_sha256(path: str) -> str:
  """sha256 of a file's bytes, read in 1 MiB blocks (heads params, data and cache shards)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def params_checksums(params_dir: str) -> Dict[str, str]:
  """{path relative to params_dir: sha256} of every file orbax wrote there."""
  out = {}
  for root, _, files in os.walk(params_dir):
    for name in files:
      full = os.path.join(root, name)
      out[os.path.relpath(full, params_dir).replace(os.sep, "/")] = file_sha256(full)
  return dict(sorted(out.items()))


def verify_params_files(params_dir: str, recorded: Dict[str, str], directory: str) -> None:
  """Raises HeadsCorruptError naming the first file that is missing or changed."""
  for rel, digest in sorted(recorded.items()):
    full = os.path.join(params_dir, *rel.split("/"))
    if not os.path.isfile(full):
      problem = "is missing"
    elif file_sha256(full) != digest:
      problem = (f"has changed since the heads were saved ({os.path.getsize(full):,} bytes, "
                 f"sha256 differs from heads_config.json)")
    else:
      continue
    raise HeadsCorruptError(f"the heads in {directory} are corrupt: {full} {problem}; "
                            f"{FIX_CORRUPT}")


def _weight_indices(vocab_size: int, hidden_size: int):
  rows = np.linspace(0, vocab_size - 1, WEIGHT_SAMPLES).round().astype(np.int64)
  cols = (rows * 7919 + 13) % hidden_size  # spread over the columns too
  return rows, cols


def base_weights_fingerprint(base_params) -> Dict[str, Any]:
  """Fixed samples of the base's embedding and LM head (a few dozen floats, JSON-able).

  Reads only those entries, so it is cheap for any model size; call it on unsharded (or
  fully addressable) params.
  """
  params = nn.meta.unbox(base_params)
  try:
    emb = params["embed_tokens"]["embedding"]
  except (KeyError, TypeError) as e:
    raise ValueError("base_params has no embed_tokens/embedding: pass the base model's params "
                     "(HFModel.params)") from e
  rows, cols = _weight_indices(*emb.shape)
  record = {"method": WEIGHTS_METHOD, "shape": [int(n) for n in emb.shape],
            "embed_tokens": _samples(emb, rows, cols)}
  lm_head = (params.get("lm_head") or {}).get("kernel") if hasattr(params, "get") else None
  if lm_head is not None:  # [D, V]; tied embeddings have none
    record["lm_head"] = _samples(lm_head, cols, rows)
  return record


def _samples(array, rows, cols) -> list:
  values = np.asarray(jax.device_get(array[rows, cols]), np.float32)
  return [float(f"{v:.7g}") for v in values.tolist()]


def weights_difference(recorded: Dict[str, Any], current: Dict[str, Any]) -> Optional[float]:
  """0.0 when two base-weights records agree (within tolerance), else the max relative
  difference (inf for other shapes or a tied vs untied LM head); None if not comparable."""
  if recorded.get("method") != WEIGHTS_METHOD or current.get("method") != WEIGHTS_METHOD:
    return None
  worst = 0.0
  for key in ("embed_tokens", "lm_head"):
    if (key in recorded) != (key in current):
      return float("inf")
    if key not in recorded:
      continue
    a, b = np.asarray(current[key]), np.asarray(recorded[key])
    if a.shape != b.shape or list(recorded.get("shape", [])) != list(current.get("shape", [])):
      return float("inf")
    if np.any(np.abs(a - b) > WEIGHTS_ATOL + WEIGHTS_RTOL * np.abs(b)):
      worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))))
  return worst


def check_base_weights(recorded: Optional[Dict[str, Any]], base_params, directory: str,
                       allow_mismatch: bool = False) -> None:
  """Refuses heads whose recorded base weights differ from `base_params` (HeadsMismatchError)."""
  if not recorded or base_params is None:
    return  # heads saved before the record existed, or nothing to compare with
  worst = weights_difference(recorded, base_weights_fingerprint(base_params))
  if worst is None:
    log.warning("%s: unknown base-weights record %r; not checked", directory,
                recorded.get("method"))
    return
  if worst == 0.0:
    return
  what = (f"the heads in {directory} were trained on other base weights: the model's embedding "
          f"and LM head differ from the values the heads recorded (max relative difference "
          f"{worst:.3g} over {WEIGHT_SAMPLES} samples each, tolerance {WEIGHTS_RTOL:g})")
  if allow_mismatch:
    log.warning("%s; loading them anyway (allow_mismatch): expect a low accept length", what)
    return
  raise HeadsMismatchError(f"{what}. Use heads trained for this base model, or load them anyway "
                           f"with --allow-heads-mismatch (allow_mismatch=True)")


def save_heads(directory: str, params, heads_cfg: HeadsConfig, extra_meta: Optional[dict] = None,
               base_cfg: Optional[ModelConfig] = None, param_dtype: str = "float32", *,
               base_params=None, base_weights: Optional[Dict[str, Any]] = None) -> None:
  """Writes the heads' params (f32 by default) and heads_config.json; overwrites a previous save.

  `base_cfg` (optional) is recorded so that the checkpoint can be checked in full (the Hydra++
  prefix layer's shapes) even when it is later loaded without a base model. `param_dtype`
  "bfloat16" halves the files (shipped heads); `load_heads` casts back to its param_dtype.
  `base_params` (or an already computed `base_weights` = base_weights_fingerprint(...), e.g.
  copied from the heads being re-saved) records which base weights the heads belong to.
  The sha256 of every params file is always recorded.
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
  params_dir = os.path.join(directory, PARAMS_DIR)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(params_dir, tree, force=True)
  if base_weights is None and base_params is not None:
    base_weights = base_weights_fingerprint(base_params)
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
      CHECKSUMS_KEY: params_checksums(params_dir),
      "extra": extra_meta or {},
  }
  if base_weights is not None:
    meta["base"]["weights"] = base_weights
  tmp = cfg_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  os.replace(tmp, cfg_path)


def ship_heads(src: str, dst: str) -> str:
  """A bf16 copy of trained heads (train.py's WORKDIR/heads) at `dst`, to ship in a package.

  bf16 halves the f32 export; `load_heads` casts back (to f32 or the model's dtype). The
  training metadata (steps, eval metrics) and the base-weights record travel along.
  """
  meta = read_heads_meta(src)
  saved_base = (meta.get("base") or {}).get("config")
  base_cfg = ModelConfig.from_dict(saved_base) if saved_base else None
  cfg, params = load_heads(src, base_cfg)
  extra = dict(meta.get("extra") or {})
  extra.pop("model_path", None)  # a path on the training machine, meaningless once shipped
  extra["trained_param_dtype"] = meta.get("param_dtype", "float32")
  save_heads(dst, params, cfg, extra_meta=extra, base_cfg=base_cfg, param_dtype="bfloat16",
             base_weights=(meta.get("base") or {}).get("weights"))
  return dst


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
               param_dtype=jnp.float32, *, base_params=None,
               allow_mismatch: bool = False) -> Tuple[HeadsConfig, Any]:
  """(HeadsConfig, params) from our format, a released Hydra or a released Medusa directory.

  With `base_cfg`, heads made for another base (hidden size, vocab size, config fingerprint)
  raise HeadsMismatchError naming what differs. With `base_params` too, our heads that
  recorded other base weights are refused the same way. `allow_mismatch=True` loads heads
  recorded for another base (config fingerprint or weights) with a warning, as long as the
  shapes fit. Files that changed since the save raise HeadsCorruptError.
  """
  directory = os.path.expanduser(directory)
  kind = detect_heads_format(directory)
  if kind in ("hydra", "medusa"):
    cfg, params = released.load_released(directory, base_cfg, param_dtype)
    if base_cfg is not None:
      _check_config(cfg, base_cfg, directory, allow_mismatch)
    return cfg, params

  meta = read_heads_meta(directory)
  try:
    cfg = HeadsConfig.from_dict(meta["heads"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{os.path.join(directory, CONFIG_FILE)}: bad heads config: {e}") from e
  if base_cfg is not None:
    _check_config(cfg, base_cfg, directory, allow_mismatch)
  check_base_weights((meta.get("base") or {}).get("weights"), base_params, directory,
                     allow_mismatch)
  saved_base = (meta.get("base") or {}).get("config")
  if base_cfg is None and saved_base is not None:
    base_cfg = ModelConfig.from_dict(saved_base)

  import orbax.checkpoint as ocp
  params_dir = os.path.abspath(os.path.join(directory, PARAMS_DIR))
  if not os.path.isdir(params_dir):
    raise CheckpointError(f"{params_dir} is missing: the heads checkpoint is incomplete "
                          f"(heads_config.json without its params); {FIX_CORRUPT}")
  if meta.get(CHECKSUMS_KEY):
    verify_params_files(params_dir, meta[CHECKSUMS_KEY], directory)
  else:
    silence_aborted_reads()  # unchecked files: the noise of a failed read can start at once
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(params_dir)
  except Exception as e:  # orbax raises many types for truncated/missing files
    raise CheckpointError(f"cannot read the heads params in {params_dir}: {type(e).__name__}: "
                          f"{str(e)[:300]} (the checkpoint is corrupt or partial; "
                          f"{FIX_CORRUPT})") from e
  tree = upgrade_params(tree, int(meta.get("format_version", 1)))  # older layouts, exactly
  _check_tree(tree, _expected(cfg, base_cfg), f"the checkpoint in {params_dir}")
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=param_dtype), tree)
  return cfg, params


def _check_config(cfg: HeadsConfig, base_cfg: ModelConfig, directory: str,
                  allow_mismatch: bool) -> None:
  if not allow_mismatch:
    cfg.check_compatible(base_cfg)
    return
  cfg.replace(base_fingerprint="").check_compatible(base_cfg)  # the shapes must still fit
  if cfg.base_fingerprint and cfg.base_fingerprint != base_cfg.fingerprint():
    log.warning("the heads in %s were made for a base with config fingerprint %s, not %s; "
                "loading them anyway (allow_mismatch)", directory, cfg.base_fingerprint,
                base_cfg.fingerprint())


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
