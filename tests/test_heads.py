"""Draft heads: the documented formulas (closed-form numpy), the teacher-forcing contract the
decode engine relies on, the Hydra++ prefix layer's cache, dropout, param counts and init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax.model import llama
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import (DraftHeads, HeadsConfig, HeadsMismatchError, base_lm_head_kernel,
                                   count_params, init_heads, param_shapes, shared_lm_kernel)
from hydra_jax.model.kv_cache import init_cache
from hydra_jax.model.masks import cache_causal_mask
from hydra_jax.tools.testing import perturb_params

BASE = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5)
B, T, K, L = 2, 7, 3, 3


@pytest.fixture(scope="module")
def base_params():
  return _base_init(BASE, 0)


def _base_init(cfg, seed):
  return jax.jit(lambda r: llama.init_params(cfg, r))(jax.random.PRNGKey(seed))


_HEADS_CACHE = {}


def _heads(base_params, arch, shared=True, dropout=0.0, seed=1, lm_head="own", draft_vocab=()):
  """Random non-zero heads, built once per configuration (init compiles are the slow part)."""
  key = (arch, shared, dropout, seed, lm_head, draft_vocab)
  if key not in _HEADS_CACHE:
    cfg = HeadsConfig.for_base(BASE, arch, num_heads=K, num_layers=L, shared_inner=shared,
                               dropout=dropout, lm_head=lm_head, draft_vocab=draft_vocab)
    params = perturb_params(init_heads(cfg, BASE, base_params, jax.random.PRNGKey(seed)), seed + 100,
                            0.2)
    _HEADS_CACHE[key] = (cfg, DraftHeads(cfg, BASE), params)
  return _HEADS_CACHE[key]


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _np_head_logits(p, cfg, k, g, path, base_lm=None):
  """Reference section 2, written out in numpy from the param tree.

  base_lm [D, V]: the base LM head, for heads that reuse it (lm_head "base"); a draft vocab
  keeps the columns of its token ids.
  """
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), p[f"heads_{k}"])
  g = np.asarray(g, np.float64)
  if cfg.arch == "medusa":
    x, n_inner = g, cfg.num_layers
  else:
    path = np.asarray(path, np.float64)
    z0 = np.concatenate([g] + [path[..., j, :] for j in range(k + 1)], axis=-1)
    w, b = p["first"]["kernel"], p["first"]["bias"]  # [in, 2, D]: 0 = W (SiLU), 1 = W_res
    x = z0 @ w[:, 1] + b[1] + _silu(z0 @ w[:, 0] + b[0])
    n_inner = cfg.num_layers - 1
  for j in range(n_inner):
    blk = (p["inner"] if cfg.shared_inner else p[f"inner_{j}"])["linear"]
    x = x + _silu(x @ blk["kernel"] + blk["bias"])
  ids = list(cfg.draft_vocab) or list(range(cfg.vocab_size))
  if cfg.lm_head == "base":
    logits = x @ np.asarray(base_lm, np.float64)[:, ids]
    return logits + p["lm_bias"] if cfg.arch != "medusa" else logits
  logits = x @ p["lm_head"]["kernel"]
  if cfg.arch != "medusa":
    logits = logits + p["lm_head"]["bias"]
  return logits


@pytest.mark.parametrize("arch,shared", [("medusa", True), ("medusa", False), ("hydra", True),
                                         ("hydra", False), ("hydra++", True)])
def test_head_logits_match_numpy_formulas(base_params, arch, shared):
  cfg, model, params = _heads(base_params, arch, shared)
  rng = np.random.default_rng(0)
  g = rng.normal(size=(B, 5, BASE.hidden_size)).astype(np.float32)  # leading dims [B, R]
  for k in range(K):
    path = rng.normal(size=(B, 5, k + 1, BASE.hidden_size)).astype(np.float32)
    got = model.apply({"params": params}, k, g, path, method=DraftHeads.head_logits)
    assert got.shape == (B, 5, BASE.vocab_size) and got.dtype == jnp.float32
    want = _np_head_logits(params, cfg, k, g, path)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  if arch == "medusa":  # Medusa ignores the path entirely
    a = model.apply({"params": params}, 1, g, None, method=DraftHeads.head_logits)
    np.testing.assert_allclose(np.asarray(a), _np_head_logits(params, cfg, 1, g, None),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["medusa", "hydra", "hydra++"])
def test_training_features_equal_explicit_path_features(base_params, arch):
  cfg, model, params = _heads(base_params, arch)
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(B, T, BASE.hidden_size)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, BASE.vocab_size, size=(B, T)), jnp.int32)
  emb = np.asarray(base_params["embed_tokens"]["embedding"])
  token_embeds = jnp.asarray(emb[np.asarray(tokens)])
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  v = {"params": params}
  feats = model.apply(v, hidden, token_embeds, positions,
                      method=DraftHeads.training_features)
  g, _ = model.apply(v, hidden, positions, method=DraftHeads.context)
  if arch != "hydra++":
    np.testing.assert_array_equal(np.asarray(g), np.asarray(hidden))
  toks = np.asarray(tokens)
  for k in range(K):
    # path[b, t, j] = E(x_{t+1+j}), j = 0..k, zero past the end of the sequence.
    path = np.zeros((B, T, k + 1, BASE.hidden_size), np.float32)
    for t in range(T):
      for j in range(k + 1):
        if t + 1 + j < T:
          path[:, t, j] = emb[toks[:, t + 1 + j]]
    want = model.apply(v, k, g, path, method=DraftHeads.features)  # leading dims [B, T]
    np.testing.assert_allclose(np.asarray(feats[k]), np.asarray(want), rtol=1e-5, atol=1e-5,
                               err_msg=f"head {k}")
  logits = model.apply(v, hidden, token_embeds, positions)
  for k in range(K):
    np.testing.assert_allclose(
        np.asarray(logits[k]),
        np.asarray(model.apply(v, k, feats[k], method=DraftHeads.lm_logits)), rtol=1e-6)


def test_prefix_layer_is_causal_and_cache_matches_full_run(base_params):
  cfg, model, params = _heads(base_params, "hydra++")
  v = {"params": params}
  rng = np.random.default_rng(2)
  hidden = jnp.asarray(rng.normal(size=(B, T, BASE.hidden_size)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  full, none = model.apply(v, hidden, positions, method=DraftHeads.context)
  assert none is None and full.shape == hidden.shape
  # Causal: changing the last hidden state changes only the last g.
  changed = hidden.at[:, -1].add(1.0)
  g2, _ = model.apply(v, changed, positions, method=DraftHeads.context)
  np.testing.assert_allclose(np.asarray(g2[:, :-1]), np.asarray(full[:, :-1]), rtol=1e-6)
  assert not np.allclose(np.asarray(g2[:, -1]), np.asarray(full[:, -1]))

  # Prefill 3 positions, then 2 at once, then one at a time; lengths advanced by the caller.
  cache = init_cache(BASE, B, max_len=12, num_layers=1)
  outs = []
  for start, stop in [(0, 3), (3, 5), (5, 6), (6, 7)]:
    n = stop - start
    mask = cache_causal_mask(cache.lengths, n, cache.max_len)
    g, new_cache = model.apply(v, hidden[:, start:stop], positions[:, start:stop], mask, cache,
                               method=DraftHeads.context)
    np.testing.assert_array_equal(np.asarray(new_cache.lengths), np.asarray(cache.lengths))
    cache = new_cache.with_lengths(cache.lengths + n)
    outs.append(g)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(full),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="explicit attention mask"):
    model.apply(v, hidden, positions, None, cache, method=DraftHeads.context)


def test_dropout_only_when_not_deterministic(base_params):
  cfg, _, params = _heads(base_params, "hydra++")
  model = DraftHeads(cfg.replace(dropout=0.5), BASE)  # dropout has no params
  v = {"params": params}
  rng = np.random.default_rng(3)
  g = jnp.asarray(rng.normal(size=(B, BASE.hidden_size)), jnp.float32)
  path = jnp.asarray(rng.normal(size=(B, 2, BASE.hidden_size)), jnp.float32)
  det = model.apply(v, 1, g, path, method=DraftHeads.features)
  det2 = model.apply(v, 1, g, path, True, rngs={"dropout": jax.random.PRNGKey(5)},
                     method=DraftHeads.features)
  np.testing.assert_array_equal(np.asarray(det), np.asarray(det2))
  r1 = model.apply(v, 1, g, path, False, rngs={"dropout": jax.random.PRNGKey(1)},
                   method=DraftHeads.features)
  r2 = model.apply(v, 1, g, path, False, rngs={"dropout": jax.random.PRNGKey(2)},
                   method=DraftHeads.features)
  assert not np.allclose(np.asarray(r1), np.asarray(det))
  assert not np.allclose(np.asarray(r1), np.asarray(r2))
  # The dropout before the LM head belongs to the features: about half the entries are zero.
  assert 0.3 < float(jnp.mean(r1 == 0.0)) < 0.7
  # dropout=0 with deterministic=False is the deterministic function.
  cfg0, model0, params0 = _heads(base_params, "hydra", dropout=0.0)
  a = model0.apply({"params": params0}, 1, g, path, False, method=DraftHeads.features)
  b = model0.apply({"params": params0}, 1, g, path, method=DraftHeads.features)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


DRAFT_VOCAB = (5, 17, 2, 40, 33, 90, 0, 61)  # any distinct ids, most frequent first


@pytest.mark.parametrize("arch,lm_head,draft", [("hydra", "own", DRAFT_VOCAB),
                                                ("hydra++", "base", DRAFT_VOCAB),
                                                ("medusa", "base", ()), ("hydra", "base", ())])
def test_draft_vocab_and_base_lm_head_match_numpy(base_params, arch, lm_head, draft):
  """Head logits over the draft vocab equal the full formula's columns of those token ids."""
  cfg, model, params = _heads(base_params, arch, lm_head=lm_head, draft_vocab=draft)
  base_lm = base_lm_head_kernel(BASE, base_params)
  shared = shared_lm_kernel(cfg, BASE, base_params)
  assert (shared is None) == (lm_head == "own")
  v = len(draft) or BASE.vocab_size
  assert cfg.draft_vocab_size == v and list(cfg.draft_ids) == (list(draft) or list(range(v)))
  rng = np.random.default_rng(4)
  g = rng.normal(size=(B, 3, BASE.hidden_size)).astype(np.float32)
  for k in range(K):
    path = rng.normal(size=(B, 3, k + 1, BASE.hidden_size)).astype(np.float32)
    got = model.apply({"params": params}, k, g, path, True, shared,
                      method=DraftHeads.head_logits)
    assert got.shape == (B, 3, v)
    want = _np_head_logits(params, cfg, k, g, path, base_lm)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  if lm_head == "base":
    assert not any("lm_head" in str(path) for path, _ in
                   jax.tree_util.tree_flatten_with_path(params)[0])
    with pytest.raises(ValueError, match="shared_lm_kernel"):
      model.apply({"params": params}, 0, g, path[..., :1, :], method=DraftHeads.head_logits)
  else:  # own draft-vocab LM heads start as the base LM head's columns of those ids
    init = init_heads(cfg, BASE, base_params, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(init["heads_0"]["lm_head"]["kernel"]),
                                  np.asarray(base_lm)[:, list(draft)])


