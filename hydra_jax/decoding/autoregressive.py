"""Autoregressive decoding: prefill, then a `lax.while_loop` of one-token steps.

Both jitted halves are built from `state`: `prefill` + `first_state` emit output index 0, and
each loop step feeds every row's last token, samples output index num_generated with the
row's key, and hands it to `emit_tokens`. `engine.DecodeEngine` compiles and runs them.

Legend: B batch rows, P padded prompt length, S cache slots, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hydra_jax.decoding.sampling import row_keys, sample
from hydra_jax.decoding.state import DecodeState, StopCriteria, emit_tokens, first_state, \
    keep_running, prefill
from hydra_jax.model.llama import LlamaModel
from hydra_jax.model.masks import cache_causal_mask


def ar_prefill(model: LlamaModel, cache_len: int, params, tokens_BxP, lengths_B, active_B,
               row_ids_B, rng, sampling, stop: StopCriteria) -> DecodeState:
  logits, _, cache = prefill(model, params, tokens_BxP, lengths_B, cache_len)
  return first_state(cache, logits, lengths_B, active_B, row_ids_B, rng, sampling, stop)


def ar_step(model: LlamaModel, params, s: DecodeState, sampling, stop: StopCriteria
            ) -> DecodeState:
  running = ~s.done
  lengths = s.cache.lengths
  mask = cache_causal_mask(lengths, 1, s.cache.max_len)
  # Done rows still run (static shapes): they write one K/V entry at their uncommitted slot
  # `length` and keep their length, so nothing they wrote is ever read.
  logits, _, cache = model.apply({"params": params}, s.last_token[:, None], lengths[:, None],
                                 s.cache, mask)
  cache = cache.with_lengths(lengths + running.astype(jnp.int32))
  tok = sample(logits[:, 0], lambda: row_keys(s.rng, s.row_ids, s.num_generated),
               sampling.temperature, sampling.top_k, sampling.top_p)
  s = s.replace(step=s.step + 1, cache=cache,
                steps_per_row=s.steps_per_row + running.astype(jnp.int32))
  return emit_tokens(s, tok[:, None], running.astype(jnp.int32), stop)


def ar_loop(model: LlamaModel, params, state: DecodeState, sampling, stop: StopCriteria
            ) -> DecodeState:
  return jax.lax.while_loop(lambda s: keep_running(s, stop),
                            lambda s: ar_step(model, params, s, sampling, stop), state)


__all__ = ["ar_loop", "ar_prefill", "ar_step"]
