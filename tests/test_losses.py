"""Losses against a direct numpy computation; chunked equals unchunked (values and grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax.training import losses

B, T, V, K = 2, 11, 37, 3


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_reference(head_logits, base_logits, tokens, mask):
  """Per-head dicts of masked sums, written loop by loop from the definition."""
  out = []
  for k in range(K):
    s = {n: 0.0 for n in ("weight", "hard", "soft", "top1", "top5", "base_top1", "base_top5")}
    s["base_rank_counts"] = np.zeros(losses.EVAL_RANKS)
    for b in range(B):
      for t in range(T):
        if t + k + 2 >= T:
          continue
        w = float(mask[b, t + k + 2])
        logq = _log_softmax(head_logits[k][b, t].astype(np.float64))
        teacher = np.exp(_log_softmax(base_logits[b, t + k + 1].astype(np.float64)))
        target = tokens[b, t + k + 2]
        order = np.argsort(-head_logits[k][b, t], kind="stable")
        base_top = int(np.argmax(base_logits[b, t + k + 1]))
        s["weight"] += w
        s["hard"] += w * -logq[target]
        s["soft"] += w * -(teacher * logq).sum()
        s["top1"] += w * (target == order[0])
        s["top5"] += w * (target in order[:5])
        s["base_top1"] += w * (base_top == order[0])
        s["base_top5"] += w * (base_top in order[:5])
        rank = int(np.sum(head_logits[k][b, t] > head_logits[k][b, t, base_top]))
        if rank < losses.EVAL_RANKS:
          s["base_rank_counts"][rank] += w
    out.append(s)
  return out


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  head_logits = [rng.normal(0, 2.0, (B, T, V)).astype(np.float32) for _ in range(K)]
  base_logits = rng.normal(0, 2.0, (B, T, V)).astype(np.float32)
  tokens = rng.integers(0, V, (B, T)).astype(np.int32)
  # Make the targets often the argmax so the accuracies are not all zero.
  for k in range(K):
    for b in range(B):
      for t in range(0, T - k - 2, 2):
        head_logits[k][b, t, tokens[b, t + k + 2]] += 8.0
  mask = (rng.random((B, T)) > 0.3).astype(np.float32)
  return head_logits, base_logits, tokens, mask


def _numpy_draft_reference(head_logits, base_logits, tokens, mask, draft):
  """The same sums for heads over a draft vocabulary `draft` (token ids): heads' logits are
  V'-wide; a data target outside it gets weight 0; the teacher is the base renormalised over
  the draft tokens; "vs base" compares with the base's FULL-vocabulary argmax (outside the
  draft: a miss) and weighs every position."""
  index = {int(tok): i for i, tok in enumerate(draft)}
  out = []
  for k in range(K):
    s = {n: 0.0 for n in ("weight", "hard", "soft", "top1", "top5", "base_top1", "base_top5",
                          "base_weight")}
    s["base_rank_counts"] = np.zeros(losses.EVAL_RANKS)
    for b in range(B):
      for t in range(T - k - 2):
        m = float(mask[b, t + k + 2])
        q = head_logits[k][b, t].astype(np.float64)
        logq = _log_softmax(q)
        order = np.argsort(-q, kind="stable")
        target = index.get(int(tokens[b, t + k + 2]))
        w = m if target is not None else 0.0
        teacher = np.exp(_log_softmax(base_logits[b, t + k + 1, draft].astype(np.float64)))
        s["weight"] += w
        if target is not None:
          s["hard"] += w * -logq[target]
          s["top1"] += w * (target == order[0])
          s["top5"] += w * (target in order[:5])
        s["soft"] += w * -(teacher * logq).sum()
        base_top = index.get(int(np.argmax(base_logits[b, t + k + 1])))
        s["base_weight"] += m
        if base_top is not None:
          s["base_top1"] += m * (base_top == order[0])
          s["base_top5"] += m * (base_top in order[:5])
          rank = int(np.sum(q > q[base_top]))
          if rank < losses.EVAL_RANKS:
            s["base_rank_counts"][rank] += m
    out.append(s)
  return out


def test_draft_vocabulary_sums_match_numpy():
  head_logits, base_logits, tokens, mask = _inputs(3)
  draft = np.array([7, 3, 30, 0, 12, 21, 5, 36, 18, 9, 25, 1], np.int32)  # 12 of the 37 ids
  head_logits = [h[..., draft] for h in head_logits]  # heads rank the draft tokens only
  base_logits[0, :, draft[0]] += 9.0  # the base's argmax is in the draft vocab for row 0
  targets, weights = losses.shift_targets(jnp.asarray(tokens), jnp.asarray(mask), K)
  sums = losses.head_sums(
      lambda k, f: f, [jnp.asarray(h) for h in head_logits], targets, weights,
      base_hidden_BxTxD=jnp.asarray(base_logits), base_logits_fn=lambda h: h, chunk=4,
      teacher=True, evaluation=True, draft_ids=draft, vocab_size=V)
  want = _numpy_draft_reference(head_logits, base_logits, tokens, mask, draft)
  for k in range(K):
    assert 0 < want[k]["weight"] < want[k]["base_weight"]  # some targets fall outside
    for name, value in want[k].items():
      np.testing.assert_allclose(np.asarray(sums[name][k]), value, rtol=2e-5, atol=1e-4,
                                 err_msg=f"head {k} {name}")


def test_teacher_over_the_draft_columns_only_matches_the_full_vocabulary():
  """Training (no evaluation) may compute the base's logits over the draft tokens only; the
  renormalised teacher, so every sum, is the one the full-vocabulary path gives."""
  head_logits, base_logits, tokens, mask = _inputs(3)
  draft = np.array([7, 3, 30, 0, 12, 21, 5, 36, 18, 9, 25, 1], np.int32)
  head_logits = [jnp.asarray(h[..., draft]) for h in head_logits]
  targets, weights = losses.shift_targets(jnp.asarray(tokens), jnp.asarray(mask), K)
  seen = []

  def draft_only(h):
    seen.append(h.shape)
    return h[..., draft]

  kw = dict(base_hidden_BxTxD=jnp.asarray(base_logits), base_logits_fn=lambda h: h, chunk=4,
            teacher=True, draft_ids=draft, vocab_size=V)
  full = losses.head_sums(lambda k, f: f, head_logits, targets, weights, **kw)
  narrow = losses.head_sums(lambda k, f: f, head_logits, targets, weights,
                            base_draft_logits_fn=draft_only, **kw)
  assert seen, "the draft-columns function was not used"
  assert set(full) == set(narrow) and "soft" in full
  for name in full:
    np.testing.assert_allclose(np.asarray(narrow[name]), np.asarray(full[name]), rtol=1e-6,
                               err_msg=name)
  want = _numpy_draft_reference([np.asarray(h) for h in head_logits], base_logits, tokens,
                                mask, draft)
  np.testing.assert_allclose(np.asarray(narrow["soft"]), [w["soft"] for w in want], rtol=2e-5)


@pytest.mark.parametrize("chunk", [0, 4])  # 4 does not divide T: padded last chunk
def test_sums_match_numpy(chunk):
  head_logits, base_logits, tokens, mask = _inputs()
  targets, weights = losses.shift_targets(jnp.asarray(tokens), jnp.asarray(mask), K)
  sums = losses.head_sums(
      lambda k, f: f, [jnp.asarray(h) for h in head_logits], targets, weights,
      base_hidden_BxTxD=jnp.asarray(base_logits), base_logits_fn=lambda h: h,
      chunk=chunk, teacher=True, evaluation=True)
  want = _numpy_reference(head_logits, base_logits, tokens, mask)
  for k in range(K):
    for name, value in want[k].items():
      np.testing.assert_allclose(np.asarray(sums[name][k]), value, rtol=2e-5, atol=1e-4,
                                 err_msg=f"head {k} {name} chunk {chunk}")
  # Means and the head-weighted total, from the same reference.
  for kind, key in (("hard", "hard"), ("teacher", "soft")):
    total, per_head = losses.combine_losses(sums, kind, losses.head_loss_weights("decay", K))
    means = np.array([w[key] / w["weight"] for w in want])
    np.testing.assert_allclose(np.asarray(per_head), means, rtol=2e-5)
    np.testing.assert_allclose(float(total), (0.8 ** np.arange(K) * means).sum(), rtol=2e-5)
  total, _ = losses.combine_losses(sums, "both", losses.head_loss_weights("equal", K))
  np.testing.assert_allclose(
      float(total), sum((w["hard"] + w["soft"]) / w["weight"] for w in want), rtol=2e-5)


def test_shift_targets():
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
  mask = np.ones((2, 6), np.float32)
  mask[0, 4] = 0
  targets, weights = losses.shift_targets(jnp.asarray(tokens), jnp.asarray(mask), 2)
  np.testing.assert_array_equal(targets[1, 1], [9, 10, 11, 0, 0, 0])  # head 1: t + 3
  np.testing.assert_array_equal(weights[0, 0], [1, 1, 0, 1, 0, 0])    # head 0: t + 2
  np.testing.assert_array_equal(weights[1, 0], [1, 0, 1, 0, 0, 0])


def test_chunked_equals_unchunked_with_grads():
  """Values and gradients through a small linear LM head, chunked vs one chunk."""
  _, base_logits, tokens, mask = _inputs(1)
  rng = np.random.default_rng(2)
  d = 8
  feats = [jnp.asarray(rng.normal(size=(B, T, d)).astype(np.float32)) for _ in range(K)]
  w_kdv = jnp.asarray(rng.normal(size=(K, d, V)).astype(np.float32))
  base_w = jnp.asarray(rng.normal(size=(d, V)).astype(np.float32))
  base_hidden = jnp.asarray(rng.normal(size=(B, T, d)).astype(np.float32))
  targets, weights = losses.shift_targets(jnp.asarray(tokens), jnp.asarray(mask), K)

  def loss(w, chunk, kind):
    sums = losses.head_sums(lambda k, f: f @ w[k], feats, targets, weights,
                            base_hidden_BxTxD=base_hidden, base_logits_fn=lambda h: h @ base_w,
                            chunk=chunk, teacher=kind != "hard")
    return losses.combine_losses(sums, kind, losses.head_loss_weights("equal", K))[0]

  # Reference without scan or chunks: full log-softmax per head.
  def direct(w, kind):
    base = base_hidden @ base_w
    total = 0.0
    for k in range(K):
      logq = jax.nn.log_softmax(feats[k] @ w[k], axis=-1)
      hard = -jnp.take_along_axis(logq, targets[k][..., None], axis=-1)[..., 0]
      shifted = jnp.concatenate([base[:, k + 1:], jnp.zeros((B, k + 1, V))], axis=1)
      soft = -jnp.sum(jax.nn.softmax(shifted, axis=-1) * logq, axis=-1)
      per_pos = {"hard": hard, "teacher": soft, "both": hard + soft}[kind]
      total = total + jnp.sum(weights[k] * per_pos) / jnp.sum(weights[k])
    return total

  for kind in ("hard", "teacher"):
    want_v, want_g = jax.jit(jax.value_and_grad(direct), static_argnums=1)(w_kdv, kind)
    for chunk in (0, 3):
      v, g = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))(w_kdv, chunk, kind)
      np.testing.assert_allclose(float(v), float(want_v), rtol=1e-5)
      np.testing.assert_allclose(np.asarray(g), np.asarray(want_g), rtol=1e-4, atol=1e-6)


def test_no_full_logits_buffer():
  """Compiled loss + grad: chunked, the temporaries stay well under one f32 [B, T, V]
  buffer; unchunked (the control) they exceed it, so the check can fail."""
  t, v, d = 256, 512, 8
  feats = [jnp.zeros((B, t, d))] * K
  w = jnp.zeros((K, d, v))
  targets = jnp.zeros((K, B, t), jnp.int32)
  weights = jnp.ones((K, B, t))

  def temp_bytes(chunk):
    def loss(w):
      sums = losses.head_sums(lambda k, f: f @ w[k], feats, targets, weights,
                              base_hidden_BxTxD=jnp.zeros((B, t, d)),
                              base_logits_fn=lambda h: h @ w[0], chunk=chunk, teacher=True)
      return losses.combine_losses(sums, "teacher", np.ones(K, np.float32))[0]
    return jax.jit(jax.grad(loss)).lower(w).compile().memory_analysis().temp_size_in_bytes

  full = B * t * v * 4
  assert temp_bytes(8) < full / 2, (temp_bytes(8), full)
  assert temp_bytes(0) > full


def test_bad_names():
  with pytest.raises(ValueError, match="head_weights"):
    losses.head_loss_weights("linear", 3)
  with pytest.raises(ValueError, match="train.loss"):
    losses.combine_losses({"weight": jnp.ones(2)}, "kl", np.ones(2))
