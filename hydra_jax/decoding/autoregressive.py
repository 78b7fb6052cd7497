"""Jitted autoregressive decoding: one prefill, then a `lax.while_loop` of one-token steps.

Everything has a static shape: the batch, the padded prompt length P, the cache length S and
the output buffer (S tokens per row). What changes between calls without recompiling is
traced: max_new_tokens, the sampling knobs, the stop ids, the seed, the prompts themselves.

The pieces a speculative engine reuses are separate functions: `prefill_forward` (cache +
last logits + hidden states), `init_state` and `emit_tokens` (commits up to M new tokens per
row with per-row stop rules), and `DecodeState` / `StopCriteria`.

Length contract: a row's prompt plus its output never exceed the cache length S; a row that
reaches S tokens in total stops with finish reason "cache_full".

Legend: B batch rows, P padded prompt length, S cache slots, V vocab, M tokens emitted at once.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding.sampling import SamplingParams, row_keys, sample
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.kv_cache import KVCache, init_cache
from hydra_jax.model.llama import LlamaModel
from hydra_jax.model.masks import cache_causal_mask

# Finish reasons by code; 0 = still running (or a padding row that never ran).
FINISH_REASONS = ("running", "eos", "stop", "length", "cache_full")
EOS, STOP, LENGTH, CACHE_FULL = 1, 2, 3, 4

# Incremented when a jitted function is TRACED, i.e. on every (re)compile; tests read it.
TRACE_COUNTS: collections.Counter = collections.Counter()


@flax.struct.dataclass
class StopCriteria:
  """Traced stop rules: new values never recompile (only the padded id-buffer sizes are static)."""
  max_new_tokens: jax.Array  # int32 []
  eos_ids: jax.Array  # int32 [E], padded with -1
  stop_ids: jax.Array  # int32 [E'], padded with -1

  @classmethod
  def make(cls, max_new_tokens: int, eos_ids=(), stop_ids=(), bucket: int = 8) -> "StopCriteria":
    return cls(max_new_tokens=jnp.asarray(max_new_tokens, jnp.int32),
               eos_ids=jnp.asarray(_pad_ids(eos_ids, bucket)),
               stop_ids=jnp.asarray(_pad_ids(stop_ids, bucket)))


def _pad_ids(ids, bucket: int) -> np.ndarray:
  ids = sorted({int(i) for i in ids})
  size = max(bucket, -(-len(ids) // bucket) * bucket)  # a new size only past each multiple
  out = np.full((size,), -1, np.int32)
  out[:len(ids)] = ids
  return out


@flax.struct.dataclass
class DecodeState:
  """What the while_loop carries. `step` counts base forwards after prefill (all rows)."""
  step: jax.Array  # int32 []
  done: jax.Array  # bool [B]
  tokens: jax.Array  # int32 [B, S]: output buffer, new tokens only
  num_generated: jax.Array  # int32 [B]
  steps_per_row: jax.Array  # int32 [B]: base forwards after prefill while the row ran
  finish: jax.Array  # int32 [B]: FINISH_REASONS code
  last_token: jax.Array  # int32 [B]: the next token to feed
  prompt_lengths: jax.Array  # int32 [B]
  row_ids: jax.Array  # int32 [B]: the prompt's index in the caller's list (seeds its draws)
  cache: KVCache
  rng: jax.Array  # the seed key; per-row, per-step keys are folded from it


def prefill_forward(model: LlamaModel, params, tokens_BxP: jax.Array, lengths_B: jax.Array,
                    cache_len: int, cache_dtype) -> Tuple[jax.Array, jax.Array, KVCache]:
  """Runs right-padded prompts through the model into a fresh cache of `cache_len` slots.

  Returns (logits at each row's last prompt token [B, V] f32, hidden states [B, P, D], cache
  with each row's length committed). Padding slots beyond a row's length hold garbage that is
  masked out and later overwritten.
  """
  b, p = tokens_BxP.shape
  cache = init_cache(model.cfg, b, cache_len, cache_dtype)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :], (b, p))
  mask = cache_causal_mask(cache.lengths, p, cache_len)
  _, hidden, cache = model.apply({"params": params}, tokens_BxP, positions, cache, mask,
                                 return_logits=False)
  last = jnp.take_along_axis(hidden, (lengths_B - 1)[:, None, None], axis=1)  # [B, 1, D]
  # The LM head only where it is needed: [B, V], not [B, P, V].
  logits = model.apply({"params": params}, last, method=LlamaModel.logits)[:, 0]
  return logits, hidden, cache.with_lengths(lengths_B)


def init_state(cache: KVCache, lengths_B, active_B, row_ids_B, rng) -> DecodeState:
  """A state before any token is emitted; inactive (padding) rows start done."""
  b, s = cache.batch_size, cache.max_len
  zeros = jnp.zeros((b,), jnp.int32)
  return DecodeState(step=jnp.zeros((), jnp.int32), done=~active_B,
                     tokens=jnp.zeros((b, s), jnp.int32), num_generated=zeros,
                     steps_per_row=zeros, finish=zeros, last_token=zeros,
                     prompt_lengths=lengths_B.astype(jnp.int32),
                     row_ids=row_ids_B.astype(jnp.int32), cache=cache, rng=rng)


def emit_tokens(state: DecodeState, new_BxM: jax.Array, count_B: jax.Array,
                stop: StopCriteria) -> DecodeState:
  """Appends the first count[b] of new[b] to each running row's output, applying stop rules.

  A row keeps tokens up to and including its first EOS / stop id, at most max_new_tokens in
  total, and at most as many as keep prompt + output within the cache length. Rows that are
  done take nothing (their count is ignored).
  """
  b, m = new_BxM.shape
  cap = state.tokens.shape[1]
  running = ~state.done
  n = state.num_generated
  j = jnp.arange(m, dtype=jnp.int32)[None, :]
  offered = jnp.where(running, count_B, 0)  # [B]
  valid = j < offered[:, None]
  is_eos = _isin(new_BxM, stop.eos_ids) & valid
  is_stop = _isin(new_BxM, stop.stop_ids) & valid
  hit = is_eos | is_stop
  first_hit = jnp.min(jnp.where(hit, j, m), axis=1)  # m when none
  room_length = stop.max_new_tokens - n
  cache_len = state.cache.max_len
  room_cache = cache_len - state.prompt_lengths - n
  upto_stop = jnp.where(first_hit < m, first_hit + 1, offered)
  kept = jnp.maximum(jnp.minimum(jnp.minimum(upto_stop, room_length),
                                 jnp.minimum(offered, room_cache)), 0)

  # Scatter the kept tokens to slots n .. n + kept - 1; anything else goes out of range and is
  # dropped (static shapes: every row "writes").
  dest = jnp.where(j < kept[:, None], n[:, None] + j, cap)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, m))
  tokens = state.tokens.at[rows, dest].set(new_BxM.astype(jnp.int32), mode="drop")
  n_new = n + kept

  at_hit = jnp.minimum(first_hit, m - 1)[:, None]
  stopped_on = jnp.take_along_axis(jnp.where(is_eos, EOS, STOP), at_hit, axis=1)[:, 0]
  took_stop = (first_hit < m) & (first_hit < kept)
  reason = jnp.where(took_stop, stopped_on,
                     jnp.where(n_new >= stop.max_new_tokens, LENGTH,
                               jnp.where(state.prompt_lengths + n_new >= cache_len,
                                         CACHE_FULL, 0)))
  newly_done = running & (reason > 0)
  last = jnp.take_along_axis(new_BxM, jnp.maximum(kept - 1, 0)[:, None], axis=1)[:, 0]
  return state.replace(
      tokens=tokens, num_generated=n_new,
      done=state.done | newly_done,
      finish=jnp.where(newly_done, reason, state.finish),
      last_token=jnp.where(running & (kept > 0), last.astype(jnp.int32), state.last_token))


def _isin(x_BxM: jax.Array, ids_E: jax.Array) -> jax.Array:
  return jnp.any((x_BxM[:, :, None] == ids_E[None, None, :]) & (ids_E >= 0)[None, None, :], axis=-1)


# --- the jitted functions --------------------------------------------------------------------


def _prefill_and_first_token(model: LlamaModel, cache_len: int, params, tokens_BxP, lengths_B,
                             active_B, row_ids_B, rng, sampling: SamplingParams,
                             stop: StopCriteria) -> DecodeState:
  TRACE_COUNTS["prefill"] += 1
  logits, _, cache = prefill_forward(model, params, tokens_BxP, lengths_B, cache_len, model.dtype)
  state = init_state(cache, lengths_B, active_B, row_ids_B, rng)
  keys = row_keys(rng, state.row_ids, jnp.zeros((), jnp.int32))
  first = sample(logits, keys, sampling.temperature, sampling.top_k, sampling.top_p)
  return emit_tokens(state, first[:, None], jnp.ones_like(lengths_B), stop)


def _decode_loop(model: LlamaModel, params, state: DecodeState, sampling: SamplingParams,
                 stop: StopCriteria) -> DecodeState:
  TRACE_COUNTS["loop"] += 1
  cache_len = state.cache.max_len

  def cond(s: DecodeState):
    # Per-row rules already mark rows done; the global bounds keep a bug from running away.
    return (jnp.any(~s.done) & (s.step + 1 < stop.max_new_tokens)
            & jnp.all(s.cache.lengths < cache_len))

  def body(s: DecodeState):
    running = ~s.done
    lengths = s.cache.lengths
    mask = cache_causal_mask(lengths, 1, cache_len)
    # Done rows still run (static shapes): they write one K/V entry at their uncommitted slot
    # `length` and keep their length, so nothing they wrote is ever read.
    logits, _, cache = model.apply({"params": params}, s.last_token[:, None], lengths[:, None],
                                   s.cache, mask)
    cache = cache.with_lengths(lengths + running.astype(jnp.int32))
    step = s.step + 1
    keys = row_keys(s.rng, s.row_ids, step)
    tok = sample(logits[:, 0], keys, sampling.temperature, sampling.top_k, sampling.top_p)
    s = s.replace(step=step, cache=cache,
                  steps_per_row=s.steps_per_row + running.astype(jnp.int32))
    return emit_tokens(s, tok[:, None], running.astype(jnp.int32), stop)

  return jax.lax.while_loop(cond, body, state)


@dataclasses.dataclass
class BatchOutput:
  """Host-side results of one batch (numpy), plus wall times. Any engine's `run` returns one."""
  tokens: np.ndarray  # int32 [B, S]
  num_generated: np.ndarray  # int32 [B]
  steps: np.ndarray  # int32 [B]
  finish: np.ndarray  # int32 [B]
  prefill_s: float = 0.0
  run_s: float = 0.0  # prefill + loop
  compile_s: float = 0.0  # 0 when the executables were reused
  extra: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per-row mode stats


def _signature(tree) -> Tuple:
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))


