"""Cost of one speculative step vs one autoregressive step, and the speedup that implies.

    python benchmarks/bench_speculative.py [--batch-sizes 1 8] [--trees mc_sim_7b_63 greedy_15]

On a random ~50M-parameter Llama (the foundation benchmark's size), each step is jitted on
its own and timed after warm-up (median of --repeats runs, each of --iters steps), side by
side in one run: an AR step is one base forward of 1 token with the KV cache; a speculative
step is draft (each head kind) + verify (one base forward over the tree) + accept + commit.
With accept length tau (tokens per step, bonus included) the implied speedup is
tau * t_AR / t_spec. Random weights: acceptance itself is not measured here (see
hydra_jax.bench for acceptance on trained heads).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding import speculative as spec
from hydra_jax.decoding.tree import load_tree
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import HeadsConfig, init_heads
from hydra_jax.model.kv_cache import init_cache
from hydra_jax.model.llama import LlamaModel, init_params
from hydra_jax.model.masks import cache_causal_mask

TAUS = (2.5, 3.0, 3.7)


def model_config(vocab: int) -> ModelConfig:
  return ModelConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_layers=8,
                     num_heads=8, num_kv_heads=8, head_dim=64, max_position_embeddings=2048)


def _time(fn, arg, iters, repeats):
  out = fn(arg)
  jax.block_until_ready(out)
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    x = arg
    for _ in range(iters):
      x = fn(x)
    jax.block_until_ready(x)
    samples.append((time.perf_counter() - t0) / iters)
  return statistics.median(samples)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--trees", nargs="+", default=["mc_sim_7b_63", "greedy_15"])
  ap.add_argument("--archs", nargs="+", default=["medusa", "hydra", "hydra++"])
  ap.add_argument("--vocab", type=int, default=24000)
  ap.add_argument("--context", type=int, default=128, help="tokens already in the cache")
  ap.add_argument("--cache-len", type=int, default=512)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args(argv)

  cfg = model_config(args.vocab)
  base = init_params(cfg, jax.random.PRNGKey(0))
  print(f"# base: {cfg.num_params / 1e6:.1f}M params, {jax.devices()[0].platform}, "
        f"context {args.context}, cache {args.cache_len}")
  model = LlamaModel(cfg)
  rows = []
  for b in args.batch_sizes:
    prompt = jax.random.randint(jax.random.PRNGKey(1), (b, args.context), 0, cfg.vocab_size)
    lens = jnp.full((b,), args.context, jnp.int32)

    # AR step: one token through the cache. The cache length is kept fixed (rolled back) so
    # every timed step sees the same context.
    cache = init_cache(cfg, b, args.cache_len)
    _, _, cache = model.apply({"params": base}, prompt,
                              jnp.broadcast_to(jnp.arange(args.context)[None], prompt.shape),
                              cache, cache_causal_mask(cache.lengths, args.context, args.cache_len))
    cache = cache.with_lengths(lens)

    @jax.jit
    def ar_step(carry):
      c, tok = carry
      logits, _, c2 = model.apply({"params": base}, tok[:, None], c.lengths[:, None], c,
                                  cache_causal_mask(c.lengths, 1, c.max_len))
      return c2, jnp.argmax(logits[:, 0], -1).astype(jnp.int32)

    t_ar = _time(ar_step, (cache, prompt[:, -1]), args.iters, args.repeats)
    rows.append((b, "autoregressive", "-", 1, t_ar))
    for tree_name in args.trees:
      tree = load_tree(tree_name)
      for arch in args.archs:
        hcfg = HeadsConfig.for_base(cfg, arch, num_heads=4,
                                    num_layers=4 if arch == "hydra++" else 1)
        hp = init_heads(hcfg, cfg, base, jax.random.PRNGKey(2))
        models = spec.SpecModels(cfg, hcfg, tree)
        big = jnp.int32(10**6)
        stop = jnp.zeros((0,), jnp.int32)
        state = jax.jit(lambda p, l: spec.prefill(models, base, hp, p, l, args.cache_len, big,
                                                  stop))(prompt, lens)
        drafter = spec.heads_drafter(models, base, hp)

        @jax.jit
        def one_step(st):
          new = spec.spec_step(models, base, hp, drafter, st, big, stop)
          # Roll back so every timed step sees the same context length.
          return new.replace(cache=new.cache.with_lengths(st.cache.lengths),
                             prefix_cache=None if new.prefix_cache is None else
                             new.prefix_cache.with_lengths(st.prefix_cache.lengths),
                             done_B=st.done_B)

        t = _time(one_step, state, args.iters, args.repeats)
        rows.append((b, arch, tree_name, tree.num_nodes, t))

  print()
  head = "| batch | method | tree | tokens verified | ms / step | step cost vs AR |"
  head += "".join(f" speedup @ tau {tau} |" for tau in TAUS)
  print(head)
  print("|" + "---|" * (6 + len(TAUS)))
  ar_times = {b: t for b, m, _, _, t in rows if m == "autoregressive"}
  for b, method, tree_name, n, t in rows:
    ratio = t / ar_times[b]
    cells = "".join(f" {'-' if method == 'autoregressive' else f'{tau / ratio:.2f}x'} |"
                    for tau in TAUS)
    print(f"| {b} | {method} | {tree_name} | {n} | {t * 1e3:.1f} | {ratio:.2f} |{cells}")


if __name__ == "__main__":
  main()
