"""Fitted trees vs mc_sim_7b_63 on trained heads: measured accept length and speedup.

    python benchmarks/bench_trees.py --model hydra_jax/assets/tiny_shakespeare \
        --heads hydra_jax/assets/tiny_shakespeare/heads/{medusa,hydra,hydra_pp} \
        --prompts data/shakespeare_heldout_prompts.jsonl --max-new-tokens 128 --rounds 3

For each heads directory (which must hold tree_auto.json, written by
`python -m hydra_jax.decoding.tree_fit ... --out HEADS_DIR/tree_auto.json`) it decodes the
prompts greedily, batch 1, with: autoregressive decoding; mc_sim_7b_63; the hardware-fitted
tree (tree_auto.json); and fit_64, the 64-token tree (63 nodes, like mc_sim_7b_63) grown from
the same calibrated accuracies. All runs are interleaved round by round in one process (the
machine is shared and noisy); the speedup of a round is its tokens/s over the same round's
autoregressive tokens/s, and the table reports medians over rounds. Accept length = tokens
emitted per verify forward, bonus included, over all prompts (deterministic: greedy).
Outputs are checked to equal autoregressive decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from hydra_jax.checkpoint.heads_io import read_heads_meta
from hydra_jax.decoding import api
from hydra_jax.decoding.tree import compile_tree, expected_accept_length, load_tree
from hydra_jax.decoding.tree import AUTO_TREE_FILE
from hydra_jax.decoding.tree_calibration import read_prompts
from hydra_jax.decoding.tree_fit import fit_tree


def _run(model, prompts, max_new, **kw):
  res = api.generate(model, prompts, max_new, batch_size=1, **kw)
  new = sum(r.new_tokens for r in res)
  secs = sum(r.time_s for r in res)  # batch 1: one result per batch
  steps = [a for r in res for a in (r.extra.get("accepted_per_step") or [])]
  tau = sum(steps) / len(steps) if steps else 1.0
  return new / secs, tau, [r.output_ids for r in res]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", required=True)
  ap.add_argument("--heads", nargs="+", required=True, help="heads dirs holding tree_auto.json")
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--limit", type=int, default=None, help="use the first N prompts")
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--chat", action="store_true")
  ap.add_argument("--extra-fits", nargs="*", default=[],
                  help="more tree_fit JSON outputs (e.g. --method replay), matched to the heads "
                       "by arch: their chosen tree and 64-token candidate are run too")
  args = ap.parse_args(argv)

  model = api.load_model(args.model)
  prompts = read_prompts(args.prompts)[:args.limit]
  configs = []  # (heads kind, heads dir, tree, predicted tau, role)
  extra = []
  for path in args.extra_fits:
    with open(path) as f:
      extra.append(json.load(f))
  for heads_dir in args.heads:
    with open(os.path.join(heads_dir, AUTO_TREE_FILE)) as f:
      fitted = json.load(f)
    acc = np.asarray(fitted["acc"])
    arch = read_heads_meta(heads_dir)["heads"]["arch"]
    kind = os.path.basename(os.path.normpath(heads_dir))
    ref = load_tree("mc_sim_7b_63")
    ref = compile_tree([list(p) for p in ref.paths if len(p) <= acc.shape[0]], name=ref.name)
    trees = {"mc_sim_7b_63": ref}
    for fit in [fitted] + [e for e in extra if e.get("heads_arch") == arch]:
      tag = "" if fit is fitted else f"[{fit.get('method', '?')}]"
      trees["auto" + tag] = compile_tree(fit["paths"], name=fit["name"])
      # The fit's best 64-token candidate (63 nodes, like mc_sim_7b_63).
      row64 = [r for r in fit["table"] if r["size"] == 64 and not r["reference"] and "paths" in r]
      row64 = max(row64, key=lambda r: r["expected_tau"], default=None)
      trees["fit_64" + tag] = compile_tree(row64["paths"] if row64 else fit_tree(acc, 63),
                                           name="fit_64" + tag)
    seen = {}
    for role, tree in trees.items():
      if tree in seen:  # the same paths under another role: run once
        print(f"# {kind}: {role} is the same tree as {seen[tree]}")
        continue
      seen[tree] = role
      configs.append((kind, heads_dir, tree, expected_accept_length(tree, acc), role))

  # Warm-up (compiles) and the outputs / accept lengths, which greedy makes deterministic.
  t0 = time.perf_counter()
  _, _, ar_out = _run(model, prompts, args.max_new_tokens, mode="ar")
  taus = []
  for kind, heads_dir, tree, _, _ in configs:
    _, tau, out = _run(model, prompts, args.max_new_tokens, heads=heads_dir, tree=tree)
    if out != ar_out:
      raise SystemExit(f"{kind} / {tree.name}: speculative output differs from autoregressive")
    taus.append(tau)
  print(f"# {len(prompts)} prompts x {args.max_new_tokens} new tokens, batch 1; warm-up "
        f"{time.perf_counter() - t0:.0f}s; outputs equal autoregressive")

  ar_tps, tps = [], [[] for _ in configs]
  for r in range(args.rounds):
    ar_tps.append(_run(model, prompts, args.max_new_tokens, mode="ar")[0])
    for i, (kind, heads_dir, tree, _, _) in enumerate(configs):
      tps[i].append(_run(model, prompts, args.max_new_tokens, heads=heads_dir, tree=tree)[0])
    print(f"# round {r + 1}: AR {ar_tps[-1]:.1f} tokens/s", flush=True)

  print("\n| heads | tree | role | tokens/step | predicted tau | measured tau | "
        "tokens/s (median) | speedup (median of rounds) |")
  print("|---|---|---|---|---|---|---|---|")
  print(f"| - | autoregressive | - | 1 | 1.00 | 1.00 | {statistics.median(ar_tps):.1f} | 1.00x |")
  rows = {}
  for i, (kind, _, tree, pred, role) in enumerate(configs):
    speedup = statistics.median([t / a for t, a in zip(tps[i], ar_tps)])
    rows[kind, role] = (tree.num_nodes, taus[i], speedup)
    print(f"| {kind} | {tree.name} | {role} | {tree.num_nodes} | {pred:.2f} | {taus[i]:.2f} | "
          f"{statistics.median(tps[i]):.1f} | {speedup:.2f}x |")
  print()
  for kind in dict.fromkeys(c[0] for c in configs):
    ref = rows[kind, "mc_sim_7b_63"]
    mine = {role: v for (k, role), v in rows.items() if k == kind and role != "mc_sim_7b_63"}
    for role, (n, tau, _) in mine.items():
      if role.startswith("fit_64"):
        print(f"{kind}: (a) {role} ({n} tokens/step) measured tau {tau:.3f} vs mc_sim_7b_63 "
              f"{ref[1]:.3f}: {'PASS' if tau >= ref[1] else 'FAIL'}")
    for role, (n, _, speedup) in mine.items():
      if role.startswith("auto"):
        print(f"{kind}: (b) {role} ({n} tokens/step) speedup {speedup:.2f}x vs mc_sim_7b_63 "
              f"{ref[2]:.2f}x: {'PASS' if speedup > ref[2] else 'FAIL'}")


if __name__ == "__main__":
  main()
