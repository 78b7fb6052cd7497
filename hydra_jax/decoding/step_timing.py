"""Timing decode steps as the loops run them, for tree fitting and the step-cost profiler.

A timed function runs `iters` steps of an engine's own loop body (`ar_step` / `spec_step`)
in one jitted `fori_loop`, so there is no per-step dispatch, just like `generate`. After every
step the cache lengths (and the prefix layer's) go back to where they started, so every step
sees the same context; the step's outputs (the next root, the output buffer, the context)
are carried on, so XLA cannot drop any of its work. Candidates are timed round-robin and the
median is kept: load from other processes then hits all of them alike.

    state, timer = steady_state_timer(engine, params, heads_params, context_len=96)
    seconds_per_step = interleaved_medians([timer], repeats=5)[0]
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding import autoregressive as ar
from hydra_jax.decoding import speculative as spec
from hydra_jax.decoding.acceptance import AcceptParams
from hydra_jax.decoding.sampling import SamplingParams
from hydra_jax.decoding.state import DecodeState, StopCriteria

# Never stop while timing: no stop ids, a max_new_tokens nobody reaches.
NO_STOP = StopCriteria.make(2 ** 30)


def steady_state(engine, params, heads_params, context_len: int, cache_len: int,
                 batch: int = 1) -> Tuple[DecodeState, AcceptParams]:
  """The state right after prefilling `batch` rows of `context_len` pseudo-random tokens."""
  vocab = engine.cfg.vocab_size
  tokens = (np.arange(batch * context_len).reshape(batch, context_len) * 7919 + 11) % vocab
  lengths = np.full((batch,), context_len, np.int32)
  accept_params = AcceptParams.make(SamplingParams.make())
  args = (params, heads_params, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths),
          jnp.ones((batch,), bool), jnp.arange(batch, dtype=jnp.int32),
          jax.random.key_data(jax.random.key(0)),  # the engine takes raw key data
          accept_params, NO_STOP)
  state = jax.jit(engine._prefill_fn(cache_len))(*args)
  return state, accept_params


def _reset_lengths(new: DecodeState, old: DecodeState) -> DecodeState:
  """`new` with old's counters and cache lengths: the next step sees the same context."""
  cache = new.cache.with_lengths(old.cache.lengths)
  carry = new.spec
  if carry is not None and carry.prefix_cache is not None:
    carry = carry.replace(prefix_cache=carry.prefix_cache.with_lengths(
        old.spec.prefix_cache.lengths))
  return new.replace(cache=cache, spec=carry, step=old.step, done=old.done, finish=old.finish,
                     num_generated=old.num_generated, steps_per_row=old.steps_per_row)


def step_fn(engine, iters: int, make_step: Optional[Callable] = None) -> Callable:
  """jit(params, heads_params, state, accept_params) -> state after `iters` steady steps.

  make_step(params, heads_params, accept_params) -> (state -> state) replaces the engine's
  own step (the profiler times parts of a step that way).
  """
  def run(params, heads_params, state, accept_params):
    if make_step is not None:
      one = make_step(params, heads_params, accept_params)
    elif engine.speculative:
      drafter = engine.drafter_factory(engine.models, params, heads_params)
      one = lambda s: spec.spec_step(engine.models, params, heads_params, drafter, s,
                                     accept_params, NO_STOP, engine.accept)
    else:
      one = lambda s: ar.ar_step(engine.model, params, s, accept_params, NO_STOP)
    return jax.lax.fori_loop(0, iters, lambda _, s: _reset_lengths(one(s), s), state)
  return jax.jit(run, donate_argnums=(2,))


def steady_state_timer(engine, params, heads_params, context_len: int, cache_len: int = 0,
                       batch: int = 1, iters: int = 8,
                       make_step: Optional[Callable] = None) -> Callable[[], float]:
  """A function returning seconds per step of `engine` (compiled and warmed up here)."""
  cache_len = cache_len or _bucket(context_len + engine.slots_per_step + 1)
  heads_params = engine.run_heads_params(params, heads_params)  # what `run` hands the loop
  params = engine.run_params(params)
  state, accept_params = steady_state(engine, params, heads_params, context_len, cache_len, batch)
  fn = step_fn(engine, iters, make_step)
  holder = [fn(params, heads_params, state, accept_params)]  # compile + warm-up
  jax.block_until_ready(holder[0].tokens)

  def once() -> float:
    t0 = time.perf_counter()
    holder[0] = fn(params, heads_params, holder[0], accept_params)
    jax.block_until_ready(holder[0].tokens)
    return (time.perf_counter() - t0) / iters
  return once


def _bucket(n: int, m: int = 128) -> int:
  return -(-n // m) * m


def interleaved_medians(fns: Sequence[Callable[[], float]], repeats: int) -> List[float]:
  """Median of `repeats` calls of each fn, called round-robin."""
  samples = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      samples[i].append(fn())
  return [statistics.median(s) for s in samples]


__all__ = ["interleaved_medians", "steady_state", "steady_state_timer", "step_fn"]
