"""Where training metrics go: a JSONL file in the workdir, TensorBoard if a light writer is
installed, and a tqdm progress bar on stderr.

Only process 0 writes. On resume, records from steps after the restored checkpoint (written
by the run that died before its next checkpoint) are dropped, so the file reads as one run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Mapping, Optional

import numpy as np

METRICS_FILE = "metrics.jsonl"


def _to_python(v: Any):
  if isinstance(v, (np.generic, np.ndarray)) and np.ndim(v) == 0:
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no nan/inf; keep the record parseable
  if isinstance(v, (list, tuple)):
    return [_to_python(x) for x in v]
  if isinstance(v, np.ndarray):
    return [_to_python(x) for x in v.tolist()]
  return v


def _tensorboard_writer(logdir: str):
  """tensorboardX's writer when it is installed (no TensorFlow needed); else None."""
  try:
    from tensorboardX import SummaryWriter  # type: ignore
  except Exception:  # noqa: BLE001 - optional dependency, any import failure means "skip"
    return None
  return SummaryWriter(logdir)


class MetricsLogger:
  """Appends {"step", "split", **metrics} lines to WORKDIR/metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None,
               tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not enabled:
      return
    if resume_step is not None:
      self._truncate_after(resume_step)
    elif os.path.exists(self.path):
      os.remove(self.path)  # a fresh run (no checkpoint) starts a fresh file
    self._file = open(self.path, "a")
    if tensorboard:
      self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill
        if int(rec.get("step", 0)) <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    rec = {"step": int(step), "split": split, "time": round(time.time(), 3)}
    rec.update({k: _to_python(v) for k, v in metrics.items()})
    self._file.write(json.dumps(rec) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float, np.generic)) and np.ndim(v) == 0:
          self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str, split: Optional[str] = None) -> list:
  """The records of WORKDIR/metrics.jsonl (optionally one split), in file order."""
  out = []
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    for line in f:
      rec = json.loads(line)
      if split is None or rec.get("split") == split:
        out.append(rec)
  return out


class Progress:
  """tqdm bar on stderr: step, loss, tokens/s (tqdm adds elapsed and ETA)."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, file=sys.stderr, unit="step",
                       dynamic_ncols=True, desc="train", mininterval=0.5)

  def update(self, n: int, postfix: Optional[Dict[str, Any]] = None) -> None:
    if self._bar is None:
      return
    if postfix:
      self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(n)

  def write(self, msg: str) -> None:
    if self._bar is not None:
      self._bar.write(msg, file=sys.stderr)
    else:
      print(msg, file=sys.stderr)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
