"""Why a speculative output differs from autoregressive decoding: a near-tie, or a real mismatch.

In f32 the tree forward and the one-token forward pick the same greedy tokens (the parity
tests hold them to it). In bf16 they round differently (other matmul shapes, other
accumulation orders), so where the base's two best logits are closer than that rounding, the
two loops can pick different tokens, and the outputs part from there on. Nothing is wrong with
either: both tokens are the argmax of a correctly computed bf16 forward.

Each difference is judged at its first differing position p, where both loops saw the same
prefix (prompt + AR output[:p]); the speculative token there is the argmax of the tree
forward's logits (an accepted draft equals it, and so does the bonus). The rule:

  gap       logits[AR token] - logits[spec token] at p, from one full forward over the prefix
            in the run's dtype (a third rounding of the same numbers)
  rounding  max |logits_dtype - logits_f32| over the 8 best tokens at p, logits_f32 being the
            same forward in f32 over the same (already rounded) weights: how far the logits
            themselves move under the dtype's rounding at that position
  tie       |gap| <= 4 * rounding. Why 4: take each forward's logits to be within `rounding`
            of the f32 values, per logit. Then any two forwards' differences
            logits[a] - logits[s] agree within 4 * rounding, so the speculative forward can
            rank s above a (and the AR forward a above s) only if |gap| <= 4 * rounding.
            In f32 rounding is 0, so any f32 difference is a real mismatch.
            `rounding` is measured on one forward at p and stands for all three; a second bf16
            implementation (transformers' in bf16, tests/test_tie_check.py) lands within it.
  or reproduced (not in f32): `rounding` is one forward's estimate and can come out low. So
            a difference outside 4x is also a tie when a plain causal bf16 decode of the
            verify's shape picks the speculative token: the generated tokens forwarded k at a
            time over the KV cache (the same attention path as tree verification). k is first
            the method's own verify size (its tree's node count: the row count of the forward
            that picked the speculative token), then each of CHUNK_SIZES (2, 4, 8, 16: one per
            row-count class seen so far; k = 1 is autoregressive decoding itself, which picked
            the AR token, so it is not tried). Each k is a compile per padded length, which
            accelerators pay dearly for: the earlier k = 2 .. 16 was fifteen of them per
            padded length, the likely (unconfirmed) reason a 30-turn bf16 bench on an H200
            ran past its time limit.
            Then s is the argmax of a correctly computed bf16 decode, which is what a tie
            means; a wrong token is not reproduced (tests/test_tie_check.py), and the chunked
            decode equals the full forward in f32. Measured on SmolLM2 in bf16 (AMD EPYC, one
            thread): at a position with gap 0.096 and rounding 0.020 (4.8x), chunks of 2-7
            tokens give gap -0.007 (the speculative token), chunks of 1 and of 8-16 give
            +0.096: XLA:CPU's bf16 matmul rounds by row-count class.

Legend: T sequence length (padded), V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding.engine import wants_tied_head_copy
from hydra_jax.model.kv_cache import init_cache
from hydra_jax.model.llama import LlamaModel, with_tied_head_copy
from hydra_jax.model.masks import cache_causal_mask

PAD_TO = 128  # prefixes are padded to a multiple of this: one compile per bucket, not per length
ROUNDING_TOP = 8  # the logits whose rounding is measured: the contenders at p
TIE_FACTOR = 4.0  # |gap| <= TIE_FACTOR * rounding is a tie (the module docstring says why)
# Chunk sizes the reproduction tries after the method's own verify size: one per row-count
# class of the kernels seen (XLA:CPU bf16: 2-7 and 8-16 round apart), up to the biggest
# fitted trees. One compile each per padded length, so a few, not every size.
CHUNK_SIZES = (2, 4, 8, 16)


@dataclasses.dataclass
class Difference:
  position: int  # first differing output index
  ar_token: int
  spec_token: int
  gap: float  # logits[ar] - logits[spec] at p (run dtype)
  top2_margin: float  # top-1 minus top-2 logit at p (run dtype)
  rounding: float  # max |dtype - f32| over the top logits at p
  tie: bool
  reproduced_by_chunk: Optional[int] = None  # k of a chunked decode that picks the spec token

  def to_json(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


class TieChecker:
  """Classifies differences for one model (params in the run's dtype); jitted forwards are
  kept per padded length."""

  def __init__(self, cfg, params, dtype, chunk_sizes: Sequence[int] = CHUNK_SIZES):
    self.dtype = jnp.dtype(dtype)
    self.chunk_sizes = tuple(chunk_sizes)  # tried after the verify size (one compile each)
    self.params = params
    # The forwards in the run's dtype compute as the decode engine's verify does: through a
    # tied LM head's [E, V] copy where the engine reads one (XLA:CPU rounds the two layouts
    # apart in bf16). The f32 reference reads the embedding: its rounding is not at issue.
    self.run_params = (with_tied_head_copy(cfg, params)
                       if wants_tied_head_copy(cfg, self.dtype, multi_row=True) else params)
    self._params_f32 = None  # made on the first bf16 difference: most runs have none
    run = LlamaModel(cfg, dtype=self.dtype, param_dtype=self.dtype)
    ref = LlamaModel(cfg, dtype=jnp.float32, param_dtype=jnp.float32)

    def last_logits(model, p, tokens_1xT, last):
      positions = jnp.arange(tokens_1xT.shape[1], dtype=jnp.int32)[None, :]
      logits, _, _ = model.apply({"params": p}, tokens_1xT, positions)
      return logits[0, last]  # causal: the padding after `last` is never seen

    self._run = jax.jit(lambda p, t, i: last_logits(run, p, t, i))
    self._ref = jax.jit(lambda p, t, i: last_logits(ref, p, t, i))

    def chunked_logits(model, p, tokens_1xT, first, num_chunks, k):
      """Next-token logits after a prefix whose first `first` tokens are prefilled and the
      rest forwarded in `num_chunks` consecutive chunks of k tokens over the KV cache: the
      cache history of a speculative run committing k tokens per step."""
      t = tokens_1xT.shape[1]
      cache = init_cache(cfg, 1, t, model.dtype)
      # The whole padded row is prefilled; slots from `first` on are overwritten by the
      # chunks before any query can see them (the mask stops at each query's own slot).
      _, _, cache = model.apply({"params": p}, tokens_1xT, jnp.arange(t)[None, :], cache,
                                cache_causal_mask(cache.lengths, t, t))
      cache = cache.replace(lengths=jnp.reshape(first, (1,)).astype(jnp.int32))

      def step(i, carry):
        cache, _ = carry
        start = first + i * k
        chunk = jax.lax.dynamic_slice(tokens_1xT, (0, start), (1, k))
        logits, _, cache = model.apply({"params": p}, chunk, (start + jnp.arange(k))[None, :],
                                       cache, cache_causal_mask(cache.lengths, k, t))
        return cache.replace(lengths=cache.lengths + k), logits[0, -1].astype(jnp.float32)

      return jax.lax.fori_loop(0, num_chunks, step,
                               (cache, jnp.zeros((cfg.vocab_size,), jnp.float32)))[1]

    self._chunked = jax.jit(lambda p, x, f, n, k: chunked_logits(run, p, x, f, n, k),
                            static_argnums=4)

  def classify(self, prompt_ids: Sequence[int], ar_ids: Sequence[int],
               spec_ids: Sequence[int], position: int,
               verify_tokens: Optional[int] = None) -> Optional[Difference]:
    """The difference at `position` (the first where ar_ids and spec_ids differ); None where
    one output merely stopped earlier (no token to compare). `verify_tokens`: the tokens one
    verify forward of the method takes (its tree's nodes), the reproduction's first k."""
    if position >= len(ar_ids) or position >= len(spec_ids):
      return None
    prefix = list(prompt_ids) + list(ar_ids[:position])
    t = -(-len(prefix) // PAD_TO) * PAD_TO
    tokens = np.zeros((1, t), np.int32)
    tokens[0, :len(prefix)] = prefix
    last = jnp.int32(len(prefix) - 1)
    logits = np.asarray(self._run(self.run_params, tokens, last), np.float64)
    a, s = int(ar_ids[position]), int(spec_ids[position])
    gap = float(logits[a] - logits[s])
    top = np.argsort(-logits)[:max(ROUNDING_TOP, 2)]
    margin = float(logits[top[0]] - logits[top[1]])
    if self.dtype == jnp.float32:
      rounding = 0.0
    else:
      if self._params_f32 is None:
        self._params_f32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), self.params)
      ref = np.asarray(self._ref(self._params_f32, tokens, last), np.float64)
      contenders = np.unique(np.concatenate([top, [a, s]]))
      rounding = float(np.max(np.abs(logits[contenders] - ref[contenders])))
    tie = abs(gap) <= TIE_FACTOR * rounding
    reproduced = None
    if not tie and self.dtype != jnp.float32:
      sizes = reproduction_sizes(position, verify_tokens, self.chunk_sizes)
      reproduced = next((k for k in sizes if int(
          np.argmax(self.chunked_logits(len(prompt_ids), prefix, k))) == s), None)
    return Difference(position=position, ar_token=a, spec_token=s, gap=gap, top2_margin=margin,
                      rounding=rounding, tie=tie or reproduced is not None,
                      reproduced_by_chunk=reproduced)

  def chunked_logits(self, prompt_len: int, prefix: Sequence[int], k: int) -> np.ndarray:
    """Next-token logits after `prefix` (prompt + generated tokens), the generated part
    forwarded k tokens at a time over the KV cache, the last chunk ending at the prefix's
    end (its remainder modulo k is prefilled with the prompt). Needs k <= generated."""
    generated = len(prefix) - prompt_len
    if not 1 <= k <= generated:
      raise ValueError(f"chunk size {k} must be in 1 .. {generated} (the generated tokens)")
    t = -(-len(prefix) // PAD_TO) * PAD_TO
    tokens = np.zeros((1, t), np.int32)
    tokens[0, :len(prefix)] = prefix
    first = prompt_len + generated % k
    return np.asarray(self._chunked(self.run_params, tokens, jnp.int32(first),
                                    jnp.int32(generated // k), k), np.float64)


def reproduction_sizes(position: int, verify_tokens: Optional[int] = None,
                       chunk_sizes: Sequence[int] = CHUNK_SIZES) -> List[int]:
  """The chunk sizes tried at `position`, in order: the verify size, then `chunk_sizes`; from
  k = 2 (k = 1 is the AR decode that picked the AR token) up to the generated tokens."""
  sizes = ([verify_tokens] if verify_tokens else []) + list(chunk_sizes)
  return [k for i, k in enumerate(sizes) if 2 <= k <= position and k not in sizes[:i]]


__all__ = ["CHUNK_SIZES", "Difference", "TIE_FACTOR", "TieChecker", "reproduction_sizes"]