class AutoregressiveEngine:
  """Compiles (ahead of time, once per shape signature) and runs batches for one model config.

  Compiled executables are cached by (params signature, batch, padded prompt length, cache
  length, stop-id buffer sizes), so a second call with other traced values reuses them.
  """

  def __init__(self, cfg: ModelConfig, dtype=jnp.float32):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.model = LlamaModel(cfg, dtype=self.dtype, param_dtype=self.dtype)
    self._compiled: Dict[Tuple, Any] = {}

  def _executables(self, params, tokens, lengths, active, row_ids, rng, sampling, stop,
                   cache_len: int):
    key = (_signature(params), tokens.shape, cache_len, stop.eos_ids.shape, stop.stop_ids.shape)
    if key in self._compiled:
      return self._compiled[key], 0.0
    t0 = time.perf_counter()
    model = self.model
    prefill = jax.jit(lambda *a: _prefill_and_first_token(model, cache_len, *a))
    loop = jax.jit(lambda *a: _decode_loop(model, *a), donate_argnums=(1,))
    args = (params, tokens, lengths, active, row_ids, rng, sampling, stop)
    prefill_exe = prefill.lower(*args).compile()
    state_shape = jax.eval_shape(prefill, *args)
    loop_exe = loop.lower(params, state_shape, sampling, stop).compile()
    self._compiled[key] = (prefill_exe, loop_exe)
    return self._compiled[key], time.perf_counter() - t0

  def run(self, params, tokens_BxP: np.ndarray, lengths_B: np.ndarray, active_B: np.ndarray,
          row_ids_B: np.ndarray, sampling: SamplingParams, stop: StopCriteria, seed: int,
          cache_len: int) -> BatchOutput:
    """Prefill + decode one padded batch; times the run separately from compilation."""
    tokens = jnp.asarray(tokens_BxP, jnp.int32)
    lengths = jnp.asarray(lengths_B, jnp.int32)
    active = jnp.asarray(active_B, bool)
    row_ids = jnp.asarray(row_ids_B, jnp.int32)
    rng = jax.random.key(seed)
    (prefill_exe, loop_exe), compile_s = self._executables(
        self._check_params(params), tokens, lengths, active, row_ids, rng, sampling, stop, cache_len)
    t0 = time.perf_counter()
    state = prefill_exe(params, tokens, lengths, active, row_ids, rng, sampling, stop)
    jax.block_until_ready(state.tokens)
    t1 = time.perf_counter()
    state = loop_exe(params, state, sampling, stop)
    out = jax.device_get((state.tokens, state.num_generated, state.steps_per_row, state.finish))
    t2 = time.perf_counter()
    return BatchOutput(*(np.asarray(x) for x in out), prefill_s=t1 - t0, run_s=t2 - t0,
                       compile_s=compile_s)

  def _check_params(self, params):
    embed = params["embed_tokens"]["embedding"]
    if tuple(embed.shape) != (self.cfg.vocab_size, self.cfg.hidden_size):
      raise ValueError(f"params have an embedding of shape {tuple(embed.shape)}, but the model "
                       f"config implies {(self.cfg.vocab_size, self.cfg.hidden_size)}")
    return params


__all__ = ["AutoregressiveEngine", "BatchOutput", "DecodeState", "StopCriteria", "FINISH_REASONS",
           "TRACE_COUNTS", "emit_tokens", "init_state", "prefill_forward"]
