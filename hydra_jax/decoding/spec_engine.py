"""Host-side driver of the speculative loop: compile once per shape, run batches, report stats.

The counterpart of `autoregressive.AutoregressiveEngine` for speculative decoding, with the same
`run(...) -> BatchOutput` contract, so `api.generate` handles both modes with one pipeline.
Per-row statistics go to `BatchOutput.extra`: `accept_length` (mean tokens emitted per verify
forward, bonus included) and `accepted_per_step`.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding import speculative as spec
from hydra_jax.decoding.autoregressive import (CACHE_FULL, EOS, LENGTH, STOP, BatchOutput,
                                               StopCriteria)
from hydra_jax.decoding.sampling import SamplingParams
from hydra_jax.decoding.spec_sampling import DEFAULT_POSTERIOR_ALPHA, DEFAULT_POSTERIOR_THRESHOLD
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import HeadsConfig


def _signature(tree) -> Tuple:
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))


class SpeculativeEngine:
  """Compiles (ahead of time, once per shape signature) and runs speculative batches.

  Static per engine: base and heads configs, the compiled tree, the compute dtype, the accept
  mode and the drafter. Traced per call: prompts, max_new_tokens, stop ids, seed and sampling
  knobs, so a second call with other values reuses the executable.
  """

  def __init__(self, base_cfg: ModelConfig, heads_cfg: HeadsConfig, tree, dtype=jnp.float32,
               accept: str = "greedy", drafter_factory=spec.heads_drafter):
    heads_cfg.check_compatible(base_cfg)
    if tree.depth > heads_cfg.num_heads:
      raise ValueError(f"tree depth {tree.depth} needs {tree.depth} draft heads but the heads "
                       f"have {heads_cfg.num_heads}: use a tree of depth <= "
                       f"{heads_cfg.num_heads}")
    self.models = spec.SpecModels(base_cfg, heads_cfg, tree, jnp.dtype(dtype))
    self.accept = accept
    self.drafter_factory = drafter_factory
    self._compiled: Dict[Tuple, Any] = {}

  def _executable(self, args, cache_len: int):
    key = (_signature(args), cache_len)
    if key in self._compiled:
      return self._compiled[key], 0.0
    t0 = time.perf_counter()
    fn = functools.partial(spec._speculative_generate, self.models, cache_len,
                           self.drafter_factory, accept=self.accept)
    exe = jax.jit(fn).lower(*args).compile()
    self._compiled[key] = exe
    return exe, time.perf_counter() - t0

  def run(self, params, heads_params, tokens_BxP: np.ndarray, lengths_B: np.ndarray,
          active_B: np.ndarray, row_ids_B: np.ndarray, sampling: SamplingParams,
          stop: StopCriteria, seed: int, cache_len: int,
          posterior_threshold: float = DEFAULT_POSTERIOR_THRESHOLD,
          posterior_alpha: float = DEFAULT_POSTERIOR_ALPHA) -> BatchOutput:
    del active_B  # dummy rows decode garbage alongside; their outputs are never read
    eos = np.asarray(stop.eos_ids)
    stop_ids = jnp.concatenate([stop.eos_ids, stop.stop_ids])  # -1 padding never matches
    args = (params, heads_params, jnp.asarray(tokens_BxP, jnp.int32),
            jnp.asarray(lengths_B, jnp.int32), stop.max_new_tokens, stop_ids, sampling,
            jax.random.key(seed), jnp.asarray(row_ids_B, jnp.int32),
            jnp.asarray(posterior_threshold, jnp.float32),
            jnp.asarray(posterior_alpha, jnp.float32))
    exe, compile_s = self._executable(args, cache_len)
    t0 = time.perf_counter()
    state = exe(*args)
    out, num, steps, finish, accepted = jax.device_get(
        (state.out_BxC, state.num_out_B, state.steps_B, state.finish_B, state.accepted_BxC))
    run_s = time.perf_counter() - t0

    codes = np.zeros_like(finish)
    for r in range(finish.shape[0]):
      f = int(finish[r])
      if f == spec.FINISH_STOP:
        last = int(out[r, int(num[r]) - 1])
        codes[r] = EOS if last in set(eos.tolist()) else STOP
      else:
        codes[r] = {spec.FINISH_LENGTH: LENGTH, spec.FINISH_CACHE: CACHE_FULL}.get(f, 0)
    per_step = [accepted[r, :int(steps[r])].tolist() for r in range(finish.shape[0])]
    accept_length = [float(np.mean(x)) if x else None for x in per_step]
    extra = {"accept_length": np.asarray(accept_length, dtype=object),
             "accepted_per_step": np.asarray(per_step + [None], dtype=object)[:-1]}
    return BatchOutput(tokens=np.asarray(out), num_generated=np.asarray(num),
                       steps=np.asarray(steps), finish=codes, run_s=run_s, compile_s=compile_s,
                       extra=extra)


__all__ = ["SpeculativeEngine"]
