"""Accelerator check: AR decode speed against the memory roofline, and speculative step costs.

    bash benchmarks/accelerator.sh            # a random ~1.1B Llama in bf16 (GPU / TPU)
    python benchmarks/bench_accelerator.py --tiny   # the same script on a CPU, tiny sizes

One table. For batch 1 and 8:
  AR tokens/s      `generate` on random prompts (compile excluded), and the HBM roofline:
                   bytes one step must read (all weights + the KV cache in use) / the device's
                   peak bandwidth -> the best possible tokens/s, and the share we reach.
  spec step / AR   a steady-state speculative step (Hydra++ heads, random weights: costs do
                   not depend on them) over an AR step, for trees of 8, 16 and 64 tokens
                   (`step_timing`, the engines' own loop bodies; ratio = the tau a tree must
                   reach to pay).
Peak bandwidths are the vendors' published figures, looked up by device kind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# Published peak memory bandwidth, bytes/s, by a substring of jax's device_kind.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L4": 3.0e11,
                  "TPU v5 lite": 8.19e11, "TPU v5e": 8.19e11, "TPU v5p": 2.765e12,
                  "TPU v4": 1.228e12, "TPU v6": 1.64e12}

FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
            num_heads=32, num_kv_heads=4, head_dim=64)  # TinyLlama-1.1B's shapes
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=32)


def _peak(kind: str):
  return next((v for k, v in PEAK_BANDWIDTH.items() if k.lower() in kind.lower()), None)


def run(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from hydra_jax.checkpoint.hf import HFModel
  from hydra_jax.decoding.api import generate
  from hydra_jax.decoding.engine import DecodeEngine
  from hydra_jax.decoding.step_timing import interleaved_medians, steady_state_timer
  from hydra_jax.decoding.tree import compile_tree, grow_tree, preset_accuracies
  from hydra_jax.model.config import ModelConfig
  from hydra_jax.model.heads import HeadsConfig, init_heads
  from hydra_jax.model.llama import init_params

  shapes = TINY if args.tiny else FULL
  dtype = jnp.dtype(args.dtype)
  cfg = ModelConfig(**shapes, rms_norm_eps=1e-5, max_position_embeddings=4096)
  params = jax.jit(lambda r: init_params(cfg, r, param_dtype=dtype))(jax.random.PRNGKey(0))
  model = HFModel(config=cfg, params=params, tokenizer=None, path="random", dtype=dtype)
  hcfg = HeadsConfig.for_base(cfg, "hydra++", num_heads=4, num_layers=4)
  hparams = jax.tree_util.tree_map(lambda x: x.astype(dtype),
                                   init_heads(hcfg, cfg, params, jax.random.PRNGKey(1)))
  device = jax.devices()[0]
  peak = _peak(device.device_kind)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  rows = []
  rng = np.random.default_rng(0)
  for batch in args.batch_sizes:
    prompts = [list(map(int, rng.integers(3, cfg.vocab_size, args.prompt_len)))
               for _ in range(batch)]
    generate(model, prompts, 8, batch_size=batch, mode="ar")  # compile + warm up
    runs = [generate(model, prompts, args.new_tokens, batch_size=batch, mode="ar")
            for _ in range(args.repeats)]
    tps = sorted(sum(r.new_tokens for r in res) / res[0].time_s for res in runs)[len(runs) // 2]
    ctx = args.prompt_len + args.new_tokens // 2  # the mean context of a step
    kv_bytes = 2 * cfg.num_layers * batch * cfg.num_kv_heads * ctx * cfg.head_dim * dtype.itemsize
    roofline = batch * peak / (param_bytes + kv_bytes) if peak else None
    ar = DecodeEngine(cfg, dtype)
    context, cache_len = args.prompt_len + args.new_tokens // 2, 512
    timers = [steady_state_timer(ar, params, None, context, cache_len, batch, args.iters)]
    trees = [compile_tree(grow_tree(preset_accuracies(), n - 1), name=f"grown_{n}")
             for n in args.trees]
    for tree in trees:
      engine = DecodeEngine(cfg, dtype, hcfg, tree)
      timers.append(steady_state_timer(engine, params, hparams, context, cache_len, batch,
                                       args.iters))
    times = interleaved_medians(timers, args.repeats)
    rows.append(dict(batch=batch, ar_tokens_per_s=tps, roofline_tokens_per_s=roofline,
                     roofline_share=(tps / roofline) if roofline else None,
                     ar_step_ms=times[0] * 1e3,
                     spec_step_ms={t.name: x * 1e3 for t, x in zip(trees, times[1:])},
                     spec_over_ar={t.name: x / times[0] for t, x in zip(trees, times[1:])}))
  return dict(device=f"{jax.device_count()} x {device.device_kind}", dtype=str(dtype),
              params=cfg.num_params, param_bytes=param_bytes, peak_bandwidth=peak, rows=rows,
              trees=[t.name for t in trees])


def table(report: dict) -> str:
  trees = report["trees"]
  lines = [f"Random Llama, {report['params'] / 1e9:.2f}B params ({report['dtype']}), "
           f"{report['device']}, peak bandwidth "
           f"{report['peak_bandwidth'] / 1e12:.2f} TB/s" if report["peak_bandwidth"] else
           f"Random Llama, {report['params'] / 1e6:.1f}M params ({report['dtype']}), "
           f"{report['device']} (no published peak bandwidth: no roofline)", "",
           "| batch | AR tokens/s | roofline tokens/s | % of roofline | AR step ms | "
           + " | ".join(f"spec/AR {t}" for t in trees) + " |",
           "|---|---|---|---|---|" + "---|" * len(trees)]
  for r in report["rows"]:
    roof = (f"{r['roofline_tokens_per_s']:.0f} | {100 * r['roofline_share']:.0f}%"
            if r["roofline_tokens_per_s"] else "- | -")
    lines.append(f"| {r['batch']} | {r['ar_tokens_per_s']:.1f} | {roof} | {r['ar_step_ms']:.2f} | "
                 + " | ".join(f"{r['spec_over_ar'][t]:.2f}" for t in trees) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU test)")
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
  p.add_argument("--trees", type=int, nargs="+", default=[8, 16, 64])
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--iters", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=None, help="also write the report as JSON")
  args = p.parse_args(argv)
  t0 = time.time()
  report = run(args)
  report["seconds"] = time.time() - t0
  print(table(report))
  print(f"({report['seconds']:.0f} s)", file=sys.stderr)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
