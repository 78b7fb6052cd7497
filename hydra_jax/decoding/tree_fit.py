"""Trees fitted to the draft heads (calibration) and to the hardware (measured step latency).

    python -m hydra_jax.decoding.tree_fit --model DIR --heads HEADS_DIR \
        --prompts data/shakespeare_heldout_prompts.jsonl --out HEADS_DIR/tree_auto.json

1. Calibration (`tree_calibration.calibrate`): the rank of every true token under every head
   along the base's own greedy continuations of the prompts, teacher-forced in one forward.
2. Fitting. `fit_tree(acc, n)` is `tree.grow_tree`: the n most likely nodes, optimal for
   expected accept length under the independence model (depth d's rank independent of the
   ranks above it). `fit_tree_replay(ranks, n)` drops that assumption: the n most frequent
   rank prefixes of the calibrated positions, optimal for `replay_accept_length`, the mean
   accept length of greedy steps started at those positions (the independence model misses
   the correlation between depths: Medusa heads all read the same h_t). `fit_to_hardware`
   grows one tree per candidate size (either method), measures one jitted speculative step
   (draft + verify + accept + commit) of each and the autoregressive step on this device, and
   keeps the tree maximising expected tokens/s = expected tau / step time. A static tree's
   expected tau is `decoded_accept_length`, the tau decoding measures (`tree_calibration`;
   the replay mean, also tabled, runs 7-14% higher).
   Dynamic trees (`dynamic_tree`, `--dynamic-sizes`, `--dynamic-temperatures`) compete
   too: their topology follows the heads' scores step by step, so no rank table predicts
   them; their tau is MEASURED by decoding the calibration prompts greedily with them
   (`measure_dynamic_tau`), and they are timed like the static trees. A dynamic winner is
   written as {"dynamic": "dynamic:N:D:K:T", ...}.
3. `tree.resolve_tree("auto", heads_dir)`: HEADS_DIR/tree_auto.json when present (this script
   with --out pointing there), else mc_sim_7b_63 with a warning. No calibration is run on the fly:
   it costs an autoregressive pass over a prompt set plus one compile per candidate tree (about
   a minute per head kind for the embedded model on a 2-core CPU), too much to hide in a call.

Sizes count the tokens verified per step, root included (CompiledTree.num_nodes): size 64 =
63 draft nodes, like mc_sim_7b_63. Legend: K heads (depths), R ranks, B batch, T tokens, V vocab.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from hydra_jax.decoding.step_timing import interleaved_medians, steady_state_timer
from hydra_jax.decoding.dynamic_tree import MAX_DEFAULT_DEPTH, DynamicTree, default_beam
from hydra_jax.decoding.dtype_choice import DTYPE_CHOICES
from hydra_jax.decoding.tree import (FALLBACK_TREE, CompiledTree, compile_tree, device_id,
                                     expected_accept_length, grow_tree, load_tree)
from hydra_jax.decoding.tree_calibration import (
    MAX_TOPK, calibrate, decoded_accept_length, measure_decode_rates, measure_dynamic_tau,
    prefix_counts, read_prompts, replay_accept_length)
from hydra_jax.model.heads import HeadsConfig

log = logging.getLogger("hydra_jax.decoding")

DEFAULT_SIZES = (2, 3, 4, 5, 6, 8, 12, 16, 32, 64)
DEFAULT_DYNAMIC_SIZES = (5, 8, 16)
# 1: the heads' own scores; 0.25: sharpened, for teacher-trained heads (dynamic_tree.DynamicTree)
DEFAULT_DYNAMIC_TEMPERATURES = (1.0, 0.25)


# ----------------------------------------------------------------------------------------
# Fitting


def fit_tree(acc_DxK: Any, num_nodes: int) -> List[List[int]]:
  """The num_nodes-node tree (root excluded) maximising expected accept length: grow_tree."""
  return grow_tree(acc_DxK, num_nodes)


def fit_tree_replay(ranks_MxK: np.ndarray, num_nodes: int, max_topk: int = MAX_TOPK
                    ) -> List[List[int]]:
  """The num_nodes-node tree maximising `replay_accept_length` on these ranks: the most
  frequent rank prefixes (a child is never more frequent than its parent, so they form a
  tree; ties go to the shorter, then smaller path; unseen paths fill up in rank order)."""
  counts = prefix_counts(ranks_MxK, max_topk)
  chosen = sorted(counts, key=lambda p: (-counts[p], len(p), p))[:num_nodes]
  if len(chosen) < num_nodes:  # fewer distinct prefixes than nodes: pad with unseen ones
    seen = set(chosen)
    depth = np.asarray(ranks_MxK).shape[1]
    capacity = sum(max_topk ** d for d in range(1, depth + 1))
    # Uniform accuracies: grow_tree's (length, path) order is then its greedy order, so any
    # prefix of the unseen paths in that order keeps the tree prefix-closed.
    flat = np.full((depth, max_topk), 0.5 / max_topk)
    extra = [tuple(p) for p in grow_tree(flat, min(num_nodes + len(seen), capacity))]
    chosen += [p for p in extra if p not in seen][:num_nodes - len(chosen)]
  return [list(p) for p in sorted(chosen, key=lambda p: (len(p), p))]


def dynamic_specs(sizes: Sequence[int], temperatures: Sequence[float], num_heads: int
                  ) -> List[DynamicTree]:
  """One dynamic tree per (size, temperature): depth the heads' count (<= 4), default beam."""
  out = []
  for n in sizes:
    n = int(n)
    base = f"dynamic:{n}:{min(num_heads, MAX_DEFAULT_DEPTH, n - 1)}:{default_beam(n)}"
    for t in temperatures:
      out.append(load_tree(base if float(t) == 1.0 else f"{base}:{float(t):g}",
                           num_heads=num_heads))
  return out


