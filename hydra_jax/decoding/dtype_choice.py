"""`--dtype auto`: float32 or bfloat16 for the decode loop, whichever was measured faster here.

Which dtype is faster depends on the machine, not on the model alone. On the AMD EPYC CPU this
project runs on, bf16 matmuls are slow (autoregressive 0.48x of f32); on a Xeon with AMX, bf16
costs the same for 2 to 32 rows, which makes a tree verify nearly free but a one-token step
slow; accelerators are memory-bound and read half the bytes in bf16. So the choice is measured,
by `tree_fit --dtype auto`, which fits a tree per dtype on this device, decodes the
calibration prompts with each (and autoregressively) and records the faster in
HEADS_DIR/tree_auto.json:

    "dtype_auto": {"choice": "float32", "device": "cpu:cpu:AMD EPYC",
                   "decoded_tokens_per_s": {"float32": 422.0, "bfloat16": 270.0}, ...}
    "by_dtype": {"float32": {tree fitted in f32}, "bfloat16": {tree fitted in bf16}}

`resolve_dtype("auto", heads_dir)` returns that choice when it was measured on this kind of
device, else the platform's default: float32 on a CPU (bf16 is slow for one-token steps on
every CPU measured), bfloat16 on a GPU or TPU.

Lossless, stated once: in float32, greedy speculative output equals float32 autoregressive
output token for token. In bfloat16 it equals bfloat16 autoregressive output except at
near-ties, where a tree forward and a one-token forward round the logits differently
(`tie_check`); and bf16 output is not f32 output. `--dtype auto` may pick bf16: pass
`--dtype float32` where the f32 tokens themselves are the contract.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

log = logging.getLogger("hydra_jax.decoding")

DTYPE_AUTO = "auto"
DTYPES = ("float32", "bfloat16")  # the dtypes `auto` chooses between
DTYPE_CHOICES = DTYPES + (DTYPE_AUTO,)  # for argparse


def this_device() -> str:
  """"platform:device_kind" of the first device, as tree_fit records it; on a CPU, whose
  device_kind is just "cpu", the processor's model name too: an AMD EPYC and a Xeon with AMX
  rank f32 and bf16 the other way round."""
  from hydra_jax.decoding.tree import device_id  # here: see _fit_file
  kind = device_id()
  return f"{kind}:{cpu_model()}" if kind.startswith("cpu:") else kind


def cpu_model() -> str:
  """The processor's model name (/proc/cpuinfo, as lscpu shows it), or "unknown"."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or "unknown"


def platform_default(platform: Optional[str] = None) -> str:
  """float32 on a CPU, bfloat16 on an accelerator (no measurement at hand)."""
  if platform is None:
    import jax
    platform = jax.devices()[0].platform
  return "float32" if platform == "cpu" else "bfloat16"


def _fit_file(heads_dir: str) -> str:
  # Imported here, not at the top: argument parsers import DTYPE_CHOICES, and tree imports flax.
  from hydra_jax.decoding.tree import AUTO_TREE_FILE
  return os.path.join(os.path.expanduser(os.fspath(heads_dir)), AUTO_TREE_FILE)


def read_dtype_fit(heads_dir: Optional[str]) -> Optional[Dict[str, Any]]:
  """The "dtype_auto" record of HEADS_DIR/tree_auto.json, or None (no dir, file or record)."""
  if not heads_dir or not isinstance(heads_dir, (str, os.PathLike)):
    return None
  path = _fit_file(heads_dir)
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  record = meta.get("dtype_auto") if isinstance(meta, dict) else None
  if not isinstance(record, dict) or record.get("choice") not in DTYPES:
    return None
  return record


def resolve_dtype(dtype: str, heads_dir: Optional[str] = None) -> Tuple[str, str]:
  """(dtype, why) for a requested dtype: "auto" resolved as the module docstring says."""
  if dtype != DTYPE_AUTO:
    return dtype, "as requested"
  record = read_dtype_fit(heads_dir)
  here = this_device()
  if record is not None and record.get("device") == here:
    rates = record.get("decoded_tokens_per_s") or {}
    shown = ", ".join(f"{k} {float(v):.1f}" for k, v in sorted(rates.items()))
    return record["choice"], (f"measured faster on {here} by tree_fit ({shown} tokens/s; "
                              f"{_fit_file(heads_dir)})")
  choice = platform_default(here.split(":")[0])
  if record is not None:
    why = (f"the dtype fit in {_fit_file(heads_dir)} was measured on "
           f"{record.get('device')}, not {here}; the {here.split(':')[0]} default")
  else:
    why = (f"no measured dtype fit for these heads (tree_fit --dtype auto writes one); the "
           f"{here.split(':')[0]} default")
  return choice, why


def announce(dtype: str, why: str) -> None:
  """The one log line that says what auto chose, why, and what it means for the output."""
  lossless = ("greedy output equals f32 autoregressive decoding" if dtype == "float32" else
              "greedy output equals bf16 autoregressive decoding except at near-ties (tie_check);"
              " pass --dtype float32 for f32 tokens")
  log.info("dtype auto: %s (%s); %s", dtype, why, lossless)
