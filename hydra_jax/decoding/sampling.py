"""Next-token sampling: temperature, top-k and top-p (nucleus), all as traced scalars.

Changing any knob never recompiles: temperature 0 selects greedy argmax through a traced
`lax.cond`, top-k uses a sort with a traced k (0 = off), top-p a cumulative sum over the same
sort (1.0 = off). `process_logits` returns the exact distribution that `sample` draws from, so
lossless speculative sampling can compare draft and target distributions with it.

Legend: B batch rows, V vocab.
"""

from __future__ import annotations

import math
from typing import Union

import flax
import jax
import jax.numpy as jnp

Scalar = Union[float, int, jax.Array]


@flax.struct.dataclass
class SamplingParams:
  """The three knobs as traced scalars (a pytree, so it passes through jit without recompiles)."""
  temperature: jax.Array  # f32 []; 0 = greedy
  top_k: jax.Array  # int32 []; 0 = off
  top_p: jax.Array  # f32 []; 1.0 = off

  @classmethod
  def make(cls, temperature: Scalar = 0.0, top_k: Scalar = 0, top_p: Scalar = 1.0):
    check_sampling_args(temperature, top_k, top_p)
    return cls(temperature=jnp.asarray(temperature, jnp.float32),
               top_k=jnp.asarray(top_k, jnp.int32), top_p=jnp.asarray(top_p, jnp.float32))


def check_sampling_args(temperature, top_k, top_p) -> None:
  """Host-side validation of concrete knob values (traced values are not checked)."""
  if isinstance(temperature, jax.core.Tracer) or isinstance(top_k, jax.core.Tracer) or \
      isinstance(top_p, jax.core.Tracer):
    return
  if not math.isfinite(float(temperature)) or float(temperature) < 0:
    raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                     f"{float(temperature)}")
  if int(top_k) < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off), got {int(top_k)}")
  if not 0.0 < float(top_p) <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {float(top_p)}")


