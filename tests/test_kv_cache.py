"""The static KV cache and the attention masks, against numpy definitions and the model.

The unit tests compare each operation (per-row writes, compaction, lengths, masks) with a
few lines of numpy that state its definition. The last test runs the cache the way the
speculative engine will: verify a token tree in one forward, compact the accepted path and
decode on, and checks every logit against a plain full forward of the same tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax.model import masks
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.kv_cache import KVCache, init_cache, write_rows
from hydra_jax.model.llama import LlamaModel, init_params

B, S, K, H = 3, 16, 2, 4  # caches are [B * K, S, H], batch-major rows


def _random_layer(seed: int, batch: int = B) -> np.ndarray:
  return np.random.RandomState(seed).randn(batch * K, S, H).astype(np.float32)


def _cache_from(layers_k, layers_v, lengths) -> KVCache:
  return KVCache(k=tuple(jnp.asarray(x) for x in layers_k),
                 v=tuple(jnp.asarray(x) for x in layers_v),
                 lengths=jnp.asarray(lengths, jnp.int32))


# --- creation, write, lengths ----------------------------------------------------------------


def test_init_cache_shapes():
  cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=8)
  cache = init_cache(cfg, batch_size=2, max_len=10, dtype=jnp.bfloat16)
  assert cache.num_layers == 3 and cache.batch_size == 2 and cache.max_len == 10
  assert all(x.shape == (2 * 2, 10, 8) and x.dtype == jnp.bfloat16 for x in cache.k + cache.v)
  assert cache.lengths.dtype == jnp.int32 and np.all(np.asarray(cache.lengths) == 0)
  # The Hydra++ prefix layer keeps its own one-layer cache.
  assert init_cache(cfg, 2, 10, num_layers=1).num_layers == 1


def _write_rows_reference(layer, new, offsets):
  out = layer.copy()
  for b, off in enumerate(offsets):
    out[b * K:(b + 1) * K, off:off + new.shape[1]] = new[b * K:(b + 1) * K]
  return out


@pytest.mark.parametrize("offsets", [[0, 5, 11], [3, 0, 3]])
def test_write_rows_at_per_row_offsets(offsets):
  layer = _random_layer(0)
  new = np.random.RandomState(1).randn(B * K, 5, H).astype(np.float32)
  # Traced offsets: the write position is data, not a static shape.
  got = jax.jit(write_rows)(layer, new, jnp.asarray(offsets, jnp.int32))
  np.testing.assert_array_equal(np.asarray(got), _write_rows_reference(layer, new, offsets))


def test_write_rows_casts_to_cache_dtype():
  layer = jnp.zeros((K, S, H), jnp.bfloat16)
  new = jnp.ones((K, 2, H), jnp.float32)
  got = write_rows(layer, new, jnp.asarray([4]))
  assert got.dtype == jnp.bfloat16
  assert float(got[:, 4:6].astype(jnp.float32).sum()) == 2 * K * H


def test_with_lengths():
  cache = _cache_from([_random_layer(0)], [_random_layer(1)], [7, 3, 12])
  advanced = cache.with_lengths(cache.lengths + jnp.asarray([2, 0, 1]))
  np.testing.assert_array_equal(np.asarray(advanced.lengths), [9, 3, 13])
  assert advanced.lengths.dtype == jnp.int32
  # Only the lengths move; the entries stay (hidden by the mask, overwritten by the next write).
  np.testing.assert_array_equal(np.asarray(advanced.k[0]), np.asarray(cache.k[0]))


# --- gather (compaction after a speculative step) --------------------------------------------


def _gather_reference(layer, lengths, src, count):
  """Definition: row b's slots lengths[b] + i <- old slots src[b, i], then commit count[b]."""
  out = layer.copy()
  for b in range(layer.shape[0] // K):
    rows = slice(b * K, (b + 1) * K)
    picked = layer[rows][:, src[b]]  # read everything first: [K, M, H]
    out[rows, lengths[b]:lengths[b] + src.shape[1]] = picked
  return out, np.asarray(lengths) + np.asarray(count)


@pytest.mark.parametrize("pattern", ["accepted_path", "arbitrary"])
def test_gather_matches_numpy(pattern):
  lengths = np.array([4, 9, 2], np.int32)
  count = np.array([3, 0, 1], np.int32)  # rows accept different numbers of entries
  m = 3
  if pattern == "accepted_path":
    # Tree tokens sit at lengths + node; an accepted path picks increasing nodes.
    nodes = np.array([[0, 2, 5], [0, 1, 1], [0, 3, 3]])
    src = lengths[:, None] + nodes
  else:
    # Any slots, including ones before the destination and repeated ones.
    src = np.random.RandomState(3).randint(0, S - m, (B, m))
  layers_k = [_random_layer(10), _random_layer(11)]
  layers_v = [_random_layer(20), _random_layer(21)]
  cache = _cache_from(layers_k, layers_v, lengths)
  out = jax.jit(lambda c, s, n: c.gather(s, n))(cache, jnp.asarray(src, jnp.int32),
                                                jnp.asarray(count))
  for got, ref_layer in zip(out.k + out.v, layers_k + layers_v):
    ref, ref_lengths = _gather_reference(ref_layer, lengths, src, count)
    np.testing.assert_array_equal(np.asarray(got), ref)
  np.testing.assert_array_equal(np.asarray(out.lengths), ref_lengths)


# --- masks -----------------------------------------------------------------------------------


def test_causal_mask_is_lower_triangular():
  got = np.asarray(masks.causal_mask(2, 6))
  ref = np.array([[s <= t for s in range(6)] for t in range(6)])
  assert got.shape == (2, 6, 6) and got.dtype == bool
  np.testing.assert_array_equal(got, np.broadcast_to(ref, (2, 6, 6)))


def test_cache_causal_mask_matches_definition():
  lengths, t_new = np.array([0, 5, 12]), 4
  got = np.asarray(masks.cache_causal_mask(jnp.asarray(lengths), t_new, S))
  ref = np.zeros((B, t_new, S), bool)
  for b in range(B):
    for t in range(t_new):
      for s in range(S):
        ref[b, t, s] = s <= lengths[b] + t  # the committed cache, earlier new tokens, itself
  np.testing.assert_array_equal(got, ref)


def _ancestors(parents):
  """ancestors[i, j]: node j is node i or one of its ancestors."""
  n = len(parents)
  anc = np.zeros((n, n), bool)
  for i in range(n):
    j = i
    while j >= 0:
      anc[i, j] = True
      j = parents[j]
  return anc


PARENTS = [-1, 0, 0, 1, 1, 2, 3]  # root, two children, grandchildren, one great-grandchild


def test_tree_mask_matches_definition():
  anc = _ancestors(PARENTS)
  n = len(PARENTS)
  lengths = np.array([0, 4, S - n])  # the last row's tree ends exactly at the last slot
  got = np.asarray(jax.jit(masks.tree_mask, static_argnums=2)(jnp.asarray(lengths), anc, S))
  ref = np.zeros((B, n, S), bool)
  for b in range(B):
    for i in range(n):
      for s in range(S):
        node = s - lengths[b]
        ref[b, i, s] = s < lengths[b] or (0 <= node < n and anc[i, node])
  np.testing.assert_array_equal(got, ref)
  # A chain tree is plain causal attention.
  chain = _ancestors(list(range(-1, 4)))
  np.testing.assert_array_equal(
      np.asarray(masks.tree_mask(jnp.asarray(lengths), chain, S)),
      np.asarray(masks.cache_causal_mask(jnp.asarray(lengths), 4 + 1, S)))


# --- the cache in a speculative step, against plain full forwards ----------------------------


def test_tree_verify_gather_then_decode_equals_full_forward():
  """Prefill ragged prompts, verify a token tree in one forward, compact the accepted path,
  decode one more token: every logit equals a full causal forward over the same tokens."""
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8)
  # The param tree from init_params without running it (compiling threefry and the forward
  # costs seconds on CPU); values from numpy, larger than the N(0, 0.02) init so that logits
  # differ visibly between contexts.
  rng = np.random.RandomState(0)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.randn(*s.shape) * 0.1 + (s.ndim == 1), jnp.float32), shapes)
  model = LlamaModel(cfg)
  batch, slots = 2, 24
  prompt_lens = np.array([4, 7], np.int32)
  prompts = rng.randint(4, cfg.vocab_size, (batch, int(prompt_lens.max()))).astype(np.int32)
  anc = _ancestors(PARENTS)
  depth = anc.sum(1) - 1
  n = len(PARENTS)
  tree_tokens = rng.randint(4, cfg.vocab_size, (batch, n)).astype(np.int32)

  @jax.jit
  def forward(tokens, positions, cache, mask):
    logits, _, cache = model.apply({"params": params}, tokens, positions, cache, mask)
    return logits, cache

  full = jax.jit(lambda t: model.apply({"params": params}, t,
                                       jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape))[0])

  def path(i):  # node ids from the root to node i
    return [j for j in range(n) if anc[i, j]]

  cache = init_cache(cfg, batch, slots)
  pos = np.broadcast_to(np.arange(prompts.shape[1]), prompts.shape)
  _, cache = forward(prompts, pos, cache, masks.cache_causal_mask(cache.lengths, pos.shape[1],
                                                                   slots))
  cache = cache.with_lengths(prompt_lens)

  # Tree verification: node i at slot lengths + i, position lengths + depth(i).
  tree_pos = prompt_lens[:, None] + depth[None, :]
  tree_logits, cache = forward(tree_tokens, tree_pos, cache,
                               masks.tree_mask(cache.lengths, anc, slots))

  # References for every (row, node): prompt + the tokens on the root-to-node path,
  # right padded into one batch (causality makes padding harmless).
  width = int(prompt_lens.max()) + n + 1
  seqs, last = [], []
  for b in range(batch):
    for i in range(n):
      s = list(prompts[b, :prompt_lens[b]]) + [tree_tokens[b, j] for j in path(i)]
      last.append(len(s) - 1)
      seqs.append(s + [0] * (width - len(s)))
  ref = np.asarray(full(np.asarray(seqs, np.int32)))[np.arange(len(seqs)), last]
  ref = ref.reshape(batch, n, -1)
  np.testing.assert_allclose(np.asarray(tree_logits), ref, atol=1e-5 * np.abs(ref).max())

  # Accept a different path per row (row 0: 0-1-3-6, row 1: 0-2), compact, decode on.
  accepted = [[0, 1, 3, 6], [0, 2]]
  m = max(len(p) for p in accepted)
  src = np.array([[prompt_lens[b] + p[min(i, len(p) - 1)] for i in range(m)]
                  for b, p in enumerate(accepted)], np.int32)
  count = np.array([len(p) for p in accepted], np.int32)
  uncompacted = cache.with_lengths(cache.lengths + count)
  cache = jax.jit(KVCache.gather)(cache, jnp.asarray(src), jnp.asarray(count))
  np.testing.assert_array_equal(np.asarray(cache.lengths), prompt_lens + count)

  nxt = rng.randint(4, cfg.vocab_size, (batch, 1)).astype(np.int32)
  step_pos = np.asarray(cache.lengths)[:, None]
  step_logits, _ = forward(nxt, step_pos, cache, masks.cache_causal_mask(cache.lengths, 1, slots))
  seqs, last = [], []
  for b in range(batch):
    s = (list(prompts[b, :prompt_lens[b]]) + [tree_tokens[b, j] for j in accepted[b]]
         + [nxt[b, 0]])
    last.append(len(s) - 1)
    seqs.append(s + [0] * (width - len(s)))
  ref = np.asarray(full(np.asarray(seqs, np.int32)))[np.arange(batch), last]
  np.testing.assert_allclose(np.asarray(step_logits)[:, 0], ref, atol=1e-5 * np.abs(ref).max())
  # The compaction mattered: committing the tree slots as they lie reads rejected nodes.
  wrong, _ = forward(nxt, step_pos, uncompacted,
                     masks.cache_causal_mask(uncompacted.lengths, 1, slots))
  err = np.abs(np.asarray(wrong)[:, 0] - ref).max(axis=-1)
  assert np.all(err > 1e-3 * np.abs(ref).max()), err
