"""Draft trees: validation, compilation to static numpy buffers, presets and tree growing.

A tree is a list of paths of top-k ranks: [0, 1] is the rank-1 child of the rank-0 depth-1
token. The root (depth 0, the base model's own next token) is implicit. Nodes are numbered
like Medusa: node 0 is the root, then the paths sorted by (length, path), so the nodes of one
depth form a contiguous range and every parent precedes its children.

`compile_tree` turns the paths into the constants the decode loop closes over (attention
mask, depths, acceptance tables and the per-depth gather plans of drafting). Everything is
computed once, in numpy, outside jit. `resolve_tree` is the one place that turns what a user
names (a preset, a JSON file, paths, a CompiledTree, or "auto": the tree fitted to the heads,
HEADS_DIR/tree_auto.json) into the CompiledTree a set of heads can draft.

Legend: N nodes including the root, D depth (longest path), P leaf paths, R_d rows that
expand at depth d, n_d nodes at depth d, K top-k.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from hydra_jax.decoding.dynamic_tree import (DynamicTree, DynamicTreeError, is_dynamic_spec,
                                             parse_dynamic)

log = logging.getLogger("hydra_jax.decoding")

PRESETS_FILE = Path(__file__).resolve().parent.parent / "presets" / "trees.json"


class TreeError(ValueError):
  """The tree is malformed or does not fit the draft heads."""


def _fmt(path: Sequence[int]) -> str:
  return "[" + ", ".join(str(r) for r in path) + "]"


def _normalise(paths: Any) -> Tuple[Tuple[int, ...], ...]:
  """Checks the shape of the input and returns the paths as int tuples (input order)."""
  if isinstance(paths, (str, bytes)) or not isinstance(paths, (list, tuple)):
    raise TreeError(
        f"a tree is a list of paths of top-k ranks like [[0], [0, 0], [1]], got {type(paths).__name__}")
  if not paths:
    raise TreeError("the tree is empty: give at least one path, e.g. [[0]]")
  out = []
  for path in paths:
    if isinstance(path, (str, bytes)) or not isinstance(path, (list, tuple)):
      raise TreeError(f"each path must be a list of ranks like [0, 1], got {path!r}")
    if not path:
      raise TreeError("the empty path [] is not allowed: the root is implicit, start paths at depth 1")
    ranks = []
    for r in path:
      # bool is an int subclass but [True] is surely a mistake.
      if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)):
        raise TreeError(f"path {path!r} holds {r!r}: ranks must be non-negative integers")
      if r < 0:
        raise TreeError(f"path {_fmt(path)} holds the negative rank {r}: ranks start at 0 (top-1)")
      ranks.append(int(r))
    out.append(tuple(ranks))
  return tuple(out)


def validate_paths(paths: Any, num_heads: Optional[int] = None,
                   max_topk: Optional[int] = None) -> Tuple[Tuple[int, ...], ...]:
  """Returns the paths sorted in node order, or raises TreeError naming the problem."""
  norm = _normalise(paths)
  seen = set()
  for p in norm:
    if p in seen:
      raise TreeError(f"path {_fmt(p)} appears twice in the tree")
    seen.add(p)
  for p in norm:
    if len(p) > 1 and p[:-1] not in seen:
      raise TreeError(f"path {_fmt(p)} needs its prefix {_fmt(p[:-1])}")
  depth = max(len(p) for p in norm)
  if num_heads is not None and depth > num_heads:
    raise TreeError(
        f"tree depth {depth} needs {depth} draft heads but the heads have {num_heads}; "
        f"use a tree of depth <= {num_heads}")
  if max_topk is not None:
    worst = max(norm, key=max)
    if max(worst) >= max_topk:
      raise TreeError(
          f"path {_fmt(worst)} uses rank {max(worst)} but only the top-{max_topk} candidates "
          f"are available (ranks 0..{max_topk - 1})")
  return tuple(sorted(norm, key=lambda p: (len(p), p)))


def _readonly(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


@dataclasses.dataclass(frozen=True, eq=False)
class CompiledTree:
  """Static buffers of one tree. Hash/eq follow the paths, so it can be a jit static arg."""

  dynamic = False  # a class attribute: dynamic_tree.DynamicTree's is True

  name: str
  paths: Tuple[Tuple[int, ...], ...]  # sorted by (length, path); node i + 1 = paths[i]
  num_nodes: int  # N, root included
  depth: int  # D
  depths: np.ndarray  # int32 [N], root 0: the position offset of each node
  parents: np.ndarray  # int32 [N], root -1
  ranks: np.ndarray  # int32 [N], root 0: the top-k rank each node takes from its head/row
  ancestors: np.ndarray  # bool [N, N]: [i, j] when j is i or an ancestor of i
  node_path: np.ndarray  # int32 [N, D+1]: root-to-node node indices, padded with -1
  is_leaf: np.ndarray  # bool [N]
  retrieve: np.ndarray  # int32 [P, D+1]: root-to-leaf node indices, padded with -1
  depth_local: np.ndarray  # int32 [N]: the node's index among the nodes of its depth
  topk: int  # max rank + 1 over the whole tree (Medusa's per-head top-k)
  nodes_per_depth: Tuple[int, ...]  # n_d for d = 1..D
  depth_nodes: Tuple[np.ndarray, ...]  # [d-1]: int32 [n_d] node indices at depth d (contiguous)
  expand_rows: Tuple[np.ndarray, ...]  # [d-1]: int32 [R_d] nodes at depth d-1 with children
  child_row: Tuple[np.ndarray, ...]  # [d-1]: int32 [n_d] parent's index into expand_rows[d-1]
  child_rank: Tuple[np.ndarray, ...]  # [d-1]: int32 [n_d] rank within the parent's top-k
  topk_per_depth: Tuple[int, ...]  # [d-1]: max rank + 1 at depth d

  def __hash__(self) -> int:
    return hash(self.paths)

  def __eq__(self, other) -> bool:
    return isinstance(other, CompiledTree) and self.paths == other.paths

  @property
  def num_leaves(self) -> int:
    return int(self.retrieve.shape[0])

  @property
  def expand_sizes(self) -> Tuple[int, ...]:
    return tuple(int(r.shape[0]) for r in self.expand_rows)

  def describe(self) -> str:
    return (f"tree {self.name}: {self.num_nodes} nodes (root + {self.num_nodes - 1}), depth "
            f"{self.depth}, nodes per depth {list(self.nodes_per_depth)}, {self.num_leaves} leaves, "
            f"top-k per depth {list(self.topk_per_depth)}, expanding rows {list(self.expand_sizes)}")

  def to_json(self) -> List[List[int]]:
    return [list(p) for p in self.paths]


def compile_tree(paths: Any, num_heads: Optional[int] = None, max_topk: Optional[int] = None,
                 name: str = "custom") -> CompiledTree:
  """Validates `paths` (see `validate_paths`) and precomputes every static buffer."""
  paths = validate_paths(paths, num_heads=num_heads, max_topk=max_topk)
  n = len(paths) + 1
  depth = max(len(p) for p in paths)
  index = {(): 0}
  for i, p in enumerate(paths):
    index[p] = i + 1

  depths = np.zeros(n, np.int32)
  parents = np.full(n, -1, np.int32)
  ranks = np.zeros(n, np.int32)
  node_path = np.full((n, depth + 1), -1, np.int32)
  node_path[0, 0] = 0
  for p, i in index.items():
    if not p:
      continue
    depths[i] = len(p)
    parents[i] = index[p[:-1]]
    ranks[i] = p[-1]
    node_path[i, :len(p) + 1] = [index[p[:k]] for k in range(len(p) + 1)]

  ancestors = np.zeros((n, n), bool)
  for i in range(n):
    ancestors[i, node_path[i, :depths[i] + 1]] = True

  has_child = np.zeros(n, bool)
  has_child[parents[1:]] = True
  is_leaf = ~has_child
  is_leaf[0] = n == 1  # unreachable (a tree has >= 1 path), kept for clarity
  leaves = np.nonzero(is_leaf)[0]
  retrieve = node_path[leaves].copy()
  topk = int(ranks.max()) + 1
  first_of_depth = np.searchsorted(depths, depths)  # depths are sorted: nodes go depth by depth
  depth_local = (np.arange(n) - first_of_depth).astype(np.int32)
  depth_nodes, expand_rows, child_row, child_rank = [], [], [], []
  topk_per_depth = []
  for d in range(1, depth + 1):
    nodes = np.nonzero(depths == d)[0].astype(np.int32)
    rows = np.unique(parents[nodes]).astype(np.int32)  # sorted, i.e. node order
    depth_nodes.append(nodes)
    expand_rows.append(rows)
    child_row.append(np.searchsorted(rows, parents[nodes]).astype(np.int32))
    child_rank.append(ranks[nodes].copy())
    topk_per_depth.append(int(ranks[nodes].max()) + 1)

  arrays = [depths, parents, ranks, ancestors, node_path, is_leaf, retrieve, depth_local]
  for a in arrays + depth_nodes + expand_rows + child_row + child_rank:
    _readonly(a)
  return CompiledTree(
      name=name, paths=paths, num_nodes=n, depth=depth, depths=depths, parents=parents,
      ranks=ranks, ancestors=ancestors, node_path=node_path, is_leaf=is_leaf, retrieve=retrieve,
      depth_local=depth_local, topk=topk,
      nodes_per_depth=tuple(int(x.shape[0]) for x in depth_nodes),
      depth_nodes=tuple(depth_nodes), expand_rows=tuple(expand_rows),
      child_row=tuple(child_row),
      child_rank=tuple(child_rank), topk_per_depth=tuple(topk_per_depth))


# ----------------------------------------------------------------------------------------
# Presets and loading


def preset_trees() -> Dict[str, List[List[int]]]:
  """The shipped presets, name -> paths."""
  with open(PRESETS_FILE) as f:
    return json.load(f)


def _paths_from_file(path: Path) -> Tuple[Any, str]:
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise TreeError(f"tree file {path} does not exist; give a preset name "
                    f"({', '.join(sorted(preset_trees()))}) or a JSON file") from None
  except (OSError, json.JSONDecodeError) as e:
    raise TreeError(f"tree file {path} is not readable JSON: {e}") from None
  name = path.stem
  if isinstance(data, dict) and "dynamic" in data:  # tree_fit chose a dynamic tree
    return str(data["dynamic"]), str(data.get("name", name))
  if isinstance(data, dict):
    if "paths" not in data:
      raise TreeError(f"tree file {path} holds an object without 'paths'; write either a list "
                      f"of paths or {{\"paths\": [[0], [0, 0], ...]}}")
    name = str(data.get("name", name))
    data = data["paths"]
  try:
    _normalise(data)
  except TreeError as e:
    raise TreeError(f"tree file {path}: {e}") from None
  return data, name


def load_tree(name_or_path: Union[str, os.PathLike, Sequence, CompiledTree, DynamicTree],
              num_heads: Optional[int] = None, max_topk: Optional[int] = None
              ) -> Union[CompiledTree, DynamicTree]:
  """A preset name, a JSON file (a list of paths or {"paths": [...]}), paths themselves, or a
  dynamic tree (`dynamic:N[:D[:K]]`, see dynamic_tree)."""
  if isinstance(name_or_path, DynamicTree):
    name_or_path = name_or_path.name
  if is_dynamic_spec(name_or_path):
    try:
      return parse_dynamic(name_or_path, num_heads, max_topk)
    except DynamicTreeError as e:
      raise TreeError(str(e)) from e
  if isinstance(name_or_path, CompiledTree):
    return compile_tree(name_or_path.paths, num_heads, max_topk, name=name_or_path.name)
  if isinstance(name_or_path, (list, tuple)):
    return compile_tree(name_or_path, num_heads, max_topk)
  spec = os.fspath(name_or_path)
  presets = preset_trees()
  if spec in presets and not os.path.exists(spec):
    paths, name = presets[spec], spec
  elif os.path.exists(spec) or spec.endswith(".json") or os.sep in spec:
    paths, name = _paths_from_file(Path(spec))
    if isinstance(paths, str):
      return load_tree(paths, num_heads, max_topk)
  else:
    raise TreeError(f"unknown tree {spec!r}: give a JSON file or one of the presets "
                    f"{', '.join(sorted(presets))}")
  return compile_tree(paths, num_heads, max_topk, name=name)


AUTO_TREE_FILE = "tree_auto.json"  # written by `python -m hydra_jax.decoding.tree_fit --out`
TREE_AUTO = "auto"
FALLBACK_TREE = "mc_sim_7b_63"


def resolve_tree(tree: Any, heads_dir: Optional[str] = None, num_heads: Optional[int] = None,
                 max_topk: Optional[int] = None, dtype: Optional[str] = None) -> CompiledTree:
  """The CompiledTree for `tree`, checked against heads of `num_heads` heads ranking
  `max_topk` tokens (their draft vocabulary).

  "auto" is HEADS_DIR/tree_auto.json when the heads directory has one (the tree fitted for
  `dtype` when `tree_fit --dtype auto` fitted one per dtype); otherwise (no file, or heads
  given as arrays: heads_dir None) FALLBACK_TREE cut to the heads' depth, with a warning. Any
  other tree deeper than the heads, or using ranks beyond max_topk, is an error.
  """
  if isinstance(tree, str) and tree == TREE_AUTO:
    path = (os.path.join(os.path.expanduser(os.fspath(heads_dir)), AUTO_TREE_FILE)
            if heads_dir is not None else None)
    if path is not None and os.path.isfile(path):
      fitted = _fitted_for_dtype(path, dtype, num_heads, max_topk)
      if fitted is None:
        fitted = load_tree(path, num_heads=num_heads, max_topk=max_topk)
      _warn_if_fitted_elsewhere(path)
      log.info("tree auto: %s from %s", fitted.describe(), path)
      return fitted
    where = (f"{path} does not exist" if path is not None
             else "the heads were given as (config, params), not a directory")
    fallback = load_tree(FALLBACK_TREE)
    paths = [list(p) for p in fallback.paths if num_heads is None or len(p) <= num_heads]
    log.warning("tree auto: %s, so using %s; fit one with `python -m hydra_jax.decoding.tree_fit "
                "--model MODEL --heads HEADS_DIR --prompts PROMPTS.jsonl --out "
                "HEADS_DIR/%s`", where, FALLBACK_TREE, AUTO_TREE_FILE)
    return compile_tree(paths, num_heads=num_heads, max_topk=max_topk, name=FALLBACK_TREE)
  return load_tree(tree, num_heads=num_heads, max_topk=max_topk)


def _fitted_for_dtype(path: str, dtype: Optional[str], num_heads: Optional[int],
                      max_topk: Optional[int]):
  """The tree fitted for `dtype` in a per-dtype tree_auto.json ("by_dtype"), else None."""
  if dtype is None:
    return None
  try:
    with open(path) as f:
      entry = (json.load(f).get("by_dtype") or {}).get(str(dtype))
  except (OSError, json.JSONDecodeError, AttributeError):
    return None  # load_tree reports an unreadable file
  if not isinstance(entry, dict):
    return None
  if "dynamic" in entry:
    return load_tree(str(entry["dynamic"]), num_heads=num_heads, max_topk=max_topk)
  if "paths" not in entry:
    raise TreeError(f"{path}: by_dtype[{dtype!r}] holds neither 'paths' nor 'dynamic'; refit "
                    "it with hydra_jax.decoding.tree_fit")
  try:
    return compile_tree(entry["paths"], num_heads, max_topk,
                        name=str(entry.get("name", f"fit_{dtype}")))
  except TreeError as e:
    raise TreeError(f"{path}: by_dtype[{dtype!r}]: {e}") from None


def device_id() -> str:
  """"platform:device_kind" of the first device: what a fitted tree records as its device."""
  import jax  # only here: the rest of this module is numpy
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind}"


def _warn_if_fitted_elsewhere(path: str) -> None:
  """The best tree size depends on the device: say so when the file was fitted on another."""
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError):
    return
  device = meta.get("device") if isinstance(meta, dict) else None
  if device:
    here = device_id()
    if device != here:
      log.warning("tree auto: %s was fitted on %s but this device is %s; refit it here with "
                  "hydra_jax.decoding.tree_fit", path, device, here)


# ----------------------------------------------------------------------------------------
# Expected acceptance and greedy tree growing


def _check_acc(acc: Any) -> np.ndarray:
  acc = np.asarray(acc, np.float64)
  if acc.ndim != 2:
    raise ValueError(f"accuracies must be [depth, top-k], got shape {acc.shape}")
  if not np.all(np.isfinite(acc)) or acc.min() < 0 or acc.max() > 1:
    raise ValueError("accuracies are probabilities: every entry must lie in [0, 1]")
  return acc


def expected_accept_length(tree: Union[CompiledTree, Sequence], acc_DxK: Any) -> float:
  """Expected tokens per step, bonus included, under the independence model.

  The node at depth d with rank r is the right token with probability acc[d-1, r] given that
  its parent was. The right tokens form one chain, so the accept length is 1 + the number of
  right nodes and, by linearity, 1 + sum over nodes of the product of acc along its path.
  """
  if not isinstance(tree, CompiledTree):
    tree = compile_tree(tree)
  acc = _check_acc(acc_DxK)
  if tree.depth > acc.shape[0] or tree.topk > acc.shape[1]:
    raise ValueError(f"accuracies of shape {acc.shape} do not cover a tree of depth {tree.depth} "
                     f"and top-{tree.topk}")
  prob = np.ones(tree.num_nodes)
  for i in range(1, tree.num_nodes):  # parents precede children
    prob[i] = prob[tree.parents[i]] * acc[tree.depths[i] - 1, tree.ranks[i]]
  return float(prob.sum())  # the root's 1 is the bonus token


def grow_tree(acc_DxK: Any, num_nodes: int) -> List[List[int]]:
  """The `num_nodes`-node tree (root excluded) maximising `expected_accept_length`.

  Greedy: keep a frontier of candidate children of the tree so far and add the one with the
  highest path probability. Since acc <= 1, a child is never more likely than its parent, so
  the num_nodes most likely nodes form a valid (prefix-closed) tree and greedy finds it: it is
  optimal, not a heuristic. Depth <= acc.shape[0], ranks < acc.shape[1].

  Path probabilities are compared EXACTLY, as rationals (`fractions.Fraction`; a float entry
  stands for its exact binary value), so that real ties stay ties on every platform: float
  products in another order, or another numpy build, would break them by rounding noise.
  Ties go to the shorter, then the lexicographically smaller path. `acc_DxK` may hold
  Fractions (`preset_accuracies(exact=True)`) to avoid even the rounding of its entries.
  """
  _check_acc(acc_DxK)
  exact = [[x if isinstance(x, Fraction) else Fraction(float(x)) for x in row] for row in acc_DxK]
  depth, topk = len(exact), len(exact[0])
  capacity = sum(topk ** d for d in range(1, depth + 1))
  if not 1 <= num_nodes <= capacity:
    raise ValueError(f"num_nodes must lie in [1, {capacity}] for depth {depth} and top-{topk}, "
                     f"got {num_nodes}")
  frontier = [(-exact[0][r], 1, (r,)) for r in range(topk)]
  heapq.heapify(frontier)
  chosen = []
  while len(chosen) < num_nodes:
    neg, length, path = heapq.heappop(frontier)
    chosen.append(path)
    if length < depth:
      for r in range(topk):
        heapq.heappush(frontier, (neg * exact[length][r], length + 1, path + (r,)))
  return [list(p) for p in sorted(chosen, key=lambda p: (len(p), p))]


# ----------------------------------------------------------------------------------------
# How the grown presets in presets/trees.json were made (rerun `python -m
# hydra_jax.decoding.tree` to regenerate the file; tests check it is reproducible).
#
# Model: the depth-d candidate of rank r is right with probability acc[d-1, r] given its
# parent was right, acc[d-1, r] = a_d * rho**r, where a_d = 0.56, 0.32, 0.20, 0.15 are
# Medusa-1's per-head top-1 accuracies on Vicuna-7B (reference doc section 5) used as
# conditional accuracies, and rho = 1 - a_1 = 0.44, the largest geometric rank decay that
# keeps every depth's probabilities summing to <= 1 (mutually exclusive candidates). Top-10
# ranks, depth 4 (4 heads). `grow_tree` then picks the N most likely nodes, which is the
# N-node tree with the highest expected accept length under this model. Sizes N = 2^k - 1,
# so that root + N tree tokens fill a power of two. Under the same model mc_sim_7b_63 scores
# 2.69 and greedy_63 2.73. The model has many exact ties (e.g. ranks [1, 1, 2] and [3, 0, 1]
# both have probability 0.56 * 0.32 * 0.20 * 0.44**4): grow_tree compares rationals, so the
# files are the same on every platform (greedy_63 and greedy_127 were regenerated when it
# started to, changing 3 and 1 tied nodes, same expected accept length).
#
# The other presets: mc_sim_7b_63 and single are copied verbatim from the reference trees
# (shared/data/reference_trees.json); chain_4 is the depth-4 chain of top-1 tokens.

PRESET_TOP1_ACCURACY = ("0.56", "0.32", "0.20", "0.15")  # decimal strings: exact rationals
PRESET_TOPK = 10
PRESET_GROWN_SIZES = (7, 15, 31, 63, 127)
REFERENCE_PRESETS = ("mc_sim_7b_63", "single")


def preset_accuracies(exact: bool = False, topk: int = PRESET_TOPK):
  """acc [D, K] = top1[d] * decay**r, decay = 1 - top1[0]: the model of the grown presets.

  exact=True: nested lists of Fractions (what `build_presets` grows from, so the presets do
  not depend on how a numpy build rounds powers); else a float64 array.
  """
  top1 = [Fraction(a) for a in PRESET_TOP1_ACCURACY]
  decay = 1 - top1[0]
  table = [[a * decay ** r for r in range(topk)] for a in top1]
  return table if exact else np.asarray([[float(x) for x in row] for row in table], np.float64)


def build_presets(reference: Dict[str, Any]) -> Dict[str, List[List[int]]]:
  """All presets: the reference trees copied, the chain, and the grown trees."""
  out = {name: [list(p) for p in reference[name]] for name in REFERENCE_PRESETS if name in reference}
  out["chain_4"] = [[0] * d for d in range(1, 5)]
  acc = preset_accuracies(exact=True)
  for n in PRESET_GROWN_SIZES:
    out[f"greedy_{n}"] = grow_tree(acc, n)
  return out


def _dump_presets(presets: Dict[str, List[List[int]]]) -> str:
  # One tree per line, like the reference file: diffable and still short.
  lines = [f"  {json.dumps(name)}: {json.dumps(paths)}" for name, paths in presets.items()]
  return "{\n" + ",\n".join(lines) + "\n}\n"


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description="Regenerates presets/trees.json.")
  parser.add_argument("--reference", default=str(PRESETS_FILE),
                      help="JSON holding the reference trees to copy (mc_sim_7b_63, single)")
  parser.add_argument("--out", default=str(PRESETS_FILE))
  args = parser.parse_args()
  with open(args.reference) as f:
    presets = build_presets(json.load(f))
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, "w") as f:
    f.write(_dump_presets(presets))
  acc = preset_accuracies()
  for name, paths in presets.items():
    tree = compile_tree(paths, name=name)
    print(f"{tree.describe()}; expected accept length {expected_accept_length(tree, acc):.3f}")
