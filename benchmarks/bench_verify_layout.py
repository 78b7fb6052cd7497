"""A tied LM head read as the embedding [V, E] or as an [E, V] copy: decode steps side by side.

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c 1 \\
      python benchmarks/bench_verify_layout.py --model smollm2 \\
        --heads hydra_jax/assets/smollm2/heads/hydra_pp --trees auto greedy_7 --dtype float32

On a CPU the decode engine hands a tied model an [E, V] copy of its embedding, made once per
set of weights outside jit (`DecodeEngine.run_params`), and `LlamaModel.logits` reads it for
products of two or more rows (a verify forward, a batch, a bf16 row computed twice): XLA:CPU's
GEMM reads that layout much faster, while the one-row f32 GEMV reads the embedding as it lies
(so f32 autoregressive decoding gets no copy; this script forces it on and off everywhere).
This times the autoregressive step and one speculative step per tree both ways, side by side
(the engine's own loop bodies, `step_timing`: every step on the same cached context,
candidates interleaved, median of --repeats). Trees: `auto` (the heads' fitted tree for the
dtype), a preset, a JSON file or `dynamic:N`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2", help="registry name or model directory (tied)")
  p.add_argument("--heads", required=True)
  p.add_argument("--trees", nargs="+", default=["auto"])
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--context", type=int, default=96, help="cached tokens every step sees")
  p.add_argument("--repeats", type=int, default=7)
  args = p.parse_args(argv)

  import jax
  from hydra_jax.decoding import api
  from hydra_jax.decoding.engine import DecodeEngine
  from hydra_jax.decoding.step_timing import interleaved_medians, steady_state_timer
  from hydra_jax.decoding.tree import resolve_tree
  model = api.load_model(args.model, dtype=args.dtype, tokenizer=False)
  if not model.config.tie_word_embeddings:
    raise SystemExit(f"{args.model} has its own LM head: there is no layout to choose")
  heads_cfg, heads_params = api.load_draft_heads(model, args.heads)
  names, fns = [], []
  for spec in [None] + list(args.trees):
    tree = None if spec is None else resolve_tree(
        spec, args.heads, heads_cfg.num_heads, heads_cfg.draft_vocab_size, args.dtype)
    for copy in (False, True):
      engine = DecodeEngine(model.config, model.dtype, heads_cfg if tree else None, tree)
      engine.copy_tied_head = copy
      fns.append(steady_state_timer(engine, model.params, heads_params if tree else None,
                                    args.context))
    names.append("autoregressive" if tree is None else f"{tree.name} ({tree.num_nodes})")
  times = interleaved_medians(fns, args.repeats)
  print(f"{args.model} ({args.dtype}), heads {args.heads}, context {args.context}, "
        f"{jax.devices()[0].device_kind} {platform.machine()}; median of {args.repeats}\n")
  print("| step | embedding [V, E] ms | [E, V] copy ms | copy / embedding | over AR, embedding | "
        "over AR, copy |")
  print("|---|---|---|---|---|---|")
  ar_tied, ar_copy = times[0], times[1]
  for i, name in enumerate(names):
    tied, copy = times[2 * i], times[2 * i + 1]
    print(f"| {name} | {tied * 1e3:.2f} | {copy * 1e3:.2f} | {copy / tied:.3f} | "
          f"{tied / ar_tied:.2f} | {copy / ar_copy:.2f} |")


if __name__ == "__main__":
  main()