@dataclasses.dataclass
class HardwareFit:
  tree: Union[CompiledTree, DynamicTree]  # the chosen tree
  rows: List[Dict[str, Any]]  # one per candidate (and reference) tree
  ar_step_ms: float

  @property
  def chosen(self) -> Dict[str, Any]:
    return next(r for r in self.rows if r["chosen"])

  def table(self) -> str:
    lines = ["| tree | size (tokens/step) | depth | expected tau (decoded) | "
             "replay tau | step ms | expected tokens/s | expected speedup |",
             "|---|---|---|---|---|---|---|---|",
             f"| autoregressive | 1 | 0 | 1.000 | 1.000 | {self.ar_step_ms:.2f} | "
             f"{1e3 / self.ar_step_ms:.1f} | 1.00x |"]
    for r in self.rows:
      mark = " (chosen)" if r["chosen"] else ""
      replay = "-" if r.get("replay_tau") is None else f"{r['replay_tau']:.3f}"
      lines.append(f"| {r['name']}{mark} | {r['size']} | {r['depth']} | "
                   f"{r['expected_tau']:.3f} | {replay} | "
                   f"{r['step_ms']:.2f} | {r['expected_tokens_per_s']:.1f} | "
                   f"{r['expected_speedup']:.2f}x |")
    return "\n".join(lines)


def measure_step_times(model, heads_cfg: HeadsConfig, heads_params,
                       trees: Sequence[CompiledTree], prompt_len: int = 32,
                       max_new_tokens: int = 128, batch: int = 1, iters: int = 8,
                       repeats: int = 5) -> Tuple[float, List[float]]:
  """(AR step seconds, [speculative step seconds per tree]) on the current device.

  `step_timing`: the engines' own loop steps, `iters` per jitted fori_loop, every step seeing
  prompt_len + max_new_tokens // 2 cached tokens, in the cache bucket `generate` would plan.
  Median of `repeats`, candidates interleaved.
  """
  from hydra_jax.decoding.api import get_engine, plan_shapes
  cfg = model.config
  ctx = prompt_len + max_new_tokens // 2
  engines = [get_engine(model)] + [get_engine(model, heads_cfg, t) for t in trees]
  fns = []
  for engine in engines:
    _, cache_len = plan_shapes([prompt_len], max_new_tokens, cfg.max_position_embeddings,
                               extra_slots=engine.slots_per_step - 1)
    cache_len = max(cache_len, ctx + engine.slots_per_step + 1)
    fns.append(steady_state_timer(engine, model.params, heads_params if engine.speculative
                                  else None, ctx, cache_len, batch, iters))
  times = interleaved_medians(fns, repeats)
  return times[0], times[1:]


