"""Head-training throughput on a tiny model, and what the heads add to a base forward.

  python benchmarks/bench_train.py [--archs medusa,hydra,hydra++] [--batch 8] [--seq 128]
                                   [--steps 10] [--chunk 64] [--mesh 1,1,1]

For each arch: compile time of the train step, median step time, head-training tokens/s,
the step's cost relative to a jitted forward of the frozen base alone on the same batch
(logits included), XLA's temp-buffer size for both (its own accounting of the peak working
set) and the process's peak RSS. Random weights: the numbers are about cost, not quality.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import numpy as np

from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import HeadsConfig
from hydra_jax.model.llama import LlamaModel, init_params
from hydra_jax.parallel import sharding
from hydra_jax.training import optimizer, step


def tiny_config(vocab: int) -> ModelConfig:
  return ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048)


def _median_time(fn, n: int) -> float:
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def bench_arch(arch: str, cfg: ModelConfig, base, mesh, args) -> dict:
  heads_cfg = HeadsConfig.for_base(cfg, arch, num_heads=args.heads,
                                   num_layers=args.layers,
                                   dropout=0.2 if arch == "hydra++" else 0.0)
  train_cfg = dict(loss="teacher" if arch == "hydra++" else "hard", base_dtype=args.base_dtype,
                   compute_dtype="float32", logits_chunk=args.chunk)
  opt = optimizer.make_optimizer(dict(lr=1e-3, warmup_steps=2, weight_decay=0.1), 1000)
  state, shardings = step.create_train_state(cfg, heads_cfg, base, opt, mesh)
  base_sh = jax.tree.map(lambda x: x.sharding, base)
  train_step = step.build_train_step(cfg, heads_cfg, train_cfg, opt, mesh, shardings, base_sh)
  rng = np.random.default_rng(0)
  batch = sharding.make_global_batch({
      "tokens": rng.integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32),
      "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1)),
      "loss_mask": np.ones((args.batch, args.seq), np.float32)}, mesh)
  key = jax.random.PRNGKey(0)

  t0 = time.perf_counter()
  compiled = train_step.lower(state, base, batch, key).compile()
  compile_s = time.perf_counter() - t0
  step_temp = compiled.memory_analysis().temp_size_in_bytes
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], base, batch, key)
    return metrics["loss"]

  one_step()  # warm
  step_s = _median_time(one_step, args.steps)
  return dict(arch=arch, compile_s=compile_s, step_s=step_s,
              tokens_per_s=args.batch * args.seq / step_s, step_temp=step_temp)


def bench_base_forward(cfg: ModelConfig, base, mesh, args) -> dict:
  model = LlamaModel(cfg, dtype=step.parse_dtype(args.base_dtype))
  tokens = sharding.make_global_batch(
      {"t": np.zeros((args.batch, args.seq), np.int32),
       "p": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1))}, mesh)
  fwd = jax.jit(lambda p, t, pos: model.apply({"params": p}, t, pos)[0])
  compiled = fwd.lower(base, tokens["t"], tokens["p"]).compile()
  compiled(base, tokens["t"], tokens["p"]).block_until_ready()
  fwd_s = _median_time(lambda: compiled(base, tokens["t"], tokens["p"]), args.steps)
  return dict(fwd_s=fwd_s, fwd_temp=compiled.memory_analysis().temp_size_in_bytes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--archs", default="medusa,hydra,hydra++")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--vocab", type=int, default=512)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--layers", type=int, default=1)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--base_dtype", default="float32")
  parser.add_argument("--mesh", default="1,1,-1")
  args = parser.parse_args()

  cfg = tiny_config(args.vocab)
  mesh = sharding.make_mesh(tuple(int(x) for x in args.mesh.split(",")))
  base = sharding.shard_base_params(
      jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(0)), mesh, model_cfg=cfg)
  fwd = bench_base_forward(cfg, base, mesh, args)
  rows = [bench_arch(arch, cfg, base, mesh, args) for arch in args.archs.split(",")]

  print(f"\ntiny llama: hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab "
        f"{cfg.vocab_size}; batch {args.batch} x seq {args.seq}; {args.heads} heads x "
        f"{args.layers} layers; chunk {args.chunk}; base {args.base_dtype}; "
        f"mesh {dict(mesh.shape)} on {jax.devices()[0].platform}")
  print(f"base forward alone: {fwd['fwd_s'] * 1e3:.2f} ms/batch, XLA temp "
        f"{fwd['fwd_temp'] / 2**20:.2f} MiB")
  header = (f"{'arch':8s} {'compile s':>9s} {'step ms':>8s} {'tokens/s':>9s} "
            f"{'x base fwd':>10s} {'XLA temp MiB':>12s}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['arch']:8s} {r['compile_s']:9.1f} {r['step_s'] * 1e3:8.2f} "
          f"{r['tokens_per_s']:9.0f} {r['step_s'] / fwd['fwd_s']:10.2f} "
          f"{r['step_temp'] / 2**20:12.2f}")
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"peak RSS of this process: {peak_mib:.0f} MiB")


if __name__ == "__main__":
  jax.config.update("jax_default_matmul_precision", "float32")
  main()
