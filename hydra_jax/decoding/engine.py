"""The host-side driver of both decode loops: compile once per shape, run batches, report.

`DecodeEngine` holds the static half of decoding (model config, compute dtype and, for
speculative decoding, the heads config, the tree, the accept mode and the drafter) and one
cache of compiled executables, keyed by the shapes of what is traced. A call compiles two
executables ahead of time, the prefill (prompt forward + output index 0) and the loop (which
takes the state donated), and times them apart from compilation.

Speculative rows report `accept_length` (mean tokens per verify forward, bonus included) and
`accepted_per_step` in BatchOutput.extra.
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding import autoregressive as ar
from hydra_jax.decoding import speculative as spec
from hydra_jax.decoding.acceptance import (ACCEPT_MODES, DEFAULT_POSTERIOR_ALPHA,
                                           DEFAULT_POSTERIOR_THRESHOLD, AcceptParams,
                                           check_accept_mode)
from hydra_jax.decoding.drafting import SpecModels, heads_drafter
from hydra_jax.decoding.sampling import SamplingParams
from hydra_jax.decoding.state import BatchOutput, StopCriteria
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import HeadsConfig
from hydra_jax.model.llama import LlamaModel

# Incremented when a loop is TRACED, i.e. on every (re)compile; tests read it.
TRACE_COUNTS: collections.Counter = collections.Counter()


def _signature(tree) -> Tuple:
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))


class DecodeEngine:
  """Autoregressive decoding (heads_cfg None) or speculative decoding with heads and a tree."""

  def __init__(self, cfg: ModelConfig, dtype=jnp.float32, heads_cfg: Optional[HeadsConfig] = None,
               tree=None, accept: str = "greedy", drafter_factory=heads_drafter):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.accept = check_accept_mode(accept)
    self.speculative = heads_cfg is not None
    if self.speculative:
      heads_cfg.check_compatible(cfg)
      if tree is None:
        raise ValueError("speculative decoding needs a tree (tree.resolve_tree)")
      if tree.depth > heads_cfg.num_heads:
        raise ValueError(f"tree depth {tree.depth} needs {tree.depth} draft heads but the heads "
                         f"have {heads_cfg.num_heads}: use a tree of depth <= "
                         f"{heads_cfg.num_heads}")
      self.models = SpecModels(cfg, heads_cfg, tree, self.dtype)
    elif accept != "greedy":
      raise ValueError("autoregressive decoding samples by itself: accept is for speculation")
    self.model = LlamaModel(cfg, dtype=self.dtype, param_dtype=self.dtype)
    self.drafter_factory = drafter_factory
    self._compiled: Dict[Tuple, Any] = {}

  @property
  def slots_per_step(self) -> int:
    """Cache entries one loop step writes before committing (the tree size when speculating)."""
    return self.models.tree.num_nodes if self.speculative else 1

  # --- the jitted halves ---------------------------------------------------------------------

  def _prefill_fn(self, cache_len: int):
    if self.speculative:
      return functools.partial(spec.spec_prefill, self.models, cache_len)
    return lambda params, heads_params, *rest: ar.ar_prefill(self.model, cache_len, params, *rest)

  def _loop_fn(self):
    if self.speculative:
      models, accept, factory = self.models, self.accept, self.drafter_factory

      def loop(params, heads_params, state, accept_params, stop):
        TRACE_COUNTS["spec_loop"] += 1
        drafter = factory(models, params, heads_params)
        return spec.spec_loop(models, params, heads_params, drafter, state, accept_params, stop,
                              accept)
      return loop

    def ar_loop(params, heads_params, state, accept_params, stop):
      TRACE_COUNTS["loop"] += 1
      return ar.ar_loop(self.model, params, state, accept_params, stop)
    return ar_loop

  def _executables(self, args, cache_len: int):
    key = (_signature(args), cache_len)
    if key in self._compiled:
      return self._compiled[key], 0.0
    t0 = time.perf_counter()
    TRACE_COUNTS["prefill"] += 1
    prefill = jax.jit(self._prefill_fn(cache_len))
    loop = jax.jit(self._loop_fn(), donate_argnums=(2,))
    prefill_exe = prefill.lower(*args).compile()
    state_shape = jax.eval_shape(prefill, *args)
    params, heads_params, *_, accept_params, stop = args
    loop_exe = loop.lower(params, heads_params, state_shape, accept_params, stop).compile()
    self._compiled[key] = (prefill_exe, loop_exe)
    return self._compiled[key], time.perf_counter() - t0

  # --- running -------------------------------------------------------------------------------

  def run(self, params, heads_params, tokens_BxP: np.ndarray, lengths_B: np.ndarray,
          active_B: np.ndarray, row_ids_B: np.ndarray, sampling: SamplingParams,
          stop: StopCriteria, seed: int, cache_len: int,
          posterior_threshold: float = DEFAULT_POSTERIOR_THRESHOLD,
          posterior_alpha: float = DEFAULT_POSTERIOR_ALPHA) -> BatchOutput:
    """Prefill + decode one padded batch (heads_params None without heads)."""
    self._check_params(params)
    accept_params = AcceptParams.make(sampling, posterior_threshold, posterior_alpha)
    args = (params, heads_params, jnp.asarray(tokens_BxP, jnp.int32),
            jnp.asarray(lengths_B, jnp.int32), jnp.asarray(active_B, bool),
            jnp.asarray(row_ids_B, jnp.int32), jax.random.key(seed), accept_params, stop)
    (prefill_exe, loop_exe), compile_s = self._executables(args, cache_len)
    t0 = time.perf_counter()
    state = prefill_exe(*args)
    jax.block_until_ready(state.tokens)
    t1 = time.perf_counter()
    state = loop_exe(params, heads_params, state, accept_params, stop)
    fetch = [state.tokens, state.num_generated, state.steps_per_row, state.finish]
    if self.speculative:
      fetch.append(state.spec.accepted_BxS)
    out = jax.device_get(fetch)
    t2 = time.perf_counter()
    result = BatchOutput(*(np.asarray(x) for x in out[:4]), prefill_s=t1 - t0, run_s=t2 - t0,
                         compile_s=compile_s)
    if self.speculative:
      steps, accepted = result.steps, out[4]
      per_step = [accepted[r, :int(steps[r])].tolist() for r in range(len(steps))]
      result.extra = {
          "accept_length": np.asarray([float(np.mean(x)) if x else None for x in per_step],
                                      dtype=object),
          "accepted_per_step": np.asarray(per_step + [None], dtype=object)[:-1]}
    return result

  def _check_params(self, params):
    embed = params["embed_tokens"]["embedding"]
    if tuple(embed.shape) != (self.cfg.vocab_size, self.cfg.hidden_size):
      raise ValueError(f"params have an embedding of shape {tuple(embed.shape)}, but the model "
                       f"config implies {(self.cfg.vocab_size, self.cfg.hidden_size)}")


__all__ = ["ACCEPT_MODES", "DecodeEngine", "TRACE_COUNTS"]