def candidate_trees(acc: Any, sizes: Sequence[int], depths: Optional[Sequence[int]] = None,
                    method: str = "independent", ranks: Optional[np.ndarray] = None
                    ) -> List[CompiledTree]:
  """One fitted tree per size (tokens per step, root included) and depth cap.

  depths=None: no cap (names "fit_{size}"). Otherwise one tree per (size, max depth), named
  "fit_{size}_d{depth}", skipping duplicates and sizes a cap cannot hold: on a CPU a shallow
  tree can beat a deeper one of the same size, since every depth is one more round of heads.
  """
  if method not in ("independent", "replay"):
    raise ValueError(f"method must be 'independent' or 'replay', got {method!r}")
  if method == "replay" and ranks is None:
    raise ValueError("method='replay' needs the calibrated ranks (Calibration.ranks)")
  acc = np.asarray(acc, np.float64)
  num_depths, topk = acc.shape
  caps = [None] if depths is None else sorted({min(int(d), num_depths) for d in depths})
  trees, seen = [], set()
  for size in sizes:
    for cap in caps:
      d = num_depths if cap is None else cap
      if size - 1 > sum(topk ** j for j in range(1, d + 1)):
        continue
      if method == "replay":
        paths = fit_tree_replay(np.asarray(ranks)[:, :d], size - 1, topk)
      else:
        paths = fit_tree(acc[:d], size - 1)
      tree = compile_tree(paths, name=f"fit_{size}" if cap is None else f"fit_{size}_d{cap}")
      if tree.paths not in seen:
        seen.add(tree.paths)
        trees.append(tree)
  return trees


def fit_to_hardware(model, heads, acc: Any, sizes: Sequence[int] = DEFAULT_SIZES,
                    max_nodes: Optional[int] = None, references: Sequence[str] = (),
                    step_times: Optional[Mapping[Union[int, str], float]] = None,
                    ar_step_time: Optional[float] = None, ranks: Optional[np.ndarray] = None,
                    method: str = "independent", depths: Optional[Sequence[int]] = None,
                    dynamic: Sequence[Tuple[DynamicTree, float]] = (),
                    offsets: Optional[Sequence[int]] = None, **measure_kw) -> HardwareFit:
  """Grows a tree per size (and depth cap), times them, keeps the fastest (`candidate_trees`).

  Expected tokens/s = expected tau / step time, where tau is expected_accept_length(tree, acc)
  (method "independent", trees from `fit_tree`) or, with method "replay", the calibrated
  positions' replay_accept_length (trees from `fit_tree_replay`; needs `ranks`). With `ranks`
  every row also reports its replay tau. `references` (preset names or files) are timed and
  tabled too but never chosen. `step_times` ({tree name, or size for uncapped trees, or
  reference name: seconds}) and `ar_step_time` replace the measurement (model/heads unused).
  `dynamic`: (dynamic tree, measured tau) pairs, timed and chosen like the fitted trees.
  `offsets` (Calibration.offsets, with `ranks`): every static tree is then scored by
  `decoded_accept_length`, the tau decoding will measure, whichever method grew it; that is
  the scale the dynamic trees' measured tau is on, so static and dynamic compare fairly.
  """
  acc = np.asarray(acc, np.float64)
  depth, topk = acc.shape
  capacity = sum(topk ** d for d in range(1, depth + 1)) + 1
  sizes = sorted({min(int(s), capacity) for s in sizes
                  if int(s) >= 2 and (max_nodes is None or int(s) <= max_nodes)})
  if not sizes:
    raise ValueError(f"no candidate size left: sizes must be >= 2 (root + 1 node) and <= "
                     f"--max-nodes {max_nodes}")
  trees = candidate_trees(acc, sizes, depths, method, ranks)
  dynamic_tau = {t.name: tau for t, tau in dynamic}
  trees += [t for t, _ in dynamic]
  refs = []
  for name in references:
    ref = load_tree(name)
    paths = [list(p) for p in ref.paths if len(p) <= depth and max(p) < topk]
    refs.append(compile_tree(paths, name=ref.name))
  if step_times is None:
    heads_cfg, heads_params = _load_heads(model, heads)
    ar_step_time, times = measure_step_times(model, heads_cfg, heads_params, trees + refs,
                                             **measure_kw)
  else:
    if ar_step_time is None:
      raise ValueError("injected step_times need ar_step_time too")
    key = lambda t: t.name if t.name in step_times else t.num_nodes
    missing = [t.name for t in trees + refs if key(t) not in step_times]
    if missing:
      raise ValueError(f"step_times lacks {missing}")
    times = [float(step_times[key(t)]) for t in trees + refs]
  rows = []
  for i, tree in enumerate(trees + refs):
    if tree.dynamic:
      replay, tau = None, dynamic_tau[tree.name]
    else:
      replay = None if ranks is None else replay_accept_length(tree, ranks)
      if ranks is not None and offsets is not None:
        tau = decoded_accept_length(tree, ranks, offsets)
      else:
        tau = replay if method == "replay" else expected_accept_length(tree, acc)
    rows.append(dict(name=tree.name, size=tree.num_nodes, depth=tree.depth,
                     reference=i >= len(trees), dynamic=tree.dynamic,
                     paths=None if tree.dynamic else tree.to_json(),
                     expected_tau=tau, replay_tau=replay, step_ms=times[i] * 1e3,
                     expected_tokens_per_s=tau / times[i],
                     expected_speedup=tau / times[i] * ar_step_time, chosen=False))
  best = max(range(len(trees)), key=lambda i: (rows[i]["expected_tokens_per_s"], -i))
  rows[best]["chosen"] = True
  return HardwareFit(tree=trees[best], rows=rows, ar_step_ms=ar_step_time * 1e3)


