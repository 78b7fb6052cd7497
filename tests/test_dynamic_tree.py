"""Dynamic draft trees: parsing, the per-step topology, and its acceptance rules.

References: the static tree's acceptance rules (themselves tested against Medusa's rule,
the enumerated law and greedy decoding in test_acceptance.py), applied to the same topology
given as per-row parents; the static mask and ancestor tables; and, for the drafter, an
explicit enumeration of every top-K path in numpy, filtered by the beam rule and cut to the
N - 1 best cumulative draft log-probabilities. Engine-level losslessness (greedy == AR, all
three head kinds) is in test_speculative.py, the exact sampler's law in test_acceptance.py.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax.checkpoint.hf import load_hf_model
from hydra_jax.decoding import acceptance as ss
from hydra_jax.decoding import dynamic_tree as dyn
from hydra_jax.decoding.drafting import DraftInputs, SpecModels
from hydra_jax.decoding.sampling import SamplingParams
from hydra_jax.decoding.tree import TreeError, load_tree
from hydra_jax.model.heads import HeadsConfig, init_heads
from hydra_jax.model.masks import tree_mask
from hydra_jax.tools.testing import make_hf_model, perturb_params
from test_acceptance import _random_case


def _same_choice(got, want):
  """(a, path_nodes, last, ...) agree; path entries past a are unread padding (the static
  rule leaves the rest of its leaf path there, the dynamic one the root)."""
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[2], want[2])
  for x, y in zip(got[3:], want[3:]):
    np.testing.assert_array_equal(x, y)
  for r, a in enumerate(np.asarray(want[0])):
    np.testing.assert_array_equal(np.asarray(got[1])[r, :a + 1], np.asarray(want[1])[r, :a + 1])


def _as_draft(tree, tokens):
  b = tokens.shape[0]
  rows = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b, tree.num_nodes))
  return dyn.DynamicDraft(tokens_BxN=jnp.asarray(tokens, jnp.int32),
                          parents_BxN=rows(np.maximum(tree.parents, 0)), depths_BxN=rows(tree.depths))


def test_parse_and_errors():
  t = load_tree("dynamic:16", num_heads=4, max_topk=100)
  assert (t.num_nodes, t.depth, t.beam, t.name) == (16, 4, 4, "dynamic:16:4:4")
  assert t.dynamic and not load_tree("chain_4").dynamic
  assert load_tree("dynamic:3", num_heads=4).depth == 2  # at most N - 1 deep
  assert load_tree("dynamic:8:2:3").num_candidates == 3 + 9
  assert load_tree("dynamic:5").beam == 2  # default_beam: about half the drafts
  t = load_tree("dynamic:8:4:3:0.25")
  assert (t.beam, t.temperature, t.name) == (3, 0.25, "dynamic:8:4:3:0.25")
  for spec, match in [("dynamic:1", "N >= 2"), ("dynamic:x", "write dynamic:N"),
                      ("dynamic:8:4:3:0", "temperature must be > 0"),
                      ("dynamic:8:5", "depth 5 needs 5 draft heads"),
                      ("dynamic:20:2:2", "offers only 6 candidates"),
                      ("dynamic:8:2:9", "beam 9 exceeds")]:
    with pytest.raises(TreeError, match=match):
      load_tree(spec, num_heads=4, max_topk=8)


def test_a_tree_file_may_name_a_dynamic_tree(tmp_path):
  """tree_fit writes {"dynamic": spec} when a dynamic tree wins (--tree auto reads it)."""
  import json
  f = tmp_path / "tree_auto.json"
  f.write_text(json.dumps({"name": "fit_hydra_dyn", "dynamic": "dynamic:6:3:2:0.5"}))
  t = load_tree(str(f), num_heads=4)
  assert t.dynamic and (t.num_nodes, t.depth, t.beam, t.temperature) == (6, 3, 2, 0.5)


# The 64-node tree in the slow run (30 s on 2 cores); the 8-node one by default.
@pytest.mark.parametrize("name", [pytest.param("mc_sim_7b_63", marks=pytest.mark.slow),
                                  "greedy_7"])
def test_accept_rules_equal_the_static_ones_on_a_static_topology(name):
  tree = load_tree(name)
  b = 48
  logits, tokens = _random_case(tree, b, 3)
  draft = _as_draft(tree, tokens)
  pred = jnp.argmax(logits, -1).astype(jnp.int32)
  want = ss.greedy_accept(tree, tokens, pred)
  got = dyn.greedy_accept(draft, pred, tree.depth)
  assert int(np.asarray(want[0]).max()) >= 2
  _same_choice(got, want)

  for setting, eps, alpha in [((1.0, 0, 1.0), 0.09, 0.3), ((0.7, 0, 0.9), 0.05, 0.5)]:
    params = ss.AcceptParams.make(SamplingParams.make(*setting), eps, alpha)
    _same_choice(dyn.typical_accept(draft, logits, params, tree.depth),
                 ss.typical_accept(tree, tokens, logits, params))

    keys = jax.random.split(jax.random.key(5), (tree.depth + 1) * b).reshape(tree.depth + 1, b)
    _same_choice(dyn.exact_accept(draft, logits, keys, params, tree.depth),
                 ss.exact_accept(tree, tokens, logits, keys, params))


def test_ancestors_and_batched_mask_match_the_static_tree():
  tree = load_tree("mc_sim_7b_63")
  draft = _as_draft(tree, np.zeros((3, tree.num_nodes), np.int32))
  anc = dyn.ancestors(draft, tree.depth)
  np.testing.assert_array_equal(anc, np.broadcast_to(tree.ancestors, anc.shape))
  lengths = jnp.asarray([0, 5, 30], jnp.int32)
  np.testing.assert_array_equal(tree_mask(lengths, anc, 100), tree_mask(lengths, tree.ancestors, 100))


@pytest.fixture(scope="module")
def hm(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("dyn_base"))
  make_hf_model(path, vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                num_heads=2, num_kv_heads=1, weight_std=0.3, tokenizer=False)
  return load_hf_model(path, tokenizer=False)


def _heads(hm, arch):
  cfg = HeadsConfig.for_base(hm.config, arch, num_heads=3, num_layers=1)
  params = init_heads(cfg, hm.config, hm.params, jax.random.PRNGKey(0))
  return cfg, perturb_params(params, 1, 0.3)


def _reference_tree(models, hm, heads_params, root, g):
  """Every top-K path to depth D by explicit enumeration, scored by cumulative log q; the
  beam keeps the K best of each depth (of the children of the previous depth's beam); the
  answer is the set of root-to-node token paths of the N - 1 best candidates."""
  tree = models.tree
  emb = np.asarray(hm.params["embed_tokens"]["embedding"])

  def log_q(d, path):  # head d over the path's tokens (root first)
    if models.heads_cfg.sequential:
      pe = jnp.asarray(emb[list(path)])[None, None]
      logits = models.heads.apply({"params": heads_params}, d, jnp.asarray(g)[None, None], pe,
                                  True, None, method="head_logits")[0, 0]
    else:
      logits = models.heads.apply({"params": heads_params}, d, jnp.asarray(g)[None], None, True,
                                  None, method="head_logits")[0]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))

  candidates = {}  # token path (without the root) -> cumulative score
  beam = [((), 0.0)]
  for d in range(tree.depth):
    children = []
    for path, score in beam:
      lq = log_q(d, (root,) + path)
      for tok in np.argsort(-lq, kind="stable")[:tree.beam]:
        children.append((path + (int(tok),), score + float(lq[tok])))
    candidates.update(children)
    beam = sorted(children, key=lambda c: -c[1])[:tree.beam]
  best = sorted(candidates.items(), key=lambda c: -c[1])[:tree.num_nodes - 1]
  return {p for p, _ in best}


@pytest.mark.parametrize("arch,spec", [("hydra", "dynamic:7:3:2"), ("medusa", "dynamic:6:3:3"),
                                       ("hydra", "dynamic:9:3:3")])
def test_drafter_chooses_the_best_candidates_as_a_tree(hm, arch, spec):
  cfg, params = _heads(hm, arch)
  tree = load_tree(spec, num_heads=3)
  models = SpecModels(hm.config, cfg, tree)
  b = 4
  roots = jnp.asarray([3, 17, 40, 63], jnp.int32)
  g = jax.random.normal(jax.random.PRNGKey(2), (b, hm.config.hidden_size))
  draft = jax.jit(dyn.dynamic_drafter(models, hm.params, params))(
      DraftInputs(root_B=roots, context_BxE=g, num_out_B=jnp.ones((b,), jnp.int32),
                  step=jnp.int32(0)))
  toks, parents, depths = (np.asarray(x) for x in (draft.tokens_BxN, draft.parents_BxN,
                                                   draft.depths_BxN))
  for r in range(b):
    assert toks[r, 0] == int(roots[r]) and parents[r, 0] == 0 and depths[r, 0] == 0
    assert all(parents[r, i] < i and depths[r, i] == depths[r, parents[r, i]] + 1
               for i in range(1, tree.num_nodes))
    for i, j in itertools.combinations(range(1, tree.num_nodes), 2):
      assert not (parents[r, i] == parents[r, j] and toks[r, i] == toks[r, j])  # siblings differ

    def path(i):
      out = []
      while i:
        out.append(int(toks[r, i]))
        i = parents[r, i]
      return tuple(reversed(out))
    chosen = {path(i) for i in range(1, tree.num_nodes)}
    assert chosen == _reference_tree(models, hm, params, int(roots[r]), np.asarray(g[r]))
