"""Greedy argmax over a vocabulary: jnp.argmax against the blocked `sampling.vocab_argmax`.

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c 1 \\
      python benchmarks/bench_argmax.py --vocab 49152 --rows 1 4 8 16

Every greedy decoding step takes the argmax of its logits: one row for autoregressive
decoding, one per tree node for a greedy verify. XLA:CPU reduces (value, index) pairs over a
long axis far slower than it takes a plain max, so `vocab_argmax` takes the argmax of block
maxima, then inside the winning block. This times both on the same random logits, side by
side in one process (median of --repeats calls of a jitted function), and checks that they
agree.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--vocab", type=int, nargs="+", default=[2048, 49152])
  p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
  p.add_argument("--repeats", type=int, default=200)
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from hydra_jax.decoding.sampling import vocab_argmax
  fns = {"jnp.argmax": jax.jit(lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)),
         "vocab_argmax": jax.jit(vocab_argmax)}
  print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print("| vocab | rows | jnp.argmax ms | vocab_argmax ms | speedup |")
  print("|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for vocab in args.vocab:
    for rows in args.rows:
      x = jnp.asarray(rng.standard_normal((rows, vocab)).astype(np.float32))
      outs = {n: np.asarray(f(x)) for n, f in fns.items()}
      if not np.array_equal(outs["jnp.argmax"], outs["vocab_argmax"]):
        raise SystemExit(f"vocab_argmax disagrees with jnp.argmax at vocab {vocab} rows {rows}")
      times = {n: [] for n in fns}
      for _ in range(args.repeats):  # interleaved: both see the same machine state
        for n, f in fns.items():
          t0 = time.perf_counter()
          jax.block_until_ready(f(x))
          times[n].append(time.perf_counter() - t0)
      a, b = (float(np.median(times[n])) * 1e3 for n in fns)
      print(f"| {vocab} | {rows} | {a:.3f} | {b:.3f} | {a / b:.1f}x |")


if __name__ == "__main__":
  main()