def _fit_record(fit: HardwareFit, arch: str) -> Dict[str, Any]:
  """The chosen tree of one fit as tree_auto.json stores it (top level, or under by_dtype)."""
  chosen = fit.chosen
  name = f"fit_{arch}_{chosen['size']}" + ("_dynamic" if fit.tree.dynamic else "")
  shape = ({"dynamic": fit.tree.name} if fit.tree.dynamic else {"paths": fit.tree.to_json()})
  return {"name": name, **shape, "size": chosen["size"], "expected_tau": chosen["expected_tau"],
          "replay_tau": chosen["replay_tau"],
          "expected_tokens_per_s": chosen["expected_tokens_per_s"]}


def _load_heads(model, heads) -> Tuple[HeadsConfig, Any]:
  from hydra_jax.decoding import api
  return api.load_draft_heads(model, heads)


# ----------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Fits a speculation tree to draft heads and to this "
                              "device; writes it as JSON (use --out HEADS_DIR/tree_auto.json "
                              "for --tree auto).")
  p.add_argument("--model", required=True, help="Hugging Face model directory")
  p.add_argument("--heads", required=True, help="draft heads directory")
  p.add_argument("--prompts", required=True,
                 help='calibration prompts: JSONL ({"prompt": TEXT} or {"prompt_ids": [...]} per '
                      'line) or one text prompt per line')
  p.add_argument("--out", required=True, help="where to write the chosen tree (JSON)")
  p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                 help="candidate tree sizes: tokens verified per step, root included")
  p.add_argument("--max-nodes", type=int, default=None, help="drop candidate sizes above this")
  p.add_argument("--max-new-tokens", type=int, default=128,
                 help="greedy continuation length per prompt for calibration (and the decode "
                      "length the timing assumes)")
  p.add_argument("--max-topk", type=int, default=MAX_TOPK)
  p.add_argument("--chat", action="store_true", help="render text prompts with the chat template")
  p.add_argument("--batch-size", type=int, default=8, help="calibration batch")
  p.add_argument("--references", nargs="*", default=[FALLBACK_TREE],
                 help="trees timed and tabled for comparison, never chosen")
  # replay is the default: on the embedded model's heads its 64-token trees accept more than
  # the independence model's (measured, all three head kinds; see benchmarks/bench_trees.py).
  p.add_argument("--method", choices=("independent", "replay"), default="replay",
                 help="replay: the most frequent rank prefixes of the calibrated positions; "
                      "independent: grow_tree on acc[d, r] (expected tau under independence)")
  p.add_argument("--depths", type=int, nargs="*", default=None,
                 help="depth caps to try for every size (default: 1 .. number of heads; "
                      "pass no value for uncapped trees only)")
  p.add_argument("--dynamic-sizes", type=int, nargs="*", default=list(DEFAULT_DYNAMIC_SIZES),
                 help="dynamic-tree node budgets to try (their tau is measured by decoding the "
                      "prompts with each); pass no value for static trees only")
  p.add_argument("--dynamic-temperatures", type=float, nargs="+",
                 default=list(DEFAULT_DYNAMIC_TEMPERATURES),
                 help="score temperatures tried for every dynamic size")
  p.add_argument("--iters", type=int, default=8, help="steps per timing")
  p.add_argument("--repeats", type=int, default=7, help="timings per tree (median)")
  p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                 help="dtype to fit in; auto: fit a tree in each of float32 and bfloat16, "
                      "record both and which is faster here (decode.py --dtype auto uses it)")
  args = p.parse_args(argv)
  # Our progress at INFO on stderr; other libraries' loggers keep their defaults.
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(message)s"))
  logger = logging.getLogger("hydra_jax")
  saved = (logger.level, logger.propagate)
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False  # a library may have set up the root logger
  from hydra_jax.decoding.api import INPUT_ERRORS
  try:
    return _fit_and_write(args)
  except INPUT_ERRORS as e:  # bad input: the message names the fix, no traceback
    print(f"tree_fit: error: {e}", file=sys.stderr)
    return 2
  finally:  # called in-process (tests, notebooks): leave the logger as it was
    logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def _fit_and_write(args: argparse.Namespace) -> int:
  from hydra_jax.decoding import api, dtype_choice
  # auto: fit once per dtype; calibration and the dynamic trees' tau come from the first
  # (f32), since greedy acceptance barely moves with the dtype while the step times do.
  dtypes = dtype_choice.DTYPES if args.dtype == dtype_choice.DTYPE_AUTO else (args.dtype,)
  prompts = read_prompts(args.prompts)  # before the model: a bad file fails at once
  model = api.load_model(args.model, dtype=dtypes[0])
  heads_cfg, heads_params = api.load_draft_heads(model, args.heads)
  t0 = time.perf_counter()
  cal = calibrate(model, (heads_cfg, heads_params), prompts, args.max_new_tokens, args.max_topk,
                  args.chat, args.batch_size)
  t_cal = time.perf_counter() - t0
  print(f"# calibration: {cal.num_prompts} prompts, {cal.num_positions} positions, "
        f"{t_cal:.1f}s; acc[d, r] (rows: depth, cols: rank):")
  for d, row in enumerate(cal.acc):
    print(f"#   depth {d + 1} ({cal.eligible[d]} positions): "
          + " ".join(f"{x:.3f}" for x in row))
  ids = api.encode_prompts(model, prompts, chat=args.chat)
  lengths = [len(p) for p in ids]
  dyn_trees = [t for t in dynamic_specs(args.dynamic_sizes or (), args.dynamic_temperatures,
                                        heads_cfg.num_heads)
               if args.max_nodes is None or t.num_nodes <= args.max_nodes]
  t0 = time.perf_counter()
  dyn_taus = measure_dynamic_tau(model, (heads_cfg, heads_params), dyn_trees, ids,
                                 args.max_new_tokens, args.batch_size)
  if dyn_trees:
    print(f"# dynamic trees, measured tau ({time.perf_counter() - t0:.1f}s): "
          + ", ".join(f"{t.name} {tau:.3f}" for t, tau in zip(dyn_trees, dyn_taus)))
  fits: Dict[str, HardwareFit] = {}
  loaded = {dtypes[0]: (model, (heads_cfg, heads_params))}  # per dtype: base, heads
  for dt in dtypes:
    if dt != dtypes[0]:
      model = api.load_model(args.model, dtype=dt)
      heads_cfg, heads_params = api.load_draft_heads(model, args.heads)
      loaded[dt] = (model, (heads_cfg, heads_params))
    t0 = time.perf_counter()
    fits[dt] = fit_to_hardware(model, (heads_cfg, heads_params), cal.acc, args.sizes,
                               args.max_nodes, args.references, ranks=cal.ranks,
                               method=args.method,
                               depths=(range(1, heads_cfg.num_heads + 1) if args.depths is None
                                       else args.depths or None),
                               dynamic=list(zip(dyn_trees, dyn_taus)), offsets=cal.offsets,
                               prompt_len=int(np.median(lengths)),
                               max_new_tokens=args.max_new_tokens, iters=args.iters,
                               repeats=args.repeats)
    print(f"# {dt}: timing on {jax.devices()[0].device_kind}: {time.perf_counter() - t0:.1f}s")
    print(fits[dt].table())
  rate = {dt: f.chosen["expected_tokens_per_s"] for dt, f in fits.items()}
  decoded: Dict[str, float] = {}
  if len(dtypes) > 1:  # the dtype is chosen on the decode loop itself (measure_decode_rates)
    runs = {}
    for dt in dtypes:
      m, h = loaded[dt]
      runs[f"{dt} speculative"] = (m, h, fits[dt].tree)
      runs[f"{dt} autoregressive"] = (m, None, None)
    t0 = time.perf_counter()
    decoded = measure_decode_rates(runs, ids, args.max_new_tokens)
    print(f"# decoded tokens/s, calibration prompts, batch 1 ({time.perf_counter() - t0:.1f}s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in decoded.items()))
    best = max(dtypes, key=lambda dt: decoded[f"{dt} speculative"])
  else:
    best = dtypes[0]
  device = device_id()
  by_dtype = {dt: _fit_record(f, heads_cfg.arch) for dt, f in fits.items()}
  fit = fits[best]
  out = {**by_dtype[best], "dtype": best, "method": args.method, "heads_arch": heads_cfg.arch,
         "base_fingerprint": model.config.fingerprint(), "device": device,
         "ar_step_ms": fit.ar_step_ms, "table": fit.rows, "acc": cal.acc.tolist(),
         "calibration": {"prompts": os.path.basename(args.prompts),
                         "num_prompts": cal.num_prompts, "positions": cal.num_positions,
                         "max_new_tokens": args.max_new_tokens, "max_topk": args.max_topk,
                         "eligible": cal.eligible.tolist(), "dtype": dtypes[0]},
         "by_dtype": {dt: {**rec, "ar_step_ms": fits[dt].ar_step_ms, "table": fits[dt].rows}
                      for dt, rec in by_dtype.items()}}
  if len(dtypes) > 1:
    spec = {dt: decoded[f"{dt} speculative"] for dt in dtypes}
    ar = {dt: decoded[f"{dt} autoregressive"] for dt in dtypes}
    out["dtype_auto"] = {"choice": best, "device": dtype_choice.this_device(),
                         "decoded_tokens_per_s": spec, "decoded_ar_tokens_per_s": ar,
                         "expected_tokens_per_s": rate}
    print("# dtype auto: " + ", ".join(
        f"{dt} {spec[dt]:.1f} tokens/s ({fits[dt].tree.name}; autoregressive {ar[dt]:.1f})"
        for dt in dtypes) + f" -> {best}")
    ar_best = max(dtypes, key=lambda dt: ar[dt])
    ar_rate, spec_rate = ar[ar_best], spec[best]
  else:
    ar_best, ar_rate, spec_rate = best, 1e3 / fit.ar_step_ms, rate[best]
  if ar_rate > spec_rate:  # say it: the fit is the best tree, not a win
    print(f"# note: autoregressive decoding in {ar_best} ({ar_rate:.1f} tokens/s) is faster "
          f"here than the best speculative tree ({spec_rate:.1f} tokens/s, {best}): the step "
          f"timings above say why")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}: {fit.tree.describe()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
