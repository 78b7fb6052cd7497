"""The host side of the training loop: metric pulls, NaN checks, logging and throughput.

The loop dispatches step N before pulling step N-1's metrics (`HostLoop.consume`), so the
host waits on the device only when it must: before a checkpoint, an evaluation, the end.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.training.errors import TrainingDivergedError


@jax.jit
def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def to_host(tree):
  """Full numpy copies of (possibly sharded, possibly multi-process) arrays."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def scalars(metrics: Dict[str, Any]) -> Dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}


class HostLoop:
  """Pulls each step's metrics once, stops on NaN, logs means every log_every steps."""

  def __init__(self, log_every: int, logger, progress, checkpoint_dir: str,
               tokens_per_step: int, start: Optional[int]):
    self.log_every, self.logger, self.progress = int(log_every), logger, progress
    self.checkpoint_dir = checkpoint_dir
    self.tokens_per_step = tokens_per_step
    self.last_good = start
    self.window = []
    self.last_metrics: Dict[str, float] = {}
    self.tokens_per_s: Optional[float] = None
    self._t_last = time.perf_counter()
    self._t_window = self._t_last
    self._consumed = start or 0

  def diverged_message(self, step, what):
    good = (f"the last good checkpoint is step {self.last_good} in {self.checkpoint_dir}"
            if self.last_good else "no checkpoint was written")
    return (f"training diverged at step {step}: {what}; {good} (the bad state was not saved). "
            f"Lower optimizer.lr, raise optimizer.warmup_steps or check the data, then rerun "
            f"to resume from that checkpoint.")

  def check_params(self, step: int, state) -> None:
    """Before a save: the state must be finite, or it would become the latest checkpoint."""
    if not bool(all_finite((state.params, state.opt_state))):
      raise TrainingDivergedError(self.diverged_message(step, "the params became non-finite"))

  def consume(self, step: int, metrics) -> None:
    """Pulls one step's metrics (blocks until that step ran), checks, logs."""
    if step <= self._consumed:
      return
    m = scalars(jax.device_get(metrics))
    bad = {k: v for k, v in m.items() if k in ("loss", "grad_norm") and not math.isfinite(v)}
    if bad:
      raise TrainingDivergedError(self.diverged_message(
          step, ", ".join(f"{k} = {v}" for k, v in bad.items())))
    now = time.perf_counter()
    dt, self._t_last = now - self._t_last, now
    self._consumed = step
    self.last_metrics = m
    self.window.append(m)
    self.progress.update(1, {"loss": f"{m.get('loss', float('nan')):.4f}",
                             "tok/s": f"{self.tokens_per_step / max(dt, 1e-9):.0f}"})
    if step % self.log_every == 0 or step == 1:
      elapsed = now - self._t_window
      self._t_window = now
      mean = {k: float(np.mean([w[k] for w in self.window])) for k in self.window[-1]}
      self.tokens_per_s = self.tokens_per_step * len(self.window) / max(elapsed, 1e-9)
      mean["tokens_per_s"] = self.tokens_per_s
      mean["steps_in_mean"] = len(self.window)
      self.logger.write(step, "train", mean)
      self.window = []
