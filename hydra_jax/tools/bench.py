"""Acceptance and speedup benchmark: autoregressive vs each kind of draft heads, in one run.

    python -m hydra_jax.tools.bench                      # the embedded model, its three shipped heads
    python -m hydra_jax.tools.bench --model DIR --heads medusa=DIR hydra=DIR hydra_pp=DIR \
        --prompts mt_bench_questions.jsonl --prompt-format vicuna_v1.1 \
        --tree mc_sim_7b_63 greedy_15 --batch-size 1 --max-new-tokens 256 \
        --dtype bfloat16 --out runs/bench

Every method decodes the same prompts (same token ids), greedy, with the same max_new_tokens
and the same KV-cache length: first autoregressive decoding, then each heads x tree pair
(speculative decoding with greedy acceptance). Each method is compiled and warmed up on one
batch before it is timed; then all methods run `--repeats` times, interleaved, and times are
medians. Reported per method:

  tau           tokens emitted per base forward (verify step), bonus token included; AR = 1
  tokens/s      new tokens / wall time of the batches (prefill + decode, compile excluded)
  speedup       tokens/s over autoregressive tokens/s (same run, same hardware)
  step cost     wall time per step over the autoregressive one (speedup ~ tau / step cost)
  accept@d      fraction of verify steps that accepted >= d draft tokens (bonus excluded),
                d = 1..tree depth; tau = 1 + sum_d accept@d
  histogram     how many steps emitted 1, 2, ..., depth + 1 tokens
  lossless      every output equals the autoregressive output token for token; an output
                that differs is judged at its first differing position: a tie (bf16's tree and
                one-token forwards round a near-tie apart) or a real mismatch (the rule:
                hydra_jax/decoding/tie_check.py; in f32 every difference is real)

Prompts (--prompts): JSONL with {"prompt": text} (or {"prompt_ids": [...]}), MT-Bench JSONL
with {"turns": [...]}, or plain text with one prompt per line. With MT-Bench, --turns first
(default) uses each question's first turn; --turns all also runs the second turns, each as a
conversation of turn 1, the AUTOREGRESSIVE answer to it, and turn 2, so that every method sees
identical inputs (lossless decoding would have produced that answer anyway). --prompt-format:
raw (the text as is), chat (the tokenizer's chat template) or vicuna_v1.1 (FastChat's Vicuna
template, for Vicuna bases without a chat template).

Writes OUTDIR/results.md (also printed), OUTDIR/results.json, OUTDIR/results.png and, per
method, OUTDIR/specbench/METHOD.jsonl: Spec-Bench answer records (per turn new_tokens,
wall_time; per step accept_lengths), so Spec-Bench's `evaluation/speed.py --file-path
specbench/Hydra++.jsonl --base-path specbench/autoregressive.jsonl` reads them.
Nothing here assumes a CPU: run it unchanged on a GPU/TPU with --dtype bfloat16.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra_jax.decoding.dtype_choice import DTYPE_CHOICES  # light: parsing stays instant
from hydra_jax.decoding.prompt_files import PromptFileError, read_prompt_file

log = logging.getLogger("hydra_jax.tools.bench")

PROMPT_FORMATS = ("raw", "chat", "vicuna_v1.1")


class BenchError(ValueError):
  """Bad benchmark input; the message names the fix."""


# --- prompts ---------------------------------------------------------------------------------


def read_prompts(path: str) -> List[Any]:
  """Each entry: a list of turns (str), or a list of token ids (`prompt_files` layouts)."""
  try:
    return read_prompt_file(path, "--prompts")
  except PromptFileError as e:
    raise BenchError(str(e)) from None


def encode_conversation(tokenizer, messages: Sequence[Dict[str, str]], fmt: str) -> List[int]:
  """Token ids of a conversation ending with a user turn, ready for the assistant's reply."""
  if tokenizer is None:
    raise BenchError("text prompts need a tokenizer but the model directory has none; give "
                     "\"prompt_ids\" records instead")
  if fmt == "raw":
    # No roles: turns and answers separated by blank lines.
    return list(tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"])
  if fmt == "chat":
    if not getattr(tokenizer, "chat_template", None):
      raise BenchError("--prompt-format chat: the tokenizer has no chat template; use "
                       "--prompt-format raw or vicuna_v1.1")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
  if fmt == "vicuna_v1.1":
    from hydra_jax.training.templates import render_vicuna
    text, _ = render_vicuna(messages, tokenizer.eos_token or "</s>")
    return list(tokenizer(text + "ASSISTANT:")["input_ids"])  # BOS as FastChat
  raise BenchError(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")


# --- running ---------------------------------------------------------------------------------


def _batches_time(results) -> float:
  """Wall time of a generate call: rows of one batch share its time, count each batch once."""
  return float(sum({r.batch: r.time_s for r in results}.values()))


class Method:
  """One row of the table: autoregressive, or one (heads, tree) pair."""

  def __init__(self, name: str, heads_name: Optional[str] = None, heads=None, tree=None,
               arch: str = "ar", heads_dir: Optional[str] = None):
    self.name, self.heads_name, self.heads, self.tree = name, heads_name, heads, tree
    self.arch, self.heads_dir = arch, heads_dir
    self.times: List[List[float]] = []  # [turn][repeat] wall seconds over all prompts
    self.compile_s = 0.0
    self.results: List[Any] = []  # GenerationResult per prompt (first timed repeat), all turns
    self.labels: List[Tuple[int, int]] = []  # (turn, prompt index) of each result

  def generate(self, model, prompt_ids, max_new_tokens, batch_size, cache_len):
    from hydra_jax.decoding.api import generate
    if self.heads is None:
      return generate(model, prompt_ids, max_new_tokens, batch_size=batch_size,
                      cache_len=cache_len, mode="ar")
    return generate(model, prompt_ids, max_new_tokens, batch_size=batch_size,
                    cache_len=cache_len, mode="spec", heads=self.heads, tree=self.tree,
                    accept="greedy")


def warm_up(methods: Sequence[Method], model, prompt_ids, batch_size, cache_len) -> None:
  """Compiles every method for the shapes of the timed runs, outside the timing.

  generate pads all prompts of a call to the longest one's bucket, so a warm-up batch that
  holds the longest prompt compiles exactly the executable the timed calls reuse
  (max_new_tokens is traced, so a few tokens suffice).
  """
  longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
  batch = [prompt_ids[longest]] + [p for i, p in enumerate(prompt_ids) if i != longest]
  batch = batch[:batch_size]
  for m in methods:
    t0 = time.perf_counter()
    res = m.generate(model, batch, 4, batch_size, cache_len)
    m.compile_s += sum({r.batch: r.compile_s for r in res}.values())
    log.info("warm-up %s: %.1fs", m.name, time.perf_counter() - t0)


def run_methods(methods: Sequence[Method], model, prompt_ids, prompt_index: Sequence[int],
                turn: int, max_new_tokens: int, batch_size: int, cache_len: int,
                repeats: int) -> None:
  """`repeats` timed passes over all prompts, methods interleaved within a pass."""
  for m in methods:
    m.times.append([])
  for rep in range(repeats):
    for m in methods:
      res = m.generate(model, prompt_ids, max_new_tokens, batch_size, cache_len)
      late = sum({r.batch: r.compile_s for r in res}.values())
      if late > 0:  # a shape the warm-up missed: its time is still excluded, but say so
        log.warning("%s compiled again during timing (%.1fs, excluded)", m.name, late)
        m.compile_s += late
      m.times[-1].append(_batches_time(res))
      if rep == 0:
        m.results.extend(res)
        m.labels.extend((turn, i) for i in prompt_index)
      log.info("turn %d, repeat %d, %s: %d tokens in %.2fs", turn + 1, rep + 1, m.name,
               sum(r.new_tokens for r in res), m.times[-1][-1])


# --- metrics ---------------------------------------------------------------------------------


def first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
  """Index of the first differing token (or the shorter length), None when equal."""
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


def method_metrics(m: Method, ar: Method, tie_checker=None) -> Dict[str, Any]:
  """The table row of one method (AR included), from its results and timings; with a
  `tie_check.TieChecker`, each output that differs from AR is judged a tie or a real mismatch."""
  new_tokens = sum(r.new_tokens for r in m.results)
  # Per turn the median over repeats; turns add up.
  time_s = sum(statistics.median(t) for t in m.times)
  per_repeat = [sum(t[rep] for t in m.times) for rep in range(len(m.times[0]))]
  out: Dict[str, Any] = {
      "name": m.name, "arch": m.arch, "heads": m.heads_name, "heads_dir": m.heads_dir,
      "new_tokens": new_tokens, "time_s": time_s, "times_s": per_repeat,
      "tokens_per_s": new_tokens / time_s if time_s > 0 else 0.0, "compile_s": m.compile_s,
  }
  if m.heads is None:
    out.update(tree=None, tree_nodes=1, depth=0, tau=1.0,
               steps=sum(max(r.new_tokens - 1, 0) for r in m.results),
               accept_rates=[], accept_hist={"1": 1.0}, lossless=True, mismatches=[],
               num_mismatches=0, num_ties=0, num_real_mismatches=0, num_ties_by_chunk=0)
    return out
  per_step = [a for r in m.results for a in (r.extra.get("accepted_per_step") or [])]
  depth = int(m.tree.depth)
  steps = len(per_step)
  rates = [sum(1 for a in per_step if a - 1 >= d) / steps if steps else 0.0
           for d in range(1, depth + 1)]
  hist = {str(n): sum(1 for a in per_step if a == n) / max(steps, 1) for n in range(1, depth + 2)}
  mismatches = []
  for (turn, i), r, base in zip(m.labels, m.results, ar.results):
    at = first_difference(r.output_ids, base.output_ids)
    if at is not None:
      diff = {"turn": turn + 1, "prompt": i, "position": at, "tie": False}
      judged = tie_checker and tie_checker.classify(base.prompt_ids, base.output_ids,
                                                    r.output_ids, at, m.tree.num_nodes)
      if judged:
        diff.update(judged.to_json())
      mismatches.append(diff)
  out.update(tree=m.tree.name, tree_nodes=int(m.tree.num_nodes), depth=depth,
             tau=sum(per_step) / steps if steps else 0.0, steps=steps, accept_rates=rates,
             accept_hist=hist, lossless=not mismatches, mismatches=mismatches[:20],
             num_mismatches=len(mismatches), num_ties=sum(d["tie"] for d in mismatches),
             num_real_mismatches=sum(not d["tie"] for d in mismatches),
             num_ties_by_chunk=sum(bool(d.get("reproduced_by_chunk")) for d in mismatches))
  out.update(_heads_training_eval(m.heads_dir))
  return out


def _heads_training_eval(heads_dir: Optional[str]) -> Dict[str, Any]:
  """Per-head top-1 vs the base and the predicted accept length, from the heads' metadata."""
  if not heads_dir:
    return {}
  try:
    from hydra_jax.checkpoint.heads_io import read_heads_meta
    extra = read_heads_meta(heads_dir).get("extra") or {}
  except Exception:  # released checkpoints have no such metadata
    return {}
  ev = extra.get("eval") or {}
  keys = sorted((k for k in ev if k.startswith("base_top1_head_")),
                key=lambda k: int(k.rsplit("_", 1)[1]))
  return {"train_eval_base_top1": [ev[k] for k in keys],
          "predicted_tau": ev.get("accept_length"),
          "predicted_tau_tree": ev.get("accept_length_tree"),
          "trained_steps": extra.get("trained_steps")}


def finish_speedups(rows: List[Dict[str, Any]]) -> None:
  """Speedup over AR, and the cost of one step relative to an AR step (speedup ~ tau / cost)."""
  ar = rows[0]
  for r in rows:
    r["speedup"] = r["tokens_per_s"] / ar["tokens_per_s"] if ar["tokens_per_s"] > 0 else 0.0
    # Wall time per base forward after prefill (prefill included in the time: a small bias).
    r["ms_per_step"] = 1e3 * r["time_s"] / max(r["steps"], 1)
    r["step_cost_vs_ar"] = r["ms_per_step"] / max(1e3 * ar["time_s"] / max(ar["steps"], 1), 1e-9)


# --- reporting -------------------------------------------------------------------------------


def markdown_table(rows: List[Dict[str, Any]], setup: Dict[str, Any]) -> str:
  depth = max([r["depth"] for r in rows] + [1])
  head = (["method", "tree", "tau (tokens/step)", "tokens/s", "speedup", "step cost"]
          + [f"accept@{d}" for d in range(1, depth + 1)] + ["lossless"])
  lines = [
      f"Model `{setup['model']}` ({setup['dtype']}), {setup['num_prompts']} prompts from "
      f"`{setup['prompts']}` ({'first turns' if setup['turns'] == 'first' else 'all turns'}, "
      f"{setup['prompt_format']} format), greedy, "
      f"batch {setup['batch_size']}, max {setup['max_new_tokens']} new tokens, cache "
      f"{setup['cache_len']}, {setup['device']}; median of {setup['repeats']} run(s), compile "
      f"excluded.", "",
      "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    rates = [f"{x:.2f}" for x in r["accept_rates"]] + ["-"] * (depth - len(r["accept_rates"]))
    lossless = "yes" if r["lossless"] else (
        f"{r['num_mismatches']} differ: {r['num_ties']} at ties, {r['num_real_mismatches']} real")
    tree = f"{r['tree']} ({r['tree_nodes']})" if r["tree"] else "-"
    lines.append("| " + " | ".join([r["name"], tree, f"{r['tau']:.2f}", f"{r['tokens_per_s']:.1f}",
                                    f"{r['speedup']:.2f}x", f"{r['step_cost_vs_ar']:.2f}"] + rates
                                   + [lossless]) + " |")
  lines += ["", "tau: tokens per base forward, bonus token included. step cost: wall time of "
            "one step (draft + verify + accept) over one autoregressive step; speedup ~ tau / "
            "step cost. accept@d: fraction of steps accepting >= d draft tokens (tau = 1 + sum "
            "of accept@d)."]
  if any(r.get("num_mismatches") for r in rows) or setup.get("dtype", "float32") != "float32":
    lines += ["", "Outputs that differ from autoregressive decoding, judged at the first "
              "differing position p (hydra_jax/decoding/tie_check.py): a tie when the AR and "
              "speculative tokens' logits at p differ by at most 4x the logits' own rounding "
              "there (max |logit - f32 logit| over the top tokens, same weights: two forwards "
              "each that far from f32 can rank the pair apart), or when a plain bf16 decode of "
              "the verify's shape (the generated tokens forwarded k at a time over the KV cache, "
              "k = the tree's nodes, then 2, 4, 8, 16) picks the speculative token too; in f32 "
              "every difference is real.", "",
              "| method | outputs | identical | differ at ties | of those by a chunked decode | "
              "real mismatches | first (p, gap, rounding) |", "|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
      first = next(iter(r["mismatches"]), None)
      where = ("-" if first is None or "gap" not in first else
               f"{first['position']}, {first['gap']:.3g}, {first['rounding']:.3g}")
      n = setup.get("num_outputs", 0)
      lines.append(f"| {r['name']} | {n} | {n - r['num_mismatches']} | {r['num_ties']} | "
                   f"{r['num_ties_by_chunk']} | {r['num_real_mismatches']} | {where} |")
  return "\n".join(lines) + "\n"


def plot(rows: List[Dict[str, Any]], path: str, title: str) -> bool:
  """Draws the results figure to `path`; False (and one log line) where matplotlib is missing:
  it is an optional extra, the table and JSON need nothing."""
  try:
    import matplotlib
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, pyplot untouched
  except ImportError:
    log.warning("plot skipped: matplotlib is not installed (pip install matplotlib, or "
                "pip install -e '.[plot]')")
    return False
  names = [r["name"] for r in rows]
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  fig = Figure(figsize=(16, 4.8))
  axes = fig.subplots(1, 3)
  for ax, key, label in ((axes[0], "tau", "tau: tokens per base forward"),
                         (axes[1], "speedup", "speedup vs autoregressive (x)")):
    vals = [r[key] for r in rows]
    bars = ax.bar(range(len(rows)), vals, color=[colors[i % len(colors)] for i in range(len(rows))])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(label, fontsize=10)
  spec = [r for r in rows if r["tree"]]
  ax = axes[2]
  if spec:
    max_n = max(int(n) for r in spec for n in r["accept_hist"])
    width = 0.8 / len(spec)
    for i, r in enumerate(spec):
      xs = [int(n) + (i - (len(spec) - 1) / 2) * width for n in r["accept_hist"]]
      ax.bar(xs, list(r["accept_hist"].values()), width=width, label=r["name"],
             color=colors[(rows.index(r)) % len(colors)])
    ax.set_xticks(range(1, max_n + 1))
    ax.legend(fontsize=7)
  ax.set_xlabel("tokens emitted per step (accepted + bonus)")
  ax.set_ylabel("fraction of steps")
  ax.set_title("accepted tokens per step", fontsize=10)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


# --- main ------------------------------------------------------------------------------------


def parse_heads(specs: Sequence[str]) -> List[Tuple[str, str]]:
  out = []
  for s in specs:
    name, sep, path = s.partition("=")
    if not sep or not name or not path:
      raise BenchError(f"--heads takes NAME=DIR pairs, e.g. hydra=path/to/heads; got {s!r}")
    out.append((name, path))
  if len({n for n, _ in out}) != len(out):
    raise BenchError("--heads names must be distinct")
  return out


def parse_args(argv=None) -> argparse.Namespace:
  from hydra_jax.registry import embedded
  p = argparse.ArgumentParser(prog="python -m hydra_jax.tools.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=embedded.MODEL_DIR,
                 help="Hugging Face model directory (default: the embedded TinyShakespeare model)")
  p.add_argument("--heads", nargs="+", default=None, metavar="NAME=DIR",
                 help="draft heads to compare (ours or released Hydra/Medusa dirs); default: the "
                      "embedded model's shipped heads")
  p.add_argument("--prompts", default=embedded.PROMPTS_FILE,
                 help="JSONL ({\"prompt\"} / {\"prompt_ids\"} / MT-Bench {\"turns\"}) or one "
                      "prompt per line (default: held-out Shakespeare prompts)")
  p.add_argument("--turns", choices=("first", "all"), default="first",
                 help="MT-Bench: first turns only, or both turns sequentially")
  p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="raw",
                 help="raw text, the tokenizer's chat template, or FastChat's vicuna_v1.1")
  p.add_argument("--max-prompts", type=int, default=0, help="use the first N prompts (0 = all)")
  p.add_argument("--tree", nargs="+", default=["mc_sim_7b_63"],
                 help="tree preset name(s), JSON file(s), dynamic:N[:D[:K]] or auto (each "
                      "heads' fitted tree); every heads x tree pair is a row")
  p.add_argument("--batch-size", type=int, default=1)
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--cache-len", type=int, default=None,
                 help="KV cache slots (default: longest prompt + max new tokens + tree, bucketed)")
  p.add_argument("--repeats", type=int, default=3, help="timed passes; times are medians")
  p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                 help="param and compute dtype of the base model and the heads (auto: the one "
                      "tree_fit measured faster for the first heads on this device, else the "
                      "platform's default; see hydra_jax.decoding.dtype_choice)")
  p.add_argument("--out", default="bench_out", help="directory for results.{md,json,png}")
  return p.parse_args(argv)


def _device() -> str:
  import jax
  d = jax.devices()[0]
  return f"{jax.device_count()} x {d.platform}:{getattr(d, 'device_kind', '?')}"


def run(args: argparse.Namespace) -> Dict[str, Any]:
  from hydra_jax.registry import embedded
  from hydra_jax.decoding import dtype_choice
  from hydra_jax.decoding.api import dtype_name, load_draft_heads, load_model, plan_shapes
  from hydra_jax.decoding.tree import resolve_tree

  heads_specs = (parse_heads(args.heads) if args.heads
                 else [(embedded.HEAD_LABELS[k], d) for k, d in embedded.heads_dirs().items()])
  if not heads_specs:
    raise BenchError("no draft heads: pass --heads NAME=DIR (the embedded model's heads are "
                     f"not in {embedded.HEADS_ROOT})")
  if args.batch_size < 1 or args.max_new_tokens < 1 or args.repeats < 1:
    raise BenchError("--batch-size, --max-new-tokens and --repeats must be >= 1")
  entries = read_prompts(args.prompts)
  if args.max_prompts:
    entries = entries[:args.max_prompts]

  if args.dtype == dtype_choice.DTYPE_AUTO:  # every method runs in the one dtype chosen
    args.dtype, why = dtype_choice.resolve_dtype(args.dtype, heads_specs[0][1])
    dtype_choice.announce(args.dtype, why)
  model = load_model(args.model, dtype=args.dtype)
  methods = [Method("autoregressive")]
  for name, path in heads_specs:
    heads = load_draft_heads(model, path)  # once: generate then reuses the arrays
    for spec in args.tree:
      tree = resolve_tree(spec, path, heads[0].num_heads, heads[0].draft_vocab_size,
                          dtype=dtype_name(model))
      label = name if len(args.tree) == 1 else f"{name} / {tree.name}"
      methods.append(Method(label, name, heads, tree, heads[0].arch, path))

  # Turn by turn: the prompts of turn j+1 hold the autoregressive answers of turn j.
  rounds = 2 if args.turns == "all" else 1
  conversations: List[List[Dict[str, str]]] = [[] for _ in entries]
  cache_lens, prompt_tokens = [], []
  for turn in range(rounds):
    index = [i for i, e in enumerate(entries)
             if turn == 0 or (isinstance(e[0], str) and len(e) > turn)]
    if not index:
      break
    prompt_ids = []
    for i in index:
      e = entries[i]
      if not isinstance(e[0], str):  # a "prompt_ids" record: used as is
        prompt_ids.append(list(e))
        continue
      conversations[i].append({"role": "user", "content": e[turn]})
      prompt_ids.append(encode_conversation(model.tokenizer, conversations[i],
                                            args.prompt_format))
    prompt_tokens.append([len(p) for p in prompt_ids])
    # One cache length for every method (room for the biggest tree): same attention cost.
    _, cache_len = plan_shapes([len(p) for p in prompt_ids], args.max_new_tokens,
                               model.config.max_position_embeddings, args.cache_len,
                               extra_slots=max(m.tree.num_nodes for m in methods[1:]))
    cache_lens.append(cache_len)
    first = len(methods[0].results)
    warm_up(methods, model, prompt_ids, args.batch_size, cache_len)
    run_methods(methods, model, prompt_ids, index, turn, args.max_new_tokens, args.batch_size,
                cache_len, args.repeats)
    for i, r in zip(index, methods[0].results[first:]):
      conversations[i].append({"role": "assistant", "content": r.text or ""})

  from hydra_jax.decoding.tie_check import TieChecker
  checker = TieChecker(model.config, model.params, args.dtype)
  rows = []
  for m in methods:
    t0 = time.perf_counter()
    rows.append(method_metrics(m, methods[0], checker))
    if rows[-1]["num_mismatches"]:  # each judged difference is a forward or a few compiles
      log.info("tie check %s: %d differing outputs judged in %.1fs", m.name,
               rows[-1]["num_mismatches"], time.perf_counter() - t0)
  finish_speedups(rows)
  setup = {
      "model": args.model, "dtype": args.dtype, "prompts": args.prompts,
      "num_prompts": len(entries), "turns": args.turns, "prompt_format": args.prompt_format,
      "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
      "repeats": args.repeats, "cache_len": cache_lens[0], "cache_lens": cache_lens,
      "trees": list(args.tree), "heads": {n: p for n, p in heads_specs}, "device": _device(),
      "prompt_tokens": prompt_tokens, "num_outputs": len(methods[0].results),
  }
  outputs = []
  for j, ((turn, i), r) in enumerate(zip(methods[0].labels, methods[0].results)):
    runs = {}
    for m in methods:
      res = m.results[j]
      runs[m.name] = {"text": res.text, "new_tokens": res.new_tokens, "time_s": res.time_s,
                      "accepted_per_step": list(res.extra.get("accepted_per_step")
                                                or [1] * max(res.new_tokens - 1, 0))}
    outputs.append({"turn": turn + 1, "prompt": i, "prompt_tokens": len(r.prompt_ids),
                    "text": r.text, "new_tokens": r.new_tokens,
                    "accept_length": {m.name: m.results[j].extra.get("accept_length")
                                      for m in methods[1:]}, "runs": runs})
  return {"setup": setup, "methods": rows, "outputs": outputs,
          "prompt_meta": prompt_meta(args.prompts, len(entries))}


def prompt_meta(path: str, count: int) -> List[Dict[str, Any]]:
  """question_id / category of each entry of a JSONL prompts file (MT-Bench has both)."""
  out = []
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          obj = json.loads(line)
          out.append({"question_id": obj.get("question_id", len(out)),
                      "category": obj.get("category")} if isinstance(obj, dict) else {})
  except (OSError, json.JSONDecodeError):
    pass
  out += [{"question_id": i, "category": None} for i in range(len(out), count)]
  return out[:count]


def specbench_records(report: Dict[str, Any], method: str) -> List[Dict[str, Any]]:
  """One Spec-Bench answer record per prompt for `method` (evaluation/speed.py reads them).

  Per turn: new_tokens and wall_time (its batch's time: rows of a batch share it, so use
  batch 1 for per-question times); accept_lengths: the tokens each step emitted (bonus
  included), all turns in order; AR steps emit 1.
  """
  per_prompt: Dict[int, Dict[str, Any]] = {}
  for out in report["outputs"]:
    rec = per_prompt.setdefault(out["prompt"], {
        **report["prompt_meta"][out["prompt"]], "answer_id": f"{method}-{out['prompt']}",
        "model_id": method, "choices": [{"index": 0, "turns": [], "new_tokens": [],
                                         "wall_time": [], "accept_lengths": []}]})
    run = out["runs"][method]
    choice = rec["choices"][0]
    choice["turns"].append(run["text"])
    choice["new_tokens"].append(run["new_tokens"])
    choice["wall_time"].append(run["time_s"])
    choice["accept_lengths"].extend(run["accepted_per_step"])
  return [per_prompt[k] for k in sorted(per_prompt)]


def write_outputs(report: Dict[str, Any], out_dir: str) -> str:
  os.makedirs(out_dir, exist_ok=True)
  spec_dir = os.path.join(out_dir, "specbench")
  os.makedirs(spec_dir, exist_ok=True)
  for row in report["methods"]:
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", row["name"]).strip("_")
    with open(os.path.join(spec_dir, f"{name}.jsonl"), "w") as f:
      for rec in specbench_records(report, row["name"]):
        f.write(json.dumps(rec) + "\n")
  md = markdown_table(report["methods"], report["setup"])
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(md)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(report, f, indent=1)
  s = report["setup"]
  png = os.path.join(out_dir, "results.png")
  if os.path.exists(png):
    os.remove(png)  # a stale figure from an earlier run would not match this table
  plot(report["methods"], png,
       f"{os.path.basename(os.path.normpath(s['model']))}, {s['num_prompts']} prompts, batch "
       f"{s['batch_size']}, {s['max_new_tokens']} new tokens, {s['device']}")
  return md


def main(argv=None) -> int:
  args = parse_args(argv)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(message)s"))
  logger = logging.getLogger("hydra_jax")  # ours (bench, decoding) on stderr, once
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  logging.getLogger("hydra_jax.decoding").setLevel(logging.WARNING)  # not a line per batch
  from hydra_jax.decoding.api import INPUT_ERRORS
  try:
    report = run(args)
  except (BenchError,) + INPUT_ERRORS as e:
    print(f"hydra_jax.tools.bench: error: {e}", file=sys.stderr)
    return 2
  md = write_outputs(report, args.out)
  print(md)
  png = ", results.png" if os.path.isfile(os.path.join(args.out, "results.png")) else ""
  print(f"wrote {os.path.join(args.out, 'results.md')}, results.json{png} and "
        f"specbench/METHOD.jsonl (Spec-Bench's evaluation/speed.py format)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
