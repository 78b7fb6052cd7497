"""Draft trees: compiled buffers against brute-force definitions, errors, presets, growing.

numpy only: nothing here compiles with jax.
"""

import itertools
from fractions import Fraction
import json
import re
from pathlib import Path

import numpy as np
import pytest

from hydra_jax.decoding import tree as tree_lib
from hydra_jax.decoding.tree import (CompiledTree, TreeError, compile_tree, expected_accept_length,
                                     grow_tree, load_tree)

REFERENCE_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference_trees.json"


def node_of(tree: CompiledTree):
  """path tuple -> node index, from the definition (root, then paths by (length, path))."""
  order = sorted(tree.paths, key=lambda p: (len(p), p))
  return {(): 0, **{p: i + 1 for i, p in enumerate(order)}}


def is_prefix(a, b):
  return len(a) <= len(b) and tuple(b[:len(a)]) == tuple(a)


@pytest.fixture(scope="module")
def mc():
  return load_tree("mc_sim_7b_63")


def test_mc_sim_shape(mc):
  # The numbers from the reference doc, section 4.
  assert mc.num_nodes == 64 and mc.depth == 4
  assert mc.nodes_per_depth == (10, 28, 23, 2)
  assert mc.num_leaves == 42
  assert mc.expand_sizes == (1, 10, 10, 1)
  assert mc.topk_per_depth == (10, 10, 10, 2)
  assert "nodes per depth [10, 28, 23, 2]" in mc.describe()


def test_mc_sim_is_the_reference_tree(mc):
  if not REFERENCE_FILE.exists():
    pytest.skip("shared/data/reference_trees.json is not beside this checkout")
  reference = json.loads(REFERENCE_FILE.read_text())
  presets = tree_lib.preset_trees()
  for name in tree_lib.REFERENCE_PRESETS:
    assert presets[name] == reference[name]
  assert set(mc.paths) == {tuple(p) for p in reference["mc_sim_7b_63"]}


@pytest.mark.parametrize("name", sorted(tree_lib.preset_trees()))
def test_buffers_match_definitions(name):
  t = load_tree(name, num_heads=4, max_topk=10)
  idx = node_of(t)
  path_of = {i: p for p, i in idx.items()}
  n = t.num_nodes
  assert n == len(tree_lib.preset_trees()[name]) + 1
  for i in range(n):
    p = path_of[i]
    assert t.depths[i] == len(p)
    assert t.parents[i] == (idx[p[:-1]] if p else -1)
    assert t.ranks[i] == (p[-1] if p else 0)
    assert [int(x) for x in t.depth_nodes[len(p) - 1]][t.depth_local[i]] == i if p else \
        t.depth_local[i] == 0
    want_nodes = [idx[p[:k]] for k in range(len(p) + 1)]
    assert list(t.node_path[i]) == want_nodes + [-1] * (t.depth - len(p))
    assert t.is_leaf[i] == (p != () and not any(len(q) > len(p) and is_prefix(p, q) for q in idx))
    for j in range(n):
      assert t.ancestors[i, j] == is_prefix(path_of[j], p), (i, j)
  # Retrieve rows are exactly the leaf paths, root first, padded with -1.
  leaves = sorted((p for p in idx if p and t.is_leaf[idx[p]]), key=lambda p: (len(p), p))
  assert t.retrieve.shape == (len(leaves), t.depth + 1)
  for row, leaf in zip(t.retrieve, leaves):
    assert tuple(t.ranks[i] for i in row[1:] if i >= 0) == leaf
    assert list(row[len(leaf) + 1:]) == [-1] * (t.depth - len(leaf))