def test_draft_vocab_is_validated():
  for bad in ((1, 1), (0, 96), (-1,)):
    with pytest.raises(ValueError, match="draft_vocab"):
      HeadsConfig.for_base(BASE, "hydra", draft_vocab=bad)
  with pytest.raises(ValueError, match="lm_head"):
    HeadsConfig.for_base(BASE, "hydra", lm_head="tied")
  cfg = HeadsConfig.for_base(BASE, "hydra", draft_vocab=[3, 4])  # JSON lists come back as tuples
  assert cfg.draft_vocab == (3, 4) and HeadsConfig.from_dict(cfg.to_dict()) == cfg
  hash(cfg)


@pytest.mark.parametrize("arch", ["medusa", "hydra", "hydra++"])
def test_param_counts_shared_and_untied(base_params, arch):
  d, v, f = BASE.hidden_size, BASE.vocab_size, BASE.intermediate_size
  block = d * d + d
  prefix = 0
  if arch == "hydra++":
    n, kv, h = BASE.num_heads, BASE.num_kv_heads, BASE.head_dim
    prefix = d * n * h + 2 * d * kv * h + n * h * d + 3 * d * f + 3 * d  # 2 norms + final norm
  for shared in (True, False):
    cfg = HeadsConfig.for_base(BASE, arch, num_heads=K, num_layers=L, shared_inner=shared)
    p = param_shapes(cfg, BASE)  # the tree init_heads builds, without compiling it
    want = prefix
    for k in range(K):
      if arch == "medusa":
        want += (1 if shared else L) * block + d * v
      else:
        first = 2 * ((k + 2) * d * d + d)
        want += first + (1 if shared else L - 1) * block + d * v + v
    assert count_params(p) == want, (arch, shared)
    if shared:
      _, _, real = _heads(base_params, arch)
      assert jax.tree_util.tree_structure(real) == jax.tree_util.tree_structure(p)
      assert count_params(real) == want


