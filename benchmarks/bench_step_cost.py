"""Step-cost profiler: an autoregressive step vs a speculative step, broken into its parts.

    python benchmarks/bench_step_cost.py                      # embedded + random 50M / 150M
    python benchmarks/bench_step_cost.py --models embedded --trees 2 4 8 --threads 1
    python benchmarks/bench_step_cost.py --lm-head base --draft-vocab 512   # cheaper drafting

One table, one run. For every model, thread setting, head kind and tree, each row times
(`hydra_jax.decoding.step_timing`: the engine's own step functions, `--iters` steps per
jitted fori_loop, every step on the same `--context` cached tokens, median of `--repeats`,
all candidates of a model interleaved) cumulative prefixes of one speculative step:

  draft    the heads propose the tree's tokens (Hydra++: from the context g)
  verify   + the base forward over the N tree tokens
  accept   + the accept rule (greedy: argmax + longest agreeing path)
  commit   + the accepted K/V moved to contiguous cache slots
  prefix   + g for the next step (Hydra++: the prefix layer over the accepted positions)
  step     + bookkeeping: emitted tokens, stop rules, counters (the whole loop body)

and prints each part as the difference of consecutive prefixes, next to the autoregressive
step (one-token forward + sampling + the same bookkeeping). `spec/AR` is the step-cost ratio:
a speculative step pays when its accept length tau exceeds it (speedup ~ tau / ratio).
Differences of noisy timings can come out slightly negative; medians of interleaved runs keep
that small. Threads: "1" runs XLA:CPU on one core (a child process with
--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1, pinned to the last CPU it
may use: the flags alone left jaxlib 0.10's fusions and GEMMs on both cores of a 2-core EPYC,
1.8-1.9 cores busy), "default" as installed.

Models: `embedded` is the shipped TinyShakespeare model with its shipped heads, `smollm2`
SmolLM2-135M-Instruct (`python -m hydra_jax.registry.models path smollm2` prepares it) with
its shipped heads; `random50m`
and `random150m` are random Llamas with random heads (weights do not change step costs).
Trees: a number n is the n-token tree (root included) grown from the preset accuracy model
(`tree.grow_tree`), or a preset name / JSON file; `auto` is each shipped heads' fitted tree;
`dynamic:N[:D[:K[:T]]]` a dynamic tree (its draft row includes choosing the topology and its
verify row building the per-row mask). `--verify-products dot reduce` times f32 verify forwards
both ways on a CPU (XLA's dot, or llama.dense's multiply-and-reduce over row-major copies).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from typing import Any, Dict, List

ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
PHASES = ("draft", "verify", "accept", "commit", "prefix", "step")
KINDS = {"medusa": "medusa", "hydra": "hydra", "hydra_pp": "hydra++"}
RANDOM_MODELS = {
    # ~50M and ~150M Llamas (GQA, untied LM head), shapes of the small public Llamas.
    "random50m": dict(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_layers=10,
                      num_heads=8, num_kv_heads=4, head_dim=64),
    "random150m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=16,
                       num_heads=12, num_kv_heads=4, head_dim=64),
}


# --verify-products -> DecodeEngine(row_major_copies=...)
VERIFY_PRODUCTS = {"auto": None, "dot": False, "reduce": True}


def _parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=["embedded", "random50m", "random150m"],
                 choices=["embedded", "smollm2"] + sorted(RANDOM_MODELS))
  p.add_argument("--heads", nargs="+", default=list(KINDS), choices=list(KINDS))
  p.add_argument("--trees", nargs="+", default=["2", "8", "64"],
                 help="tree sizes (tokens per step), preset names, JSON files or auto")
  p.add_argument("--threads", nargs="+", default=["1", "default"], choices=["1", "default"])
  p.add_argument("--context", type=int, default=96, help="cached tokens every step sees")
  p.add_argument("--iters", type=int, default=8, help="steps per timed loop")
  p.add_argument("--repeats", type=int, default=5, help="timed loops per candidate (median)")
  p.add_argument("--no-breakdown", action="store_true", help="time whole steps only")
  p.add_argument("--lm-head", choices=["own", "base"], default=None,
                 help="random heads (also for the embedded model): own LM heads or the base's "
                      "shared one")
  p.add_argument("--draft-vocab", type=int, default=0,
                 help="random heads (also for the embedded model): draft vocabulary size "
                      "(0 = full vocabulary)")
  p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32"],
                 help="weights and matmul inputs (products accumulate in f32); several are "
                      "timed interleaved in one process")
  p.add_argument("--verify-products", nargs="+", choices=list(VERIFY_PRODUCTS), default=["auto"],
                 help="how f32 verify forwards multiply on a CPU: the engine's choice, XLA's "
                      "dot, or multiply-and-reduce over row-major kernel copies (llama.dense); "
                      "several are timed interleaved, as rows 'tree [choice]'")
  p.add_argument("--out", default=None, help="write the rows as JSON here")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  return p.parse_args(argv)


# --- measuring (in a child process, whose XLA flags are fixed at start) ----------------------


def _trees(specs, heads_cfg, heads_dir, dtype=None):
  from hydra_jax.decoding.tree import compile_tree, grow_tree, preset_accuracies, resolve_tree
  out = []
  for spec in specs:
    if spec.isdigit():
      n = int(spec)
      depth = min(heads_cfg.num_heads, 4)
      acc = preset_accuracies()[:depth]
      out.append(compile_tree(grow_tree(acc, n - 1), name=f"grown_{n}"))
    else:
      out.append(resolve_tree(spec, heads_dir, heads_cfg.num_heads, heads_cfg.draft_vocab_size,
                              dtype=dtype))
  return out


def _random_model(name: str, dtype: str):
  import jax
  import jax.numpy as jnp
  from hydra_jax.checkpoint.hf import HFModel
  from hydra_jax.model.config import ModelConfig
  from hydra_jax.model.llama import init_params
  cfg = ModelConfig(**RANDOM_MODELS[name], rms_norm_eps=1e-5, max_position_embeddings=2048)
  dt = jnp.dtype(dtype)
  params = jax.jit(lambda r: init_params(cfg, r, param_dtype=dt))(jax.random.PRNGKey(0))
  return HFModel(config=cfg, params=params, tokenizer=None, path=name, dtype=dt)


def _random_heads(model, kind, lm_head, draft_vocab):
  import jax
  from hydra_jax.model.heads import HeadsConfig, init_heads
  cfg = HeadsConfig.for_base(model.config, KINDS[kind], num_heads=4,
                             num_layers=4 if kind == "hydra_pp" else 1, lm_head=lm_head or "own",
                             draft_vocab=tuple(range(draft_vocab)))
  params = init_heads(cfg, model.config, model.params, jax.random.PRNGKey(1))
  return cfg, jax.tree_util.tree_map(lambda x: x.astype(model.dtype), params)


def _partial_step(engine, upto: str):
  """make_step for step_timing: a speculative step cut after phase `upto` (see module doc).

  Each cut returns the state with what the phase produced fed into the next step's root (and
  cache), so that XLA keeps all of the phase's work.
  """
  import jax.numpy as jnp
  from hydra_jax.decoding import speculative as spec
  from hydra_jax.decoding.drafting import DraftInputs
  from hydra_jax.decoding.step_timing import NO_STOP
  models = engine.models
  dynamic = models.tree.dynamic  # a dynamic tree's drafter also returns the topology

  def make(params, heads_params, accept_params):
    drafter = engine.drafter_factory(models, params, heads_params)

    def one(s):
      lengths = s.cache.lengths
      draft = drafter(DraftInputs(root_B=s.last_token, context_BxE=s.spec.context_BxE,
                                  num_out_B=s.num_generated, step=s.step))
      if dynamic:  # the topology too: keep all of it alive
        draft = draft.replace(tokens_BxN=draft.tokens_BxN.at[:, 0].set(s.last_token))
        tokens = draft.tokens_BxN
        kept = jnp.max(tokens + draft.parents_BxN + draft.depths_BxN, axis=1)
      else:
        tokens = draft.at[:, 0].set(s.last_token)
        kept = jnp.max(tokens, axis=1)
      if upto == "draft":
        return s.replace(last_token=kept)
      if dynamic:
        logits, hidden, cache = spec.verify_dynamic(models, params, draft, s.cache)
      else:
        logits, hidden, cache = spec.verify(models, params, tokens, s.cache)
      if upto == "verify":
        return s.replace(cache=cache, last_token=jnp.argmax(logits[:, -1], -1).astype(jnp.int32))
      a, path, last, bonus = spec.accept_tree(models.tree, tokens, logits, s, accept_params,
                                              engine.accept, draft if dynamic else None)
      if upto == "accept":
        return s.replace(cache=cache, last_token=bonus + a)
      commit = jnp.where(~s.done, a + 1, 0)
      cache = spec.commit_kv(cache, lengths, path, commit)
      if upto == "commit":
        return s.replace(cache=cache, last_token=bonus)
      context, prefix_cache = spec.next_context(models, heads_params, s.spec, hidden, path, a,
                                                last, lengths, commit)
      if upto == "prefix":
        return s.replace(cache=cache, last_token=bonus, spec=s.spec.replace(
            context_BxE=context.astype(s.spec.context_BxE.dtype), prefix_cache=prefix_cache))
      return spec.emit_accepted(s, tokens, path, a, bonus, cache, context, prefix_cache, NO_STOP,
                                models.tree.num_nodes)
    return one
  return make


def _ar_forward_only(engine):
  import jax.numpy as jnp
  from hydra_jax.model.masks import cache_causal_mask

  def make(params, heads_params, accept_params):
    def one(s):
      mask = cache_causal_mask(s.cache.lengths, 1, s.cache.max_len)
      logits, _, cache = engine.model.apply({"params": params}, s.last_token[:, None],
                                            s.cache.lengths[:, None], s.cache, mask)
      return s.replace(cache=cache, last_token=jnp.argmax(logits[:, 0], -1).astype(jnp.int32))
    return one
  return make


def measure(args) -> List[Dict[str, Any]]:
  from hydra_jax.decoding.step_timing import interleaved_medians
  import jax

  rows = []
  for name in args.models:
    cands = []
    for dtype in args.dtypes:
      cands += _candidates(args, name, dtype)
    times = interleaved_medians([c[-1] for c in cands], args.repeats)
    for (model, dtype, kind, tree, size, phase, _), t in zip(cands, times):
      rows.append(dict(model=name, params_m=model.config.num_params / 1e6, dtype=dtype,
                       threads=os.environ.get("HYDRA_BENCH_THREADS", "default"), kind=kind,
                       tree=tree, size=size, phase=phase, ms=t * 1e3,
                       device=jax.devices()[0].device_kind))
  return rows


def _candidates(args, name: str, dtype: str):
  """(model, dtype, kind, tree, size, phase, timer) for every row of one model and dtype."""
  from hydra_jax.registry import embedded
  from hydra_jax.decoding.api import load_draft_heads, load_model
  from hydra_jax.decoding.engine import DecodeEngine
  from hydra_jax.decoding.step_timing import steady_state_timer
  from hydra_jax.registry import models as registry
  shipped = {"embedded": lambda: (embedded.MODEL_DIR, embedded.heads_dirs()),
             "smollm2": lambda: (registry.model_path("smollm2"),
                                 {k: registry.heads_path("smollm2", k) for k in KINDS})}
  if name in shipped:
    model_dir, heads_dirs = shipped[name]()
    model = load_model(model_dir, dtype=dtype, tokenizer=False)
  else:
    model = _random_model(name, dtype)
  if name in shipped and not (args.lm_head or args.draft_vocab):
    heads = {k: (load_draft_heads(model, d), d) for k, d in heads_dirs.items() if k in args.heads}
  else:  # random heads with the asked-for LM-head options (step costs do not need weights)
    heads = {k: (_random_heads(model, k, args.lm_head, args.draft_vocab), None)
             for k in args.heads}
  cache_len = -(-(args.context + 128) // 128) * 128
  timer = lambda engine, hp, make=None: steady_state_timer(
      engine, model.params, hp, args.context, cache_len, 1, args.iters, make)
  ar = DecodeEngine(model.config, model.dtype)
  cands = [(model, dtype, "autoregressive", "-", 1, "forward", timer(ar, None, _ar_forward_only(ar))),
           (model, dtype, "autoregressive", "-", 1, "step", timer(ar, None))]
  for kind, ((hcfg, hparams), hdir) in heads.items():
    for tree, products in itertools.product(_trees(args.trees, hcfg, hdir, dtype),
                                            args.verify_products):
      engine = DecodeEngine(model.config, model.dtype, hcfg, tree,
                            row_major_copies=VERIFY_PRODUCTS[products])
      label = tree.name if len(args.verify_products) == 1 else f"{tree.name} [{products}]"
      for phase in ("step",) if args.no_breakdown else PHASES:
        if phase == "prefix" and not hcfg.prefix_layer:
          continue  # g is a slice of the verify forward's hidden states: nothing to time
        make = None if phase == "step" else _partial_step(engine, phase)
        cands.append((model, dtype, kind, label, tree.num_nodes, phase,
                      timer(engine, hparams, make)))
    print(f"# {name} {dtype}: compiled {kind}", file=sys.stderr, flush=True)
  return cands


# --- the table -------------------------------------------------------------------------------


def table(rows: List[Dict[str, Any]]) -> str:
  head = ("| model | dtype | threads | heads | tree (tokens) | AR step ms | draft | verify | "
          "accept | commit | prefix | bookkeeping | spec step ms | spec/AR |")
  lines = [head, "|" + "---|" * 14]
  groups: Dict[tuple, Dict[str, float]] = {}
  for r in rows:
    groups.setdefault((r["model"], r["dtype"], r["threads"], r["kind"], r["tree"], r["size"]),
                      {})[r["phase"]] = r["ms"]
  for (model, dtype, threads, kind, tree, size), ph in groups.items():
    if kind == "autoregressive":
      continue
    ar = groups[(model, dtype, threads, "autoregressive", "-", 1)]["step"]
    parts, prev = [], 0.0
    for phase in PHASES:
      if phase in ph:
        parts.append(f"{ph[phase] - prev:.2f}")
        prev = ph[phase]
      else:
        parts.append("-")
    if len([p for p in parts if p != "-"]) == 1:  # --no-breakdown
      parts = ["-"] * (len(PHASES) - 1) + ["-"]
    lines.append(f"| {model} | {dtype} | {threads} | {kind} | {tree} ({size}) | {ar:.2f} | "
                 + " | ".join(parts) + f" | {ph['step']:.2f} | {ph['step'] / ar:.2f} |")
  ars = {(r["model"], r["dtype"], r["threads"]): r for r in rows if r["kind"] == "autoregressive"}
  notes = []
  for (model, dtype, threads), r in ars.items():
    fwd = groups[(model, dtype, threads, "autoregressive", "-", 1)]
    notes.append(f"{model} ({r['params_m']:.1f}M params) {dtype}, {threads} thread(s): AR step "
                 f"{fwd['step']:.2f} ms, of which the one-token forward {fwd['forward']:.2f} ms")
  return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def main(argv=None) -> int:
  args = _parse(argv)
  if args.child:
    print(json.dumps(measure(args)))
    return 0
  rows = []
  for threads in args.threads:
    env = dict(os.environ, HYDRA_BENCH_THREADS=threads, JAX_PLATFORMS=os.environ.get(
        "JAX_PLATFORMS", "cpu"))
    pin = None
    if threads == "1":
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + ONE_THREAD).strip()
      core = max(os.sched_getaffinity(0))
      pin = lambda: os.sched_setaffinity(0, {core})  # noqa: E731
    child = [a for a in (argv if argv is not None else sys.argv[1:])]
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *child], env=env,
                          stdout=subprocess.PIPE, text=True, preexec_fn=pin)
    if proc.returncode:
      return proc.returncode
    rows += json.loads(proc.stdout.strip().splitlines()[-1])
  print(table(rows))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
