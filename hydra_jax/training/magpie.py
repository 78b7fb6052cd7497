"""Self-distillation data with no dataset at all: the chat model writes the questions too.

The Magpie recipe (Xu et al., 2024): an instruction-tuned model, given its chat template only
up to where a user turn's text begins (e.g. "<|im_start|>user\\n"), samples a plausible user
message; answered greedily by the same model, those pairs are conversations drawn from the
distribution the model itself expects, which is what its draft heads will face at decode time.

    python -m hydra_jax.training.magpie --model smollm2 --num-queries 2000 \\
        --out ~/.cache/hydra_jax/smollm2_magpie.jsonl

Queries are sampled (temperature / top-p, one key per row), de-duplicated and filtered (empty,
cut off, or too short); answers are greedy, through `self_distill`. The output is ShareGPT
JSONL: train on it with data.source="sharegpt" and data.template="chat_template".
Evaluation prompts (MT-Bench) are never involved.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from hydra_jax.training.self_distill import self_distill

log = logging.getLogger(__name__)

_MARKER = "\u2063MAGPIE\u2063"  # a string no chat template contains


def pre_query_ids(tokenizer) -> List[int]:
  """Token ids of the chat template up to where the first user message's text begins."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("Magpie needs a chat model: the tokenizer has no chat template")
  text = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}], tokenize=False,
                                       add_generation_prompt=False)
  if _MARKER not in text:
    raise ValueError("the chat template does not render the user message verbatim")
  return list(tokenizer(text[:text.index(_MARKER)], add_special_tokens=False)["input_ids"])


def sample_queries(model, num_queries: int, *, max_new_tokens: int = 96, temperature: float = 1.0,
                   top_p: float = 1.0, seed: int = 0, batch_size: int = 32,
                   min_chars: int = 12, max_rounds: int = 20) -> List[str]:
  """`num_queries` distinct user messages sampled after the pre-query template.

  A sample counts when it ended with an end-of-turn token (not cut off by max_new_tokens),
  is at least `min_chars` long and new. Rounds of `batch_size * 8` rows run until enough.
  """
  from hydra_jax.decoding import api
  prefix = pre_query_ids(model.tokenizer)
  queries: Dict[str, None] = {}
  rows = batch_size * 8
  for r in range(max_rounds):
    results = api.generate(model, [prefix] * rows, max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed + 1000003 * r, batch_size=batch_size)
    for res in results:
      text = (res.text or "").strip()
      if res.finish_reason in ("eos", "stop") and len(text) >= min_chars:
        queries.setdefault(text)
    log.info("magpie: round %d, %d distinct queries", r + 1, len(queries))
    if len(queries) >= num_queries:
      break
  return list(queries)[:num_queries]


def write_magpie(model, out_path: str, num_queries: int = 2000, *, answer_tokens: int = 256,
                 query_tokens: int = 96, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, batch_size: int = 32) -> Dict[str, Any]:
  """Samples queries, answers them greedily, writes ShareGPT JSONL atomically; returns stats."""
  t0 = time.time()
  queries = sample_queries(model, num_queries, max_new_tokens=query_tokens,
                           temperature=temperature, top_p=top_p, seed=seed,
                           batch_size=batch_size)
  t1 = time.time()
  prompts = [{"id": f"magpie{i}", "system": None, "turns": [q]} for i, q in enumerate(queries)]
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = f"{out_path}.{os.getpid()}.tmp"
  _, stats = self_distill(model, prompts, max_new_tokens=answer_tokens, batch_size=batch_size,
                          template="chat_template", out_path=tmp)
  os.replace(tmp, out_path)
  stats = dict(stats, queries=len(queries), query_seconds=t1 - t0, answer_seconds=time.time() - t1,
               query_temperature=temperature, query_top_p=top_p, seed=seed)
  with open(out_path + ".stats.json", "w") as f:
    json.dump(stats, f, indent=1)
  return stats


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True,
                 help="a chat model: HF directory, FILE.gguf or a known name (smollm2)")
  p.add_argument("--out", required=True, help="output ShareGPT JSONL")
  p.add_argument("--num-queries", type=int, default=2000)
  p.add_argument("--query-tokens", type=int, default=96, help="max tokens of a sampled query")
  p.add_argument("--answer-tokens", type=int, default=256, help="max tokens of an answer")
  p.add_argument("--temperature", type=float, default=1.0, help="for the queries")
  p.add_argument("--top-p", type=float, default=1.0, help="for the queries (1.0: no sort per step)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  from hydra_jax.decoding import api
  model = api.load_model(args.model, dtype=args.dtype)
  stats = write_magpie(model, args.out, args.num_queries, answer_tokens=args.answer_tokens,
                       query_tokens=args.query_tokens, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
  print(json.dumps(stats))
  return stats


if __name__ == "__main__":
  main()