@pytest.mark.parametrize("name", ["mc_sim_7b_63", "greedy_127", "chain_4", "greedy_15"])
def test_expansion_plans_rebuild_every_path(name):
  """Sequential drafting with fake top-k tables reproduces every node's path."""
  t = load_tree(name)
  idx = node_of(t)
  level_paths = [()]  # paths of the nodes of the previous depth, in node order
  for d in range(1, t.depth + 1):
    nodes = t.depth_nodes[d - 1]
    assert list(nodes) == list(range(nodes[0], nodes[0] + len(nodes)))  # contiguous
    rows = t.expand_rows[d - 1]
    prev_nodes = [idx[p] for p in level_paths]
    local = [int(t.depth_local[r]) for r in rows]  # each row's index within its depth
    assert [prev_nodes[k] for k in local] == list(rows)
    assert all(any(t.parents[c] == r for c in range(t.num_nodes)) for r in rows)
    # A top-k table whose entry [row, r] is the child's path, as the heads would give tokens.
    K = t.topk_per_depth[d - 1]
    table = [[level_paths[k] + (r,) for r in range(K)] for k in local]
    children = [table[row][rank] for row, rank in zip(t.child_row[d - 1], t.child_rank[d - 1])]
    assert [idx[c] for c in children] == list(nodes)
    assert max(t.child_rank[d - 1]) + 1 == K
    level_paths = children


def test_paths_are_sorted_and_hashable():
  a = compile_tree([[1], [0], [0, 0]])
  b = compile_tree([[0], [0, 0], [1]], name="other")
  assert a.paths == ((0,), (1,), (0, 0))
  assert a == b and hash(a) == hash(b) and len({a, b}) == 1
  assert a != compile_tree([[0], [1]])
  with pytest.raises(ValueError):
    a.ancestors[0, 0] = False  # the static buffers are read-only


@pytest.mark.parametrize("paths, kwargs, message", [
    ([], {}, "empty"),
    ("0,1", {}, "list of paths"),
    ([0, 1], {}, "each path must be a list"),
    ([[0], []], {}, "root is implicit"),
    ([[0], [0, 1.0]], {}, "non-negative integers"),
    ([[0], [True]], {}, "non-negative integers"),
    ([[0], [-1]], {}, "negative rank -1"),
    ([[0], [0, 3], [0, 3, 1], [0, 4, 1]], {}, "path [0, 4, 1] needs its prefix [0, 4]"),
    ([[0], [0, 1], [0, 1]], {}, "path [0, 1] appears twice"),
    ([[0], [0, 12]], {"max_topk": 10}, "rank 12 but only the top-10"),
    ([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]], {"num_heads": 4},
     "tree depth 5 needs 5 draft heads but the heads have 4"),
])
def test_invalid_trees(paths, kwargs, message):
  with pytest.raises(TreeError, match=re.escape(message)):
    compile_tree(paths, **kwargs)


def test_limits_that_fit_are_accepted(mc):
  assert compile_tree(mc.paths, num_heads=4, max_topk=10) == mc
  with pytest.raises(TreeError, match="heads have 3"):
    load_tree("mc_sim_7b_63", num_heads=3)
  with pytest.raises(TreeError, match="top-9"):
    load_tree("mc_sim_7b_63", max_topk=9)


def test_load_tree_from_files(tmp_path, mc):
  plain = tmp_path / "mine.json"
  plain.write_text(json.dumps([list(p) for p in reversed(mc.paths)]))
  t = load_tree(str(plain))
  assert t == mc and t.name == "mine"
  obj = tmp_path / "obj.json"
  obj.write_text(json.dumps({"name": "small", "paths": [[0], [1], [0, 0]]}))
  t = load_tree(obj)
  assert t.name == "small" and t.nodes_per_depth == (2, 1)
  assert load_tree([[0], [0, 0]]).depth == 2
  with pytest.raises(TreeError, match="unknown tree 'nope'.*mc_sim_7b_63"):
    load_tree("nope")
  with pytest.raises(TreeError, match="does not exist"):
    load_tree(str(tmp_path / "missing.json"))
  bad = tmp_path / "bad.json"
  bad.write_text("[[0], [0, 0")
  with pytest.raises(TreeError, match="not readable JSON"):
    load_tree(bad)
  nopaths = tmp_path / "nopaths.json"
  nopaths.write_text(json.dumps({"tree": [[0]]}))
  with pytest.raises(TreeError, match="without 'paths'"):
    load_tree(nopaths)
  broken = tmp_path / "broken.json"
  broken.write_text(json.dumps([[0], [0, 2, 1]]))
  with pytest.raises(TreeError, match=r"needs its prefix \[0, 2\]"):
    load_tree(broken)


