"""What both decode loops share: the carried state, the stop rules, prefill and emission.

Autoregressive and speculative decoding differ only in how a step proposes tokens. Everything
else is here, once: the prompt forward (`prefill`), the output buffer and its stop rules
(`emit_tokens`: EOS / stop ids, max_new_tokens, cache room, one finish-code scheme), the
first token, and the loop bound (`keep_running`). Static shapes throughout: the batch, the
padded prompt length P, the cache length S and the output buffer (S tokens per row) are fixed;
max_new_tokens, stop ids, the seed and the sampling knobs are traced.

Length contract: a row's prompt plus its output never exceed the cache length S, and a step
that writes `reserve` cache entries (1 for a token, the tree size for a verify) only runs
while they fit; a row that runs out of room stops with finish reason "cache_full".

Legend: B batch rows, P padded prompt length, S cache slots, D model width, V vocab,
M tokens emitted at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding.sampling import row_keys, sample
from hydra_jax.model.kv_cache import KVCache, init_cache
from hydra_jax.model.llama import LlamaModel
from hydra_jax.model.masks import cache_causal_mask

# Finish reasons by code; 0 = still running (or a padding row that never ran).
FINISH_REASONS = ("running", "eos", "stop", "length", "cache_full")
EOS, STOP, LENGTH, CACHE_FULL = 1, 2, 3, 4


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
  """What a decode loop carries. `step` counts base forwards after prefill (all rows)."""
  step: jax.Array  # int32 []
  done: jax.Array  # bool [B]
  tokens: jax.Array  # int32 [B, S]: output buffer, new tokens only
  num_generated: jax.Array  # int32 [B]
  steps_per_row: jax.Array  # int32 [B]: base forwards after prefill while the row ran
  finish: jax.Array  # int32 [B]: FINISH_REASONS code
  last_token: jax.Array  # int32 [B]: the last emitted token (the next one to feed)
  prompt_lengths: jax.Array  # int32 [B]
  row_ids: jax.Array  # int32 [B]: the prompt's index in the caller's list (seeds its draws)
  cache: KVCache
  rng: jax.Array  # the seed key; per-row, per-index keys are folded from it
  spec: Any = None  # the speculative loop's extra carry (speculative.SpecCarry), else None


def prefill(model: LlamaModel, params, tokens_BxP: jax.Array, lengths_B: jax.Array,
            cache_len: int, all_hidden: bool = False):
  """Runs right-padded prompts into a fresh cache of `cache_len` slots.

  Returns (logits at each row's last prompt token [B, V] f32, hidden states after the final
  norm: at the last prompt token [B, D], or at every position [B, P, D] with all_hidden, and
  the cache with each row's length committed). The LM head runs on the last positions only:
  [B, V], never [B, P, V]. Padding slots beyond a row's length hold garbage that is masked out
  and later overwritten.
  """
  b, p = tokens_BxP.shape
  cache = init_cache(model.cfg, b, cache_len, model.dtype)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :], (b, p))
  mask = cache_causal_mask(cache.lengths, p, cache_len)
  _, hidden, cache = model.apply({"params": params}, tokens_BxP, positions, cache, mask,
                                 return_logits=False)
  last = jnp.take_along_axis(hidden, (lengths_B - 1)[:, None, None], axis=1)  # [B, 1, D]
  logits = model.apply({"params": params}, last, method=LlamaModel.logits)[:, 0]
  return logits, (hidden if all_hidden else last[:, 0]), cache.with_lengths(lengths_B)


def first_state(cache: KVCache, logits_BxV: jax.Array, lengths_B, active_B, row_ids_B, rng,
                sampling, stop: StopCriteria, reserve: int = 1, spec=None) -> DecodeState:
  """The state after prefill: output index 0 drawn from the prompt's last logits and emitted.

  Inactive (padding) rows start done and never run. `reserve`: cache entries one loop step
  writes (see `emit_tokens`).
  """
  b, s = cache.batch_size, cache.max_len
  zeros = jnp.zeros((b,), jnp.int32)
  state = DecodeState(step=jnp.zeros((), jnp.int32), done=~active_B,
                      tokens=jnp.zeros((b, s), jnp.int32), num_generated=zeros,
                      steps_per_row=zeros, finish=zeros, last_token=zeros,
                      prompt_lengths=lengths_B.astype(jnp.int32),
                      row_ids=row_ids_B.astype(jnp.int32), cache=cache, rng=rng, spec=spec)
  first = sample(logits_BxV, lambda: row_keys(rng, state.row_ids, 0), sampling.temperature,
                 sampling.top_k, sampling.top_p)
  return emit_tokens(state, first[:, None], jnp.ones_like(lengths_B), stop, reserve)


def emit_tokens(state: DecodeState, new_BxM: jax.Array, count_B: jax.Array, stop: StopCriteria,
                reserve: int = 1) -> DecodeState:
  """Appends the first count[b] of new[b] to each running row's output, applying stop rules.

  A row keeps tokens up to and including its first EOS / stop id, at most max_new_tokens in
  total, and at most as many as keep prompt + output within the cache length S. It is then
  done when it stopped, reached max_new_tokens, or has no room for another step: the output
  fills the cache, or the next step's `reserve` entries (written from slot prompt + output - 1,
  the last token's) would not fit. Rows that are done take nothing (their count is ignored).
  """
  b, m = new_BxM.shape
  cap = state.tokens.shape[1]
  cache_len = state.cache.max_len
  running = ~state.done
  n = state.num_generated
  j = jnp.arange(m, dtype=jnp.int32)[None, :]
  offered = jnp.where(running, count_B, 0)  # [B]
  valid = j < offered[:, None]
  is_eos = _isin(new_BxM, stop.eos_ids) & valid
  is_stop = _isin(new_BxM, stop.stop_ids) & valid
  first_hit = jnp.min(jnp.where(is_eos | is_stop, j, m), axis=1)  # m when none
  room_length = stop.max_new_tokens - n
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
  used = state.prompt_lengths + n_new
  no_room = (used >= cache_len) | (used - 1 + reserve > cache_len)
  reason = jnp.where(took_stop, stopped_on,
                     jnp.where(n_new >= stop.max_new_tokens, LENGTH,
                               jnp.where(no_room, CACHE_FULL, 0)))
  newly_done = running & (reason > 0)
  last = jnp.take_along_axis(new_BxM, jnp.maximum(kept - 1, 0)[:, None], axis=1)[:, 0]
  return state.replace(
      tokens=tokens, num_generated=n_new,
      done=state.done | newly_done,
      finish=jnp.where(newly_done, reason, state.finish),
      last_token=jnp.where(running & (kept > 0), last.astype(jnp.int32), state.last_token))


def _isin(x_BxM: jax.Array, ids_E: jax.Array) -> jax.Array:
  return jnp.any((x_BxM[:, :, None] == ids_E[None, None, :]) & (ids_E >= 0)[None, None, :], axis=-1)


def keep_running(state: DecodeState, stop: StopCriteria, reserve: int = 1) -> jax.Array:
  """The loop condition of both loops.

  Per-row rules already mark rows done; the global bounds keep a bug from running away: every
  step emits >= 1 token per running row, so no row needs more than max_new_tokens - 1 steps
  after prefill, and no running row may step without room for its `reserve` entries.
  """
  fits = state.done | (state.cache.lengths + reserve <= state.cache.max_len)
  return jnp.any(~state.done) & (state.step + 1 < stop.max_new_tokens) & jnp.all(fits)


@dataclasses.dataclass
class BatchOutput:
  """Host-side results of one batch (numpy), plus wall times."""
  tokens: np.ndarray  # int32 [B, S]
  num_generated: np.ndarray  # int32 [B]
  steps: np.ndarray  # int32 [B]
  finish: np.ndarray  # int32 [B]
  prefill_s: float = 0.0
  run_s: float = 0.0  # prefill + loop
  compile_s: float = 0.0  # 0 when the executables were reused
  extra: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per-row mode stats


__all__ = ["BatchOutput", "CACHE_FULL", "DecodeState", "EOS", "FINISH_REASONS", "LENGTH", "STOP",
           "StopCriteria", "emit_tokens", "first_state", "keep_running", "prefill"]