def _filter_sorted(scaled_BxV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Masks scaled logits to the top-k, then to the nucleus of what remains, with one sort."""
  vocab = scaled_BxV.shape[-1]
  sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)  # descending
  k = jnp.where(top_k <= 0, vocab, jnp.minimum(top_k, vocab))
  rank = jnp.arange(vocab)[None, :]
  in_top_k = rank < k
  # Nucleus over the top-k renormalised distribution (the order HF's warpers use): a sorted
  # token stays when the mass strictly before it is < p, which keeps the smallest prefix whose
  # mass reaches p, and always the most likely token.
  probs = jax.nn.softmax(jnp.where(in_top_k, sorted_BxV, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = in_top_k & ((mass_before < top_p) | (rank == 0))
  num_kept = jnp.sum(keep_sorted, axis=-1)  # >= 1, the kept set is a sorted prefix
  threshold = jnp.take_along_axis(sorted_BxV, (num_kept - 1)[:, None], axis=-1)  # [B, 1]
  # Compare in the unsorted layout instead of scattering back; exact ties at the boundary are
  # kept together (order-independent, as HF does for top-k).
  return jnp.where(scaled_BxV >= threshold, scaled_BxV, -jnp.inf)


ARGMAX_BLOCK = 256  # vocab entries per block of `vocab_argmax`


def vocab_argmax(logits_xV: jax.Array) -> jax.Array:
  """jnp.argmax over the last (vocabulary) axis, int32: the first maximal index, NaN ranked
  highest, exactly as jnp.argmax, computed in two short steps: the argmax of the per-block
  maxima, then the argmax inside the winning block.

  Why: XLA:CPU runs an argmax (a reduce of value-index pairs) over a long axis about ten times
  slower than a plain max; SmolLM2's 49,152 logits took 0.22 ms per row, ~0.9 ms for a
  four-token verify. The block maxima are a plain max, and the pair reduces left are short
  (`benchmarks/bench_argmax.py`). The first maximal block holds the first maximal index, so
  the result is identical (NaN: the first NaN block, then its first NaN).
  """
  v = logits_xV.shape[-1]
  if v <= ARGMAX_BLOCK:
    return jnp.argmax(logits_xV, axis=-1).astype(jnp.int32)
  blocks = -(-v // ARGMAX_BLOCK)
  pad = blocks * ARGMAX_BLOCK - v
  x = logits_xV
  if pad:  # -inf never beats a real logit; an all -inf row still gives index 0, as argmax
    x = jnp.concatenate([x, jnp.full(x.shape[:-1] + (pad,), -jnp.inf, x.dtype)], axis=-1)
  x = x.reshape(x.shape[:-1] + (blocks, ARGMAX_BLOCK))
  # XLA:CPU's vectorised max can drop a NaN, so a block holding one is marked NaN explicitly.
  block_max = jnp.where(jnp.any(jnp.isnan(x), axis=-1), jnp.nan, jnp.max(x, axis=-1))
  block = jnp.argmax(block_max, axis=-1)  # [...]
  inside = jnp.take_along_axis(x, block[..., None, None], axis=-2)[..., 0, :]
  return (block * ARGMAX_BLOCK + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def process_logits(logits_BxV: jax.Array, temperature: Scalar, top_k: Scalar = 0,
                   top_p: Scalar = 1.0) -> jax.Array:
  """f32 logits of the distribution `sample` draws from: temperature-scaled, -inf outside the
  kept set. At temperature 0 this is the greedy point mass (0 at the argmax, -inf elsewhere).
  """
  logits = logits_BxV.astype(jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  filtered = jax.lax.cond((top_k > 0) | (top_p < 1.0),
                          lambda x: _filter_sorted(x, top_k, top_p), lambda x: x, scaled)
  greedy = jnp.arange(logits.shape[-1])[None, :] == vocab_argmax(logits)[:, None]
  point_mass = jnp.where(greedy, 0.0, -jnp.inf)
  return jnp.where(temperature > 0, filtered, point_mass)


def sample(logits_BxV: jax.Array, rng, temperature: Scalar = 0.0, top_k: Scalar = 0,
           top_p: Scalar = 1.0) -> jax.Array:
  """Draws one token per row: int32 [B].

  `rng` is one key (split across rows), a batch of B keys (one per row, so that a row's draws
  do not depend on which other rows share its batch), or a function returning either: it is
  then called only when sampling, so greedy decoding never derives keys (a threefry hash per
  row and step) inside a decode loop.
  """
  b = logits_BxV.shape[0]

  def draw(x):
    keys = rng() if callable(rng) else rng
    if _is_batched(keys):
      if keys.shape[0] != b:
        raise ValueError(f"sample got {keys.shape[0]} keys for {b} rows")
    else:
      keys = jax.random.split(keys, b)
    processed = process_logits(x, temperature, top_k, top_p)
    return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, processed)

  def greedy(x):
    return vocab_argmax(x)

  # A traced select of one branch: greedy decoding pays for no sort and no random draw.
  tokens = jax.lax.cond(jnp.asarray(temperature, jnp.float32) > 0, draw, greedy,
                        logits_BxV.astype(jnp.float32))
  return tokens.astype(jnp.int32)


def _is_batched(rng: jax.Array) -> bool:
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim == 1
  return rng.ndim == 2  # raw uint32 keys [B, 2]


def row_keys(seed_key: jax.Array, row_ids_B: jax.Array, index) -> jax.Array:
  """Keys [B]: output index `index` (a scalar or per row [B]) of prompt row_ids_B[b].

  fold_in(fold_in(seed, row id), index): a row's draws depend on neither its batch nor the
  decoding mode, so speculative sampling can use the keys autoregressive sampling uses.
  """
  index_B = jnp.broadcast_to(jnp.asarray(index, jnp.int32), row_ids_B.shape)
  return jax.vmap(lambda r, i: jax.random.fold_in(jax.random.fold_in(seed_key, r), i))(
      row_ids_B, index_B)


__all__ = ["ARGMAX_BLOCK", "SamplingParams", "check_sampling_args", "process_logits", "sample",
           "row_keys", "vocab_argmax"]