def test_expected_accept_length_chain():
  acc = np.array([[0.7, 0.1], [0.5, 0.1], [0.4, 0.1], [0.2, 0.1]])
  a, b, c, d = acc[:, 0]
  assert expected_accept_length(load_tree("chain_4"), acc) == pytest.approx(
      1 + a + a * b + a * b * c + a * b * c * d)


def test_expected_accept_length_by_enumeration():
  """Simulate the ground truth exhaustively: each depth's true token has some rank or none."""
  paths = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
  acc = np.array([[0.5, 0.3, 0.1], [0.4, 0.2, 0.1], [0.6, 0.1, 0.1]])
  # Outcome per depth: rank r with probability acc[d, r], or "none of them" (None).
  choices = [[(r, acc[d, r]) for r in range(3)] + [(None, 1 - acc[d].sum())] for d in range(3)]
  tree_set = {tuple(p) for p in paths}
  want = 0.0
  for outcome in itertools.product(*choices):
    prob = np.prod([p for _, p in outcome])
    accepted = 0
    for d in range(3):
      r = outcome[d][0]
      if r is None or tuple(o[0] for o in outcome[:d + 1]) not in tree_set:
        break
      accepted += 1
    want += prob * (accepted + 1)
  assert expected_accept_length(paths, acc) == pytest.approx(want)


def all_trees(depth, topk, size):
  """Every prefix-closed set of `size` paths with depth <= depth and ranks < topk."""
  universe = [p for d in range(1, depth + 1) for p in itertools.product(range(topk), repeat=d)]
  for combo in itertools.combinations(universe, size):
    s = set(combo)
    if all(len(p) == 1 or p[:-1] in s for p in combo):
      yield [list(p) for p in combo]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grow_tree_is_optimal(seed):
  rng = np.random.default_rng(seed)
  acc = rng.uniform(0.05, 0.9, size=(3, 3))
  for size in (1, 3, 5):
    best = max(expected_accept_length(p, acc) for p in all_trees(3, 3, size))
    grown = grow_tree(acc, size)
    assert len(grown) == size
    assert expected_accept_length(grown, acc) == pytest.approx(best, rel=1e-12)


def test_grow_tree_respects_limits():
  acc = tree_lib.preset_accuracies()
  t = compile_tree(grow_tree(acc, 127), num_heads=4, max_topk=10)
  assert t.num_nodes == 128
  with pytest.raises(ValueError, match="num_nodes"):
    grow_tree(np.full((1, 2), 0.5), 3)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    grow_tree(np.full((2, 2), 1.5), 3)


def test_presets_are_reproducible():
  """presets/trees.json is exactly what build_presets grows, on any platform.

  The grown presets' accuracy model is full of exact ties; grow_tree compares the path
  probabilities as rationals, so the rebuild cannot depend on float rounding (a numpy build
  once broke ties differently and rebuilt greedy_63 / greedy_127 with other tied nodes). And
  each grown preset holds the N most likely nodes: no node outside it beats one inside.
  """
  presets = tree_lib.preset_trees()
  assert {"mc_sim_7b_63", "chain_4", "single"} <= set(presets)
  rebuilt = tree_lib.build_presets(presets)
  assert rebuilt == presets
  assert presets["chain_4"] == [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]
  exact = tree_lib.preset_accuracies(exact=True)

  def prob(path):
    out = Fraction(1)
    for d, r in enumerate(path):
      out *= exact[d][r]
    return out

  for name in presets:
    t = load_tree(name, num_heads=4, max_topk=10)  # every preset fits 4 heads, top-10
    if name.startswith("greedy_"):
      assert t.num_nodes - 1 == int(name.split("_")[1])
      inside = {tuple(p) for p in presets[name]}
      frontier = {p[:-1] + (r,) for p in inside for r in range(10)} | {(r,) for r in range(10)}
      frontier |= {p + (r,) for p in inside if len(p) < 4 for r in range(10)}
      outside = frontier - inside
      assert max(prob(p) for p in outside) <= min(prob(p) for p in inside), name
