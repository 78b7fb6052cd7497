"""Greedy autoregressive decoding: ours (jitted prefill + lax.while_loop) vs transformers.

A random Llama of about 50M parameters (vocab 32000, width 512, 6 layers) is built with
transformers, saved to a temp dir and loaded by us, so both sides run the same weights in
f32 on this CPU. Batch 1 and batch 8, 128 new tokens (EOS disabled, so every row generates
all of them), median tokens/s over a few runs; compile time is reported separately.

  python benchmarks/bench_autoregressive.py [--new-tokens 128] [--runs 3] [--batch-sizes 1 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hydra_jax.decoding.api import generate, load_model  # noqa: E402
from hydra_jax.tools.testing import make_hf_model  # noqa: E402

MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=6,
             num_heads=8, num_kv_heads=8, max_position_embeddings=2048, weight_std=0.02,
             eos_token_id=None)


def bench_ours(model, prompts, new_tokens, runs):
  first = generate(model, prompts, new_tokens, batch_size=len(prompts))
  compile_s = first[0].compile_s
  rates = []
  for _ in range(runs):
    res = generate(model, prompts, new_tokens, batch_size=len(prompts))
    assert res[0].compile_s == 0.0, "a repeated call recompiled"
    rates.append(sum(r.new_tokens for r in res) / res[0].time_s)
  return statistics.median(rates), compile_s, [r.output_ids for r in res]


def bench_torch(torch_model, prompts, new_tokens, runs):
  ids = torch.tensor(prompts)
  kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
  with torch.no_grad():
    torch_model.generate(ids, max_new_tokens=4, **kw)  # warm-up
    kw.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    rates = []
    for _ in range(runs):
      t0 = time.perf_counter()
      out = torch_model.generate(ids, **kw)
      rates.append(out[:, ids.shape[1]:].numel() / (time.perf_counter() - t0))
  return statistics.median(rates), out[:, ids.shape[1]:].tolist()


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
  p.add_argument("--torch-threads", type=int, default=2)
  args = p.parse_args()
  torch.set_num_threads(args.torch_threads)

  with tempfile.TemporaryDirectory() as tmp:
    torch_model = make_hf_model(tmp, "llama", tokenizer=False, **MODEL)
    model = load_model(tmp)
  n_params = sum(x.numel() for x in torch_model.parameters())
  print(f"random Llama, {n_params / 1e6:.1f}M params, f32, {args.new_tokens} new tokens, "
        f"prompt {args.prompt_len} tokens, median of {args.runs} runs, "
        f"torch threads {args.torch_threads}, load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores", file=sys.stderr)

  rows = []
  rng = np.random.default_rng(0)
  for b in args.batch_sizes:
    prompts = rng.integers(4, MODEL["vocab_size"], (b, args.prompt_len)).tolist()
    ours, compile_s, ours_ids = bench_ours(model, prompts, args.new_tokens, args.runs)
    ref, ref_ids = bench_torch(torch_model, prompts, args.new_tokens, args.runs)
    same = sum(a == r for a, r in zip(ours_ids, ref_ids))
    rows.append((b, ours, ref, ours / ref, compile_s, f"{same}/{b}"))

  print("| batch | ours tokens/s | transformers tokens/s | ratio | our compile s | same tokens |")
  print("|---|---|---|---|---|---|")
  for b, ours, ref, ratio, compile_s, same in rows:
    print(f"| {b} | {ours:.1f} | {ref:.1f} | {ratio:.2f}x | {compile_s:.2f} | {same} |")


if __name__ == "__main__":
  main()
