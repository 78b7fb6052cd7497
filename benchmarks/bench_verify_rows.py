"""A verify forward's matmuls over T rows: one product, T one-row products, multiply-and-reduce.

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c 1 \\
      python benchmarks/bench_verify_rows.py --rows 1 2 3 4 8 --dtypes float32 bfloat16

A greedy verify runs every weight of the model over the tree's T tokens. XLA:CPU takes a
one-row f32 product on its own GEMV and two or more rows on a GEMM library (YNNPACK in jaxlib
0.10), which reads the weights at a lower rate, so how much a T-token verify costs over a
one-token step depends on the CPU (a 2-4-token SmolLM2 verify step cost 1.4-1.6 one-token
steps on one 2-core AMD EPYC and 2.3-2.4 on another, lscpu family 26 and 25). This times the
decoder's matmul chain with random weights of the model's shapes (SmolLM2-135M by default: per
layer qkv [D, 960], o [D, D], gate_up [D, 2F], down [F, D]; then the LM head [D, V]; the cheap
parts of a layer are left out) three ways, side by side in one process (candidates
interleaved, median of --repeats):

- `dense`: one product over the T rows, as the model computes it without row-major copies
  (`llama.dense`: XLA's dot);
- `per-row`: T one-row products whose results are concatenated (T GEMVs in f32; later rows
  find the layer's weights in the cache the first row pulled them into);
- `reduce`: `llama.dense` given row-major copies [O, I] of the weights, as the decode engine
  hands them to f32 CPU verify forwards of big models (`engine.wants_row_major_copies`): a
  multiply-and-reduce for 2-16 rows in f32, the dot otherwise.

It checks that all agree, and prints each against the one-row step.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _chain(project):
  """The decoder's matmul chain with `project(x, w)` for every product; w = (kernel [I, O],
  its row-major copy [O, I])."""
  import jax

  def forward(x_TxD, weights, head_DxV):
    for qkv, o, gate_up, down in weights:
      queries = project(x_TxD, qkv)[:, :o[0].shape[0]]  # stands in for attention's output
      x_TxD = x_TxD + project(queries, o)
      gu = project(x_TxD, gate_up)
      f = down[0].shape[0]
      x_TxD = x_TxD + project(jax.nn.silu(gu[:, :f]) * gu[:, f:], down)
    return project(x_TxD, head_DxV)
  return jax.jit(forward)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8])
  p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                 choices=["float32", "bfloat16"])
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--hidden", type=int, default=576)
  p.add_argument("--qkv", type=int, default=960, help="query + key + value width")
  p.add_argument("--intermediate", type=int, default=1536)
  p.add_argument("--vocab", type=int, default=49152)
  p.add_argument("--repeats", type=int, default=11)
  args = p.parse_args(argv)
  rows_list = sorted(set(args.rows) | {1})  # one row first: every ratio is against it

  import jax
  import jax.numpy as jnp
  import numpy as np
  from hydra_jax.decoding.step_timing import interleaved_medians
  from hydra_jax.model.llama import dense

  rng = np.random.default_rng(0)
  d, f = args.hidden, args.intermediate
  print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"# {args.layers} layers, D {d}, qkv {args.qkv}, F {f}, V {args.vocab}; "
        f"median of {args.repeats}, ms")
  print("| dtype | rows | weights MB | dense ms | per-row ms | reduce ms | per-row / dense | "
        "reduce / dense | dense / one row | per-row / one row | reduce / one row |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for dtype_name in args.dtypes:
    dtype = jnp.dtype(dtype_name)

    def weight(i, o):
      return jnp.asarray(rng.standard_normal((i, o), np.float32) * 0.02, dtype)
    weights = [(weight(d, args.qkv), weight(d, d),
                weight(d, 2 * f), weight(f, d)) for _ in range(args.layers)]
    head = weight(d, args.vocab)
    megabytes = (sum(w.nbytes for layer in weights for w in layer) + head.nbytes) / 1e6

    # (w [I, O], its row-major copy [O, I]): each candidate reads the half it wants
    weights = [tuple((w, jnp.transpose(w)) for w in layer) for layer in weights]
    head = (head, jnp.transpose(head))

    def per_row(x, w):
      return jnp.concatenate([dense(x[i:i + 1], w[0], dtype) for i in range(x.shape[0])],
                             axis=0)
    fns = {"dense": _chain(lambda x, w: dense(x, w[0], dtype)),
           "per-row": _chain(per_row),
           "reduce": _chain(lambda x, w: dense(x, w[0], dtype, w[1]))}
    def timer(fn, x):
      def run() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, weights, head))
        return time.perf_counter() - t0
      return run

    one_row = None
    for rows in rows_list:
      x = jnp.asarray(rng.standard_normal((rows, d)).astype(np.float32))
      outs = {n: np.asarray(fn(x, weights, head)) for n, fn in fns.items()}
      scale = float(np.abs(outs["dense"]).max()) or 1.0
      for name in ("per-row", "reduce"):
        if not np.allclose(outs["dense"], outs[name], rtol=2e-2, atol=2e-2 * scale):
          raise SystemExit(f"{name} products disagree with dense at {dtype_name}, {rows} rows")
      a, b, c = (t * 1e3 for t in interleaved_medians([timer(fn, x) for fn in fns.values()],
                                                     args.repeats))
      one_row = a if rows == 1 else one_row
      print(f"| {dtype_name} | {rows} | {megabytes:.0f} | {a:.2f} | {b:.2f} | {c:.2f} | "
            f"{b / a:.2f} | {c / a:.2f} | {a / one_row:.2f} | {b / one_row:.2f} | "
            f"{c / one_row:.2f} |", flush=True)


if __name__ == "__main__":
  main()
