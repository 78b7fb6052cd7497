"""How big a draft vocabulary: what each size leaves out, and what its LM head costs.

    python benchmarks/bench_draft_vocab.py --model smollm2 \
        --heads hydra_jax/assets/smollm2/heads/hydra_pp --data data/smollm2_magpie \
        --outputs benchmarks/results/smollm2_mtbench_f32/specbench/autoregressive.jsonl

Heads with a draft vocabulary (`heads.draft_vocab_size`, EAGLE-3 / FR-Spec) rank only the N
most frequent target tokens of their training data; verification still uses the full
vocabulary, so decoding stays lossless, but a token outside the draft vocabulary can never
be drafted. So coverage, the fraction of the base's own tokens that lie inside the draft
vocabulary, bounds every head's accuracy from above: a head's top-1 agreement with the base
can be at most the coverage, and the acceptance a size gives up against the full vocabulary
is at most 1 - coverage per drafted token. The other side is speed: the shared LM head is a
[D, N] matmul per head call, and with the full vocabulary of a small model it is as big as a
quarter of the base (SmolLM2: 49,152 x 576 of 135M parameters).

Coverage is counted on two sets of base-model tokens:
  training  the assistant replies of the Magpie shards (`--data`), the draft vocabulary's own
            source, so an upper bound of what the heads see in training;
  held-out  the base's greedy answers to other prompts (`--outputs`: the autoregressive
            Spec-Bench JSONL a `hydra_jax.tools.bench` run wrote, e.g. on MT-Bench), re-encoded
            with the tokenizer (the decoded text of greedy tokens re-encodes to nearly the same
            ids).
The ranking is recounted here from `--data` with the trainer's `training.data.rank_tokens`
(count descending, then id) over the replies' tokens; where `--heads` has a draft vocabulary,
the table says how much of it the recount's top-N shares.

`--extend DIR` writes the `--heads` with their draft vocabulary extended AFTER training to
each size (DIR/<size>: the trained vocabulary first, then the next tokens of the ranking; a
Hydra / Hydra++ head's LM-head bias gets the smallest learned bias for the new tokens, Medusa
has none), with the heads' tree_auto.json, to decode with `hydra_jax.tools.bench`. The shared
LM head is the base's, so every token has a logit; whether heads trained on fewer tokens
rank the new ones well is what the bench then measures (SmolLM2, 2026-12-04: they do not,
see README).

`--time` adds the LM head's cost per size (ms, median): the heads' logits for R rows
([R, D] x the base's embedding rows of the draft vocabulary, f32, as the drafter computes
them), R = 1 (a chain head) and 4 (a beam or tree level). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2", help="a registry name or a model directory")
  p.add_argument("--heads", default=None, help="heads directory whose draft vocabulary to compare")
  p.add_argument("--data", required=True, help="conversations as train.py's data.path takes them (e.g. a Magpie directory)")
  p.add_argument("--outputs", nargs="*", default=[],
                 help="Spec-Bench JSONL of the base's greedy answers (held-out tokens)")
  p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 0],
                 help="draft vocabulary sizes (0: the full vocabulary)")
  p.add_argument("--time", action="store_true", help="also time the LM head per size")
  p.add_argument("--extend", default=None, metavar="DIR",
                 help="write --heads with the draft vocabulary extended to each size to DIR/SIZE")
  p.add_argument("--repeats", type=int, default=21)
  return p.parse_args(argv)


def reply_texts(data_path: str) -> List[str]:
  """The assistant turns of the conversations at `data_path` (what train.py's data.path
  takes), read and validated as the trainer reads them; malformed records are skipped."""
  from hydra_jax.training.data import read_json_records
  from hydra_jax.training.templates import MalformedRecord, normalize_conversation
  texts = []
  for record in read_json_records(data_path):
    try:
      texts += [m["content"] for m in normalize_conversation(record) if m["role"] == "assistant"]
    except MalformedRecord:
      continue
  if not texts:
    raise SystemExit(f"no assistant replies in {data_path}")
  return texts


def answer_texts(paths: Sequence[str]) -> List[str]:
  texts = []
  for path in paths:
    with open(path) as f:
      for line in f:
        for choice in json.loads(line).get("choices") or []:
          texts += list(choice.get("turns") or [])
  return texts


def token_ids(tokenizer, texts: Sequence[str]) -> np.ndarray:
  ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
  return np.concatenate([np.asarray(x, np.int64) for x in ids if x])


def coverage(tokens: np.ndarray, vocab: np.ndarray, vocab_size: int) -> float:
  inside = np.zeros(vocab_size, bool)
  inside[vocab] = True
  return float(inside[tokens].mean()) if len(tokens) else float("nan")


def time_lm_head(embedding: np.ndarray, order: np.ndarray, sizes: Sequence[int],
                 repeats: int) -> Dict[int, Dict[int, float]]:
  """ms per logits call for each size and row count, candidates interleaved."""
  import jax
  import jax.numpy as jnp
  fns, args = [], []
  for n in sizes:
    w = jnp.asarray(embedding[np.sort(order[:n])])  # [N, D]: the drafter's gathered rows
    for rows in (1, 4):
      x = jnp.ones((rows, embedding.shape[1]), jnp.float32)
      f = jax.jit(lambda w, x: jnp.argmax(
          jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))), axis=-1))
      jax.block_until_ready(f(w, x))
      fns.append(((n, rows), f))
      args.append((w, x))
  samples = {key: [] for key, _ in fns}
  for _ in range(repeats):
    for (key, f), a in zip(fns, args):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      samples[key].append((time.perf_counter() - t0) * 1e3)
  out: Dict[int, Dict[int, float]] = {}
  for (n, rows), s in samples.items():
    out.setdefault(n, {})[rows] = statistics.median(s)
  return out


def write_extended(heads_dir: str, model, order: np.ndarray, sizes: Sequence[int],
                   out_dir: str) -> None:
  """The heads with their draft vocabulary extended to each size (module docstring)."""
  import shutil
  from hydra_jax.checkpoint.heads_io import load_heads, read_heads_meta, save_heads
  cfg, params = load_heads(heads_dir, model.config, base_params=model.params)
  if not cfg.draft_vocab or cfg.lm_head != "base":
    raise SystemExit(f"{heads_dir}: only heads sharing the base LM head over a draft "
                     "vocabulary can be extended")
  trained = [int(t) for t in cfg.draft_vocab]
  known = set(trained)
  following = [int(t) for t in order if int(t) not in known]
  weights = read_heads_meta(heads_dir)["base"].get("weights")
  for n in sizes:
    extra = following[:max(n - len(trained), 0)]
    new = {k: dict(v) for k, v in params.items()}
    for name, head in new.items():
      if "lm_bias" in head:  # Hydra / Hydra++: the new tokens get the smallest learned bias
        bias = np.asarray(head["lm_bias"], np.float32)
        head["lm_bias"] = np.concatenate([bias, np.full(len(extra), bias.min(), np.float32)])
    dst = os.path.join(out_dir, str(n))
    save_heads(dst, new, cfg.replace(draft_vocab=tuple(trained + extra)),
               base_cfg=model.config, base_weights=weights)
    auto = os.path.join(heads_dir, "tree_auto.json")
    if os.path.exists(auto):
      shutil.copy(auto, dst)
    print(f"wrote {dst} (draft vocabulary {len(trained) + len(extra):,})")


def main(argv=None) -> None:
  args = _parse(argv)
  from hydra_jax.decoding import api
  model = api.load_model(args.model, dtype="float32")
  vocab_size = model.config.vocab_size
  train = token_ids(model.tokenizer, reply_texts(args.data))
  held = token_ids(model.tokenizer, answer_texts(args.outputs)) if args.outputs else np.zeros(
      [0], np.int64)
  from hydra_jax.training.data import rank_tokens
  order = rank_tokens(train, vocab_size)
  shipped = None
  if args.heads:
    from hydra_jax.checkpoint.heads_io import read_heads_meta
    shipped = (read_heads_meta(args.heads).get("heads") or {}).get("draft_vocab")
  sizes = [n if n > 0 else vocab_size for n in args.sizes]
  timings = time_lm_head(np.asarray(model.params["embed_tokens"]["embedding"], np.float32),
                         order, sizes, args.repeats) if args.time else {}
  print(f"model {args.model} (vocab {vocab_size:,}); training tokens {len(train):,} "
        f"(assistant replies of {args.data}); held-out tokens {len(held):,} "
        f"({', '.join(args.outputs) or 'none'}); {platform.processor() or platform.machine()}\n")
  head = "| draft vocab | coverage, training | coverage, held-out |"
  rule = "|---|---|---|"
  if shipped:
    head += f" shares with {args.heads} |"
    rule += "---|"
  if timings:
    head += " LM head ms, 1 row | 4 rows |"
    rule += "---|---|"
  lines = [head, rule]
  for n in sizes:
    vocab = order[:n]
    row = (f"| {n:,}{' (full)' if n == vocab_size else ''} | "
           f"{coverage(train, vocab, vocab_size):.4f} | "
           f"{coverage(held, vocab, vocab_size) if len(held) else float('nan'):.4f} |")
    if shipped:
      k = min(n, len(shipped))
      row += f" {len(set(shipped[:k]) & set(vocab[:k].tolist())) / k:.3f} of its top {k:,} |"
    if timings:
      row += f" {timings[n][1]:.2f} | {timings[n][4]:.2f} |"
    lines.append(row)
  print("\n".join(lines))
  if args.extend:
    if not args.heads:
      raise SystemExit("--extend needs --heads")
    write_extended(args.heads, model, order, sizes, args.extend)


if __name__ == "__main__":
  main()
