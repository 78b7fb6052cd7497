"""Held-out evaluation: per-head top-1 / top-5 accuracy and the accept length they predict.

The eval step returns per-head masked SUMS (weight, top1, top5, base_top1, base_top5, and
the losses); summing them over batches and dividing once gives exact means over the split.
Accuracy "vs data" asks whether head k ranks the real token t+k+2 first (in its top 5);
"vs base" asks the same of the base model's own greedy token there, which is what decoding
accepts, so the predicted accept length uses the vs-base accuracies.

Predicted accept length: `expected_accept_length(tree, acc_DxK)` needs the probability that
the rank-r candidate at depth d is right, for every rank the tree uses (up to 10 for
mc_sim_7b_63). When the eval step reports exact per-rank counts ("base_rank_counts" [K, R])
they are used; otherwise ranks are extrapolated from top-1 and top-5 with the model the
preset trees were grown with, acc[d, r] = top1[d] * q_d**r, q_d fit so that ranks 0..4 sum
to top-5[d].
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Tuple

import jax
import numpy as np

from hydra_jax.decoding.tree import compile_tree, expected_accept_length, load_tree


def accumulate(eval_step: Callable, params, base_params, batches: Iterable,
               to_global: Callable) -> Tuple[Dict[str, np.ndarray], int]:
  """Sums the eval step's per-head sums over `batches`; returns (sums, number of batches).

  All batches are dispatched before any result is pulled to the host.
  """
  pending = [eval_step(params, base_params, to_global(b)) for b in batches]
  total: Dict[str, np.ndarray] = {}
  for out in pending:
    out = jax.device_get(out)
    for k, v in out.items():
      v = np.asarray(v, np.float64)
      total[k] = total[k] + v if k in total else v
  return stack_heads(total), len(pending)


# The eval step's flat keys "{name}_head_{k}" -> the per-head arrays used here.
_STEP_NAMES = {"count": "weight", "top1_data": "top1", "top5_data": "top5",
               "top1_base": "base_top1", "top5_base": "base_top5", "hard_sum": "hard",
               "soft_sum": "soft", "rank_counts_base": "base_rank_counts",
               "count_base": "base_weight"}


def stack_heads(flat: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """{"top1_base_head_0": x, ...} -> {"base_top1": [K], ...}; already-stacked keys pass."""
  per: Dict[str, Dict[int, np.ndarray]] = {}
  out: Dict[str, np.ndarray] = {}
  for key, v in flat.items():
    name, sep, k = key.rpartition("_head_")
    if sep and k.isdigit() and name in _STEP_NAMES:
      per.setdefault(_STEP_NAMES[name], {})[int(k)] = v
    else:
      out[key] = v
  for name, by_head in per.items():
    out[name] = np.stack([by_head[k] for k in sorted(by_head)])
  return out


def geometric_rank_accuracy(top1: float, top5: float, num_ranks: int) -> np.ndarray:
  """acc[r] = top1 * q**r with q such that acc[0..4] sums to top5 (q in [0, 1])."""
  if top1 <= 0.0:
    # Nothing is ever top-1: spread what is in the top 5 evenly over ranks 1..4.
    acc = np.zeros(num_ranks)
    acc[1:5] = top5 / 4.0
    return acc[:num_ranks]
  ratio = min(max(top5 / top1, 1.0), 5.0)
  lo, hi = 0.0, 1.0
  for _ in range(60):  # sum_{r<5} q**r is increasing in q: bisection
    q = 0.5 * (lo + hi)
    if sum(q ** r for r in range(5)) < ratio:
      lo = q
    else:
      hi = q
  q = 0.5 * (lo + hi)
  acc = top1 * q ** np.arange(num_ranks, dtype=np.float64)
  # Disjoint events (the right token is at rank r) cannot sum past 1: trim the extrapolated
  # tail (ranks >= 5), never the measured top-1 / top-5.
  room = max(0.0, 1.0 - float(acc[:5].sum()))
  tail = float(acc[5:].sum())
  if tail > room:
    acc[5:] *= room / tail
  return acc


def rank_accuracy_matrix(sums: Dict[str, np.ndarray], num_ranks: int) -> np.ndarray:
  """acc [K, R]: P(the base's greedy token is head k's rank-r candidate)."""
  weight = np.maximum(np.asarray(sums.get("base_weight", sums["weight"]), np.float64), 1e-12)
  if "base_rank_counts" in sums:
    counts = np.asarray(sums["base_rank_counts"], np.float64)
    out = np.zeros((counts.shape[0], num_ranks))
    r = min(num_ranks, counts.shape[1])
    out[:, :r] = counts[:, :r] / weight[:, None]
    return out
  top1 = np.asarray(sums["base_top1"], np.float64) / weight
  top5 = np.asarray(sums["base_top5"], np.float64) / weight
  return np.stack([geometric_rank_accuracy(a, b, num_ranks) for a, b in zip(top1, top5)])


def tree_for_heads(tree_spec: Any, num_heads: int):
  """The tree cut to the depths the heads can draft (depth <= num_heads)."""
  tree = load_tree(tree_spec)
  paths = [list(p) for p in tree.paths if len(p) <= num_heads]
  if not paths:
    raise ValueError(f"tree {tree_spec!r} has no node within {num_heads} heads")
  return compile_tree(paths, name=f"{tree.name}@{num_heads}" if len(paths) < len(tree.paths)
                      else tree.name)


def summarize(sums: Dict[str, np.ndarray], tree=None) -> Dict[str, Any]:
  """Scalar metrics from summed per-head eval sums (and the predicted accept length)."""
  weight = np.asarray(sums["weight"], np.float64)
  num_heads = weight.shape[0]
  denom = np.maximum(weight, 1e-12)
  out: Dict[str, Any] = {"eval_tokens": float(weight[0]) if num_heads else 0.0}
  # "vs base" accuracies are over every position ("base_weight"); the others over those
  # whose data token the heads' (draft) vocabulary holds.
  base_denom = np.maximum(np.asarray(sums.get("base_weight", weight), np.float64), 1e-12)
  for k in range(num_heads):
    for key in ("top1", "top5", "base_top1", "base_top5"):
      if key in sums:
        d = base_denom if key.startswith("base_") else denom
        out[f"{key}_head_{k}"] = float(sums[key][k] / d[k])
    for key in ("hard", "soft"):
      if key in sums:
        out[f"{key}_loss_head_{k}"] = float(sums[key][k] / denom[k])
  if "hard" in sums:
    out["hard_loss"] = float(np.sum(sums["hard"] / denom))
  if "soft" in sums:
    out["soft_loss"] = float(np.sum(sums["soft"] / denom))
  if tree is not None and "base_top1" in sums:
    acc = rank_accuracy_matrix(sums, max(int(tree.topk), 5))
    out["accept_length"] = expected_accept_length(tree, acc[:tree.depth])
    out["accept_length_tree"] = tree.name
    out["accept_length_ranks"] = "exact" if "base_rank_counts" in sums else "top1/top5 fit"
  return out
