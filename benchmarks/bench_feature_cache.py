r"""Head-training tokens/s with and without the feature cache: same heads, data and machine.

  python benchmarks/bench_feature_cache.py [--config configs/tiny_cpu.py] [--steps 10]
      [--max_records 256] [--dtype bfloat16] [--cache DIR] [--config.FIELD=V ...]
  python benchmarks/bench_feature_cache.py --config configs/smollm2_hydra_pp.py --steps 4 \
      --config.data.source=text --config.data.path=data/tinyshakespeare.txt  # no Magpie file

Builds the cache of the config's first --max_records training rows (timed: the one-off
cost), then trains the config's heads from the same initial state on the same shuffled
batches twice: online (the base forward in every step) and on the cached features. After
one step each (the compile), --steps steps per mode are timed in alternating blocks of two
(a shared machine's load drifts; both modes see the same drift) and the median block is
reported; batch assembly and the host-to-device copy count, as in train.py. Throughput does
not depend on the data's content, so any text does for a quick measurement.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from hydra_jax.model.llama import init_params
from hydra_jax.parallel.sharding import (LOGICAL_RULES, base_param_shardings, make_global_batch,
                                         shard_base_params)
from hydra_jax.training import feature_cache
from hydra_jax.training.data import draft_vocabulary
from hydra_jax.training.optimizer import make_optimizer
from hydra_jax.training.run_setup import heads_config_from
from hydra_jax.training.step import build_train_step, create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return "unknown (no lscpu)"
  for line in out.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return "unknown"


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class Mode:
  """One way of training the heads: its iterator, a fresh state and its jitted step."""

  def __init__(self, name, it, base, heads_cfg, config, mesh, base_params, total_steps: int):
    self.name, self.it, self.mesh, self.base_params = name, it, mesh, base_params
    opt = make_optimizer(config.optimizer, total_steps)
    self.state, shardings = create_train_state(base.config, heads_cfg, base_params, opt, mesh,
                                               LOGICAL_RULES, jax.random.PRNGKey(int(config.seed)))
    self.head_params = _count(self.state.params)
    self.step = build_train_step(base.config, heads_cfg, config.train, opt, mesh, shardings,
                                 base_param_shardings(base.config, mesh, LOGICAL_RULES))
    self.rng = jax.random.PRNGKey(1)
    self.times, self.loss = [], float("nan")
    self.first = self.run(1)  # the compile

  def run(self, n: int) -> float:
    """Seconds per step over n steps (batch assembly and host-to-device copy included)."""
    t0 = time.perf_counter()
    for _ in range(n):
      batch = make_global_batch(next(self.it), self.mesh)
      self.state, metrics = self.step(self.state, self.base_params, batch, self.rng)
    self.loss = float(jax.block_until_ready(metrics)["loss"])
    return (time.perf_counter() - t0) / n


def interleaved(modes, steps: int, block: int = 2):
  """Times `steps` steps per mode in alternating blocks (a shared machine's load changes over
  time: each mode sees the same mix); -> the median s/step per mode."""
  for _ in range(max(1, steps // block)):
    for m in modes:
      m.times.append(m.run(block))
  for m in modes:
    print(f"  {m.name}: compile + first step {m.first:.1f} s, then "
          f"{', '.join(f'{x * 1e3:.0f}' for x in m.times)} ms/step", flush=True)
  return [float(np.median(m.times)) for m in modes]


def main(argv) -> None:
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(__doc__)
    return
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "tiny_cpu.py"),
                                  "training config", flag_values=fv, sys_argv=argv)
  flags.DEFINE_integer("steps", 10, "timed steps per mode (after one warm-up step)",
                       flag_values=fv)
  flags.DEFINE_integer("max_records", 256, "rows cached (data.max_records; 0 = the config's)",
                       flag_values=fv)
  flags.DEFINE_enum("dtype", "bfloat16", list(feature_cache.DTYPES), "cached hidden dtype",
                    flag_values=fv)
  flags.DEFINE_string("cache", "", "cache directory, kept (default: a temporary one)",
                      flag_values=fv)
  fv(argv)
  config, steps = fv["config"].value, fv["steps"].value
  if fv["max_records"].value:
    config.data.max_records = fv["max_records"].value

  base, mesh, train_it = feature_cache.load_training_inputs(config)
  heads_cfg = heads_config_from(config, base.config)
  if int(config.heads.draft_vocab_size):
    heads_cfg = heads_cfg.replace(draft_vocab=draft_vocabulary(
        train_it, base.config.vocab_size, int(config.heads.draft_vocab_size)))
  g, t = train_it.global_batch_size, train_it.seq_len
  if steps + 1 > train_it.steps_per_epoch:
    print(f"note: {steps + 1} steps exceed one epoch of {train_it.steps_per_epoch}; batches "
          f"repeat in another order (the cost is the same)")

  cache = fv["cache"].value or tempfile.mkdtemp(prefix="hydra_features_")
  print(f"building the feature cache of {train_it.num_examples} rows x {t} tokens in {cache}",
        flush=True)
  t0 = time.perf_counter()
  manifest = feature_cache.write_features(
      base, train_it, mesh, cache, feature_cache.cache_identity(config, base, train_it),
      dtype=fv["dtype"].value)
  build_s = time.perf_counter() - t0
  size = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))

  base_params = shard_base_params(base.params, mesh, LOGICAL_RULES, model_cfg=base.config)
  cached_it = feature_cache.open_feature_cache(cache, config, base, train_it)  # sha256-checked
  modes = [Mode("online (base forward every step)", train_it, base, heads_cfg, config, mesh,
                base_params, steps + 1),
           Mode(f"feature cache ({manifest['dtype']})", cached_it, base, heads_cfg, config, mesh,
                base_params, steps + 1)]
  online_s, cached_s = interleaved(modes, steps)

  base_n = _count(jax.eval_shape(lambda: init_params(base.config, jax.random.PRNGKey(0))))
  print()
  print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
        f"{jax.devices()[0].platform} x {jax.device_count()}, mesh {dict(mesh.shape)}")
  print(f"base: {config.model_path} ({base_n / 1e6:.1f}M params, {config.train.base_dtype}); "
        f"heads: {heads_cfg.arch}, {heads_cfg.num_heads} x {heads_cfg.num_layers} layers "
        f"({modes[0].head_params / 1e6:.1f}M params); batch {g} x {t} tokens")
  print(f"cache: {manifest['built_rows']} rows, {manifest['tokens']} tokens, "
        f"{manifest['dtype']}, {size / 2**20:.1f} MiB, built in {build_s:.1f} s "
        f"({manifest['tokens'] / build_s:.0f} tokens/s, compile included)")
  print()
  print("| mode | ms/step (median) | head-training tokens/s | speedup | compile + first step s "
        "| loss after the timed steps |")
  print("|---|---|---|---|---|---|")
  for m, per_step in zip(modes, (online_s, cached_s)):
    print(f"| {m.name} | {per_step * 1e3:.0f} | {g * t / per_step:.0f} | "
          f"{online_s / per_step:.2f}x | {m.first:.1f} | {m.loss:.4f} |")
  saved = online_s - cached_s
  if saved > 0:
    epoch_steps = manifest["rows"] / g
    print(f"\nthe build pays for itself after {build_s / (saved * epoch_steps):.2f} epochs "
          f"over these rows ({saved * 1e3:.0f} ms saved per step)")
  if not fv["cache"].value:
    shutil.rmtree(cache)  # a temporary cache: --cache DIR keeps one


if __name__ == "__main__":
  main(sys.argv)
