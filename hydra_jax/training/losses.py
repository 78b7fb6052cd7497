"""Head-distillation losses and accuracies, chunked over the sequence.

For head k at position t the target is token t+k+2 (weighted by loss_mask[t+k+2], 0 past the
end). The hard loss is cross-entropy against that token; the teacher loss (Hydra++) is the
soft cross-entropy against softmax(base logits at t+k+1), the base model's own distribution
for token t+k+2, in f32. Each head's loss is a masked mean; heads are combined with per-head
weights (equal, or 0.8**k).

Memory: the vocab-wide buffers are what matter (V ~ 32k-128k). The loop runs over T-chunks
(lax.scan), and inside a chunk over heads; the chunk body and each head's part are
rematerialised (jax.checkpoint), so the largest live logits buffers are one head's f32
[B, C, V] and the base model's [B, C + K - 1, V] for that chunk. f32 [B, T, V] is never
built, for any head. The base LM head runs once per chunk (with a K - 1 halo), not once per
head. Everything is returned as per-head SUMS with their weight sums, so that means over
many batches, devices or eval passes are exact.

Heads with a draft vocabulary (`draft_ids`, V' token ids) have V'-wide logits. A target
outside it can never be proposed: it is left out of the hard loss and the accuracies (weight
0; "weight" counts what is left), the teacher distribution is the base's renormalised over
the V' tokens, and the "vs base" accuracies still compare with the base's argmax over the
FULL vocabulary (a base argmax outside V' counts as a miss: that is what decoding sees).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LOSS_KINDS = ("hard", "teacher", "both")
# Eval counts where the base's greedy token sits among each head's candidates, ranks
# 0..EVAL_RANKS-1: the per-rank accuracies a tree's expected accept length needs
# (mc_sim_7b_63 uses ranks up to 9).
EVAL_RANKS = 10
HEAD_WEIGHTS = ("equal", "decay")


def head_loss_weights(kind: str, num_heads: int) -> np.ndarray:
  """Per-head loss weights: 'equal' (1 each, summed, as Hydra) or 'decay' (0.8**k, Medusa)."""
  if kind == "equal":
    return np.ones((num_heads,), np.float32)
  if kind == "decay":
    return (0.8 ** np.arange(num_heads)).astype(np.float32)
  raise ValueError(f"train.head_weights must be one of {HEAD_WEIGHTS}, got {kind!r}")


def shift_targets(tokens_BxT: jax.Array, loss_mask_BxT: jax.Array, num_heads: int):
  """Targets and weights for every head: [K, B, T] int32 and f32.

  targets[k, b, t] = tokens[b, t+k+2], weights[k, b, t] = loss_mask[b, t+k+2], and weight 0
  (target 0) where t+k+2 >= T.
  """
  b, t = tokens_BxT.shape
  targets, weights = [], []
  for k in range(num_heads):
    s = k + 2
    pad = min(s, t)
    targets.append(jnp.concatenate(
        [tokens_BxT[:, s:].astype(jnp.int32), jnp.zeros((b, pad), jnp.int32)], axis=1))
    weights.append(jnp.concatenate(
        [loss_mask_BxT[:, s:].astype(jnp.float32), jnp.zeros((b, pad), jnp.float32)], axis=1))
  return jnp.stack(targets), jnp.stack(weights)


def _rank(logits_xV: jax.Array, ref_logit_x: jax.Array) -> jax.Array:
  """How many vocab entries score strictly higher than the reference token (0 = top-1)."""
  return jnp.sum(logits_xV > ref_logit_x[..., None], axis=-1)


def _pick(logits_xV: jax.Array, ids_x: jax.Array) -> jax.Array:
  # A one-hot contraction instead of a gather: it stays local when V is sharded.
  return jnp.sum(logits_xV * jax.nn.one_hot(ids_x, logits_xV.shape[-1], dtype=logits_xV.dtype),
                 axis=-1)


def _head_sums(head_logits_fn, k: int, teacher: bool, evaluation: bool, to_draft,
               base_in_draft: bool, feats_BxCxD, targets_BxC, weights_BxC, base_logits_BxCxV):
  """Masked SUMS for one head on one chunk: weight, hard CE, (soft CE), accuracies.

  to_draft: None, or (int32 [V] token id -> draft index or -1, int32 [V'] draft ids).
  base_in_draft: base_logits_BxCxV holds the draft vocabulary's columns only ([B, C, V']).
  """
  logits = head_logits_fn(k, feats_BxCxD).astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  w = w_all = weights_BxC  # w: positions whose target the heads can propose
  if to_draft is not None:
    index_of, draft_ids = to_draft
    targets_BxC = jnp.take(index_of, targets_BxC)
    w = w * (targets_BxC >= 0)
    targets_BxC = jnp.maximum(targets_BxC, 0)
  tgt_logit = _pick(logits, targets_BxC)
  out = {"weight": jnp.sum(w), "hard": jnp.sum(w * (logz - tgt_logit))}
  rank = jax.lax.stop_gradient(_rank(logits, tgt_logit))
  out["top1"] = jnp.sum(w * (rank < 1))
  if teacher:
    teacher_logits = jax.lax.stop_gradient(base_logits_BxCxV).astype(jnp.float32)
    if to_draft is not None and not base_in_draft:
      teacher_logits = jnp.take(teacher_logits, to_draft[1], axis=-1)
    p = jax.nn.softmax(teacher_logits, axis=-1)
    # -sum_v p_v log q_v = logsumexp(z) - sum_v p_v z_v, since sum_v p_v = 1.
    out["soft"] = jnp.sum(w * (logz - jnp.sum(p * logits, axis=-1)))
  if evaluation:
    out["top5"] = jnp.sum(w * (rank < 5))
    base_ids = jnp.argmax(base_logits_BxCxV, axis=-1)
    if to_draft is None:
      base_rank = _rank(logits, _pick(logits, base_ids))
    else:  # the base's full-vocabulary argmax; outside the draft vocab it is a miss
      base_idx = jnp.take(to_draft[0], base_ids)
      base_rank = jnp.where(base_idx >= 0,
                            _rank(logits, _pick(logits, jnp.maximum(base_idx, 0))), EVAL_RANKS)
    # Against the base's argmax: every position counts (w_all), a miss where V' lacks it.
    out["base_top1"] = jnp.sum(w_all * (base_rank < 1))
    out["base_top5"] = jnp.sum(w_all * (base_rank < 5))
    out["base_weight"] = jnp.sum(w_all)
    out["base_rank_counts"] = jnp.sum(
        w_all[..., None] * jax.nn.one_hot(base_rank, EVAL_RANKS, dtype=jnp.float32), axis=(0, 1))
  return out


def head_sums(head_logits_fn: Callable[[int, jax.Array], jax.Array],
              feats: Sequence[jax.Array], targets_KxBxT: jax.Array, weights_KxBxT: jax.Array,
              *, base_hidden_BxTxD: Optional[jax.Array] = None,
              base_logits_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
              chunk: int = 0, teacher: bool = False, evaluation: bool = False,
              constrain: Optional[Callable[[jax.Array, int], jax.Array]] = None,
              draft_ids: Optional[np.ndarray] = None, vocab_size: int = 0,
              base_draft_logits_fn: Optional[Callable[[jax.Array], jax.Array]] = None
              ) -> Dict[str, jax.Array]:
  """Per-head masked sums, each a [K] f32 array, computed chunk by chunk over T.

  head_logits_fn(k, feats_BxCxD) -> f32 [B, C, V]: head k's LM head on a chunk of features.
  feats: K arrays [B, T, D] (head k's features before its LM head).
  base_logits_fn(hidden_BxSxD) -> f32 [B, S, V] and base_hidden_BxTxD: needed when
    `teacher` (soft CE against the base at t+k+1) or `evaluation` (accuracy vs base argmax).
  chunk: T-chunk size (0 or >= T: one chunk). T is zero-padded to a multiple of it.
  constrain(x, batch_dim) -> x: pins the batch dim's sharding of the chunked arrays
    (the train step passes a with_sharding_constraint over the data axes; None = no-op).
  draft_ids: the heads' draft vocabulary (int [V'], of a vocab_size-token base), or None.
  base_draft_logits_fn(hidden_BxSxD) -> f32 [B, S, V']: the base's logits over the draft
    vocabulary only. With draft_ids and without `evaluation` (which needs the base's
    full-vocabulary argmax) the teacher is computed with it: the teacher is renormalised over
    the draft vocabulary anyway, and the other V - V' columns were most of the step's work
    once the base forward comes from a feature cache (SmolLM2: 49152 vs 4096 columns).
  Keys: weight, hard, top1 [, soft] [, top5, base_top1, base_top5, base_rank_counts [K, R]].
  """
  pin = constrain or (lambda x, batch_dim: x)
  num_heads = len(feats)
  b, t = targets_KxBxT.shape[1:]
  need_base = teacher or evaluation
  if need_base and (base_hidden_BxTxD is None or base_logits_fn is None):
    raise ValueError("the teacher loss and eval accuracies need base_hidden and base_logits_fn")
  c = t if chunk <= 0 else min(int(chunk), t)
  n = -(-t // c)
  pad = n * c - t

  def chunks_BxT(x):  # [B, T, ...] -> [n, B, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((x.shape[0], n, c) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  feats_n = tuple(pin(chunks_BxT(pin(f, 0)), 1) for f in feats)
  targets_n = pin(jax.vmap(chunks_BxT, out_axes=1)(targets_KxBxT), 2)  # [n, K, B, C]
  weights_n = pin(jax.vmap(chunks_BxT, out_axes=1)(weights_KxBxT), 2)
  if need_base:
    # Chunk i needs the base at positions i*C + 1 ... i*C + C + K - 1 (head k reads k+1..),
    # so pad T to n*C + K: dynamic_slice would silently clamp a window running off the end.
    halo = c + num_heads - 1
    hidden_pad = pin(jnp.pad(base_hidden_BxTxD, [(0, 0), (0, pad + num_heads), (0, 0)]), 0)

  to_draft = None
  if draft_ids is not None:
    index_of = np.full((vocab_size,), -1, np.int32)
    index_of[np.asarray(draft_ids)] = np.arange(len(draft_ids), dtype=np.int32)
    to_draft = (jnp.asarray(index_of), jnp.asarray(draft_ids, jnp.int32))
  base_in_draft = (to_draft is not None and not evaluation
                   and base_draft_logits_fn is not None)
  base_fn = base_draft_logits_fn if base_in_draft else base_logits_fn
  head_fns = [jax.checkpoint(functools.partial(_head_sums, head_logits_fn, k, teacher,
                                               evaluation, to_draft, base_in_draft))
              for k in range(num_heads)]

  @jax.checkpoint
  def body(carry, xs):
    i, feats_c, targets_c, weights_c = xs
    feats_c = tuple(pin(f, 0) for f in feats_c)
    base = None
    if need_base:
      h = jax.lax.dynamic_slice_in_dim(hidden_pad, i * c + 1, halo, axis=1)
      base = jax.lax.stop_gradient(base_fn(h).astype(jnp.float32))
    sums = []
    for k in range(num_heads):
      base_k = None if base is None else base[:, k:k + c]
      sums.append(head_fns[k](feats_c[k], targets_c[k], weights_c[k], base_k))
    stacked = {key: jnp.stack([s[key] for s in sums]) for key in sums[0]}
    return jax.tree.map(jnp.add, carry, stacked), None

  keys = ["weight", "hard", "top1"] + (["soft"] if teacher else []) + (
      ["top5", "base_top1", "base_top5", "base_weight"] if evaluation else [])
  init = {key: jnp.zeros((num_heads,), jnp.float32) for key in keys}
  if evaluation:
    init["base_rank_counts"] = jnp.zeros((num_heads, EVAL_RANKS), jnp.float32)
  sums, _ = jax.lax.scan(body, init, (jnp.arange(n), feats_n, targets_n, weights_n))
  return sums


def combine_losses(sums: Dict[str, jax.Array], loss_kind: str, head_weights: np.ndarray):
  """(total loss, per-head mean loss [K]) from the sums. Masked means; empty heads give 0."""
  if loss_kind not in LOSS_KINDS:
    raise ValueError(f"train.loss must be one of {LOSS_KINDS}, got {loss_kind!r}")
  weight = sums["weight"]
  denom = jnp.where(weight > 0, weight, 1.0)
  per_head = jnp.zeros_like(weight)
  if loss_kind in ("hard", "both"):
    per_head = per_head + sums["hard"] / denom
  if loss_kind in ("teacher", "both"):
    per_head = per_head + sums["soft"] / denom
  total = jnp.sum(jnp.asarray(head_weights, jnp.float32) * per_head)
  return total, per_head