@pytest.mark.parametrize("tied", [False, True])
def test_init_copies_base_lm_head_and_medusa_starts_as_identity(base_params, tied):
  base = BASE.replace(tie_word_embeddings=tied)
  bp = _base_init(base, 3) if tied else base_params
  lm = np.asarray(bp["embed_tokens"]["embedding"]).T if tied else np.asarray(bp["lm_head"]["kernel"])
  for arch in ("medusa",) if tied else ("medusa", "hydra"):
    cfg = HeadsConfig.for_base(base, arch, num_heads=2, num_layers=2)
    p = init_heads(cfg, base, bp, jax.random.PRNGKey(4))
    for k in range(2):
      np.testing.assert_array_equal(np.asarray(p[f"heads_{k}"]["lm_head"]["kernel"]), lm)
      if arch == "hydra":
        np.testing.assert_array_equal(np.asarray(p[f"heads_{k}"]["lm_head"]["bias"]), 0.0)
        first = np.asarray(p[f"heads_{k}"]["first"]["kernel"])
        np.testing.assert_array_equal(first[:, 0], 0)  # W: zero, so SiLU(W z0 + b) starts at 0
        bound = 1 / np.sqrt(first.shape[0])  # W_res: torch's default U(-1/sqrt(in), 1/sqrt(in))
        assert 0.5 * bound < np.abs(first[:, 1]).max() <= bound
    if arch == "medusa":
      # ResBlocks start as the identity, so every head gives the base logits h @ lm_head.
      hidden = np.random.default_rng(5).normal(size=(B, 4, base.hidden_size)).astype(np.float32)
      model = DraftHeads(cfg, base)
      feats = model.apply({"params": p}, 1, hidden, None, method=DraftHeads.features)
      np.testing.assert_array_equal(np.asarray(feats), hidden)
      head = model.apply({"params": p}, 0, hidden, None, method=DraftHeads.head_logits)
      np.testing.assert_allclose(np.asarray(head), hidden @ lm, rtol=1e-5, atol=1e-5)


def test_config_round_trip_and_mismatch_messages():
  cfg = HeadsConfig.for_base(BASE, "hydra++", num_layers=4, dropout=0.2)
  assert HeadsConfig.from_dict(cfg.to_dict()) == cfg and hash(cfg) == hash(
      HeadsConfig.from_dict(cfg.to_dict()))
  assert cfg.prefix_layer and cfg.sequential and not HeadsConfig.for_base(BASE, "medusa").sequential
  cfg.check_compatible(BASE)
  with pytest.raises(HeadsMismatchError, match="hidden size 32 but the model has 64"):
    cfg.check_compatible(BASE.replace(hidden_size=64))
  with pytest.raises(HeadsMismatchError, match="vocab size 96 but the model has 100"):
    cfg.check_compatible(BASE.replace(vocab_size=100))
  with pytest.raises(HeadsMismatchError, match="fingerprint"):
    cfg.check_compatible(BASE.replace(num_layers=3))
  with pytest.raises(ValueError, match="unknown heads arch"):
    HeadsConfig(arch="eagle", hidden_size=32, vocab_size=96)
