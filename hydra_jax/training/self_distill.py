"""Self-distillation data: the base model answers a prompts file; written as ShareGPT JSONL.

For models whose fine-tuning data is unknown, the heads are trained on the base model's own
answers, so they learn the distribution they will have to predict at decode time.

    python -m hydra_jax.training.self_distill --model DIR --prompts FILE --out OUT.jsonl \
        [--max-new-tokens 512] [--batch-size 8] [--chat | --template vicuna_v1.1] \
        [--temperature 0.0] [--top-p 1.0] [--seed 0] [--system-prompt S] [--max-prompts N]

Prompts file (detected per file):
  JSONL with "turns": [str, ...]            MT-Bench questions; every turn is answered in order,
                                            each after the model's own answer to the previous one
  JSONL with "prompt": str                  one single-turn prompt per record
  JSONL ShareGPT/OpenAI records             the user turns are re-asked (the answers are replaced)
  anything else                             one prompt per non-empty line

Generation goes through hydra_jax.decoding.api.generate (greedy at temperature 0). Prompts are
rendered in the same template the training data will use: --chat (= --template chat_template)
is the tokenizer's chat template; the default "plain" and "vicuna_v1.1" are the named
templates of hydra_jax.training.templates, with the prompt ending where the reply starts.
Train on the output with data.source="sharegpt" and the same data.template.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import time
from typing import Any, Dict, List, Optional, Sequence

from hydra_jax.training import templates

log = logging.getLogger(__name__)


def read_prompts(path: str, max_prompts: int = 0) -> List[Dict[str, Any]]:
  """[{"id", "system" (str or None), "turns": [user text, ...]}] in file order."""
  with open(path, encoding="utf-8") as f:
    lines = [ln for ln in f.read().splitlines() if ln.strip()]
  first = None
  if lines:
    try:
      first = json.loads(lines[0])
    except json.JSONDecodeError:
      pass
  out: List[Dict[str, Any]] = []
  if not isinstance(first, dict):  # one prompt per line
    out = [{"id": str(i), "system": None, "turns": [ln]} for i, ln in enumerate(lines)]
  else:
    for i, line in enumerate(lines):
      try:
        rec = json.loads(line)
        out.append(_prompt_record(rec, i))
      except (json.JSONDecodeError, ValueError) as e:
        log.warning("%s line %d skipped: %s", path, i + 1, e)
  if max_prompts:
    out = out[:int(max_prompts)]
  if not out:
    raise ValueError(f"no prompts in {path}: expected JSONL with 'turns' or 'prompt' (or "
                     "ShareGPT records), or one prompt per line")
  return out


def _prompt_record(rec, i: int) -> Dict[str, Any]:
  if not isinstance(rec, dict):
    raise ValueError("not a JSON object")
  rid = str(rec.get("question_id", rec.get("id", i)))
  if "turns" in rec or "prompt" in rec:
    turns = rec["turns"] if "turns" in rec else [rec["prompt"]]
    system = rec.get("system")
  else:  # a chat record: keep its system prompt and user turns, drop its answers
    msgs = templates.normalize_conversation(rec)
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    turns = [m["content"] for m in msgs if m["role"] == "user"]
  if (not isinstance(turns, list) or not turns
      or not all(isinstance(t, str) and t.strip() for t in turns)):
    raise ValueError("'turns' must be a non-empty list of non-empty strings")
  return {"id": rid, "system": system if isinstance(system, str) and system else None,
          "turns": turns}


def generation_prompt_ids(messages: Sequence[Dict[str, str]], tokenizer, template: str,
                          system_prompt: Optional[str] = None) -> List[int]:
  """Token ids of `messages` (ending with a user turn) up to where the reply starts.

  These are the prompt tokens of the training rendering (templates.py) of the same
  conversation, so generated replies are conditioned exactly as they will be trained on.
  """
  msgs = list(messages)
  if template == "chat_template":
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError("--chat: the tokenizer has no chat template; use --template vicuna_v1.1 "
                       "or --template plain")
    if system_prompt and msgs[0]["role"] != "system":
      msgs.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
  render = {"vicuna_v1.1": templates.render_vicuna, "plain": templates.render_plain}.get(template)
  if render is None:
    raise ValueError(f"unknown template {template!r}; use one of {templates.TEMPLATES}")
  text, spans = render(msgs + [{"role": "assistant", "content": ""}], tokenizer.eos_token or "",
                       system_prompt)
  # "ASSISTANT: " -> "ASSISTANT:": the separator space belongs to the reply's first token
  # (byte-level and sentencepiece tokens carry their leading space), as in FastChat's prompts.
  return list(tokenizer(text[:spans[-1][0]].rstrip(" "), add_special_tokens=True)["input_ids"])


def self_distill(model, prompts: Sequence[Dict[str, Any]], *, max_new_tokens: int = 512,
                 batch_size: int = 8, template: str = "plain", temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 system_prompt: Optional[str] = None, out_path: Optional[str] = None,
                 chunk_size: Optional[int] = None, heads=None, tree="auto"):
  """Answers every prompt's turns with `model`; returns (ShareGPT records, stats).

  `heads` (a heads directory or a (HeadsConfig, params) pair) and `tree` decode
  speculatively, through `generate`; at temperature 0 the answers are the same.

  Conversations run in chunks (written to `out_path` as each finishes, so a long run keeps
  what it has); within a chunk, turn r of every conversation is one batched `generate` call.
  A conversation stops at an empty reply or a prompt that no longer fits the model.
  """
  from hydra_jax.decoding import api  # the decoder pulls in jax; keep `read_prompts` light
  if isinstance(model, str):
    model = api.load_model(model)
  tok = model.tokenizer
  if tok is None:
    raise ValueError(f"{model.path} has no tokenizer; self-distillation needs text prompts")
  max_pos = model.config.max_position_embeddings
  chunk_size = chunk_size or batch_size * 16
  stats: Dict[str, Any] = collections.Counter()
  records: List[Dict[str, Any]] = []
  out_f = open(out_path, "w", encoding="utf-8") if out_path else None
  t0 = time.time()
  try:
    for c0 in range(0, len(prompts), chunk_size):
      chunk = prompts[c0:c0 + chunk_size]
      convs = [[{"role": "system", "content": p["system"]}] if p["system"] else [] for p in chunk]
      reasons: List[List[str]] = [[] for _ in chunk]
      alive = [True] * len(chunk)
      for r in range(max(len(p["turns"]) for p in chunk)):
        rows, ids = [], []
        for j, p in enumerate(chunk):
          if not alive[j] or r >= len(p["turns"]):
            continue
          msgs = convs[j] + [{"role": "user", "content": p["turns"][r]}]
          pid = generation_prompt_ids(msgs, tok, template, system_prompt)
          if len(pid) >= max_pos - 1:
            alive[j] = False
            stats["prompt_too_long"] += 1
            continue
          rows.append(j)
          ids.append(pid)
        if not rows:
          break
        spec = {"heads": heads, "tree": tree} if heads is not None else {}
        results = api.generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed + 7919 * (c0 // chunk_size) + 104729 * r,
                               batch_size=batch_size, **spec)
        for j, res in zip(rows, results):
          reply = (res.text or "").strip()
          stats[f"finish_{res.finish_reason}"] += 1
          stats["new_tokens"] += res.new_tokens
          if not reply:
            alive[j] = False
            stats["empty_reply"] += 1
            continue
          convs[j] += [{"role": "user", "content": chunk[j]["turns"][r]},
                       {"role": "assistant", "content": reply}]
          reasons[j].append(res.finish_reason)
      for p, conv, why in zip(chunk, convs, reasons):
        if not why:
          stats["conversations_skipped"] += 1
          continue
        role = {"system": "system", "user": "human", "assistant": "gpt"}
        rec = {"id": p["id"], "conversations": [{"from": role[m["role"]], "value": m["content"]}
                                                for m in conv],
               "finish_reasons": why}
        records.append(rec)
        if out_f:
          out_f.write(json.dumps(rec, ensure_ascii=False) + "\n")
          out_f.flush()
      log.info("self-distill: %d/%d prompts, %d conversations written, %.0fs", c0 + len(chunk),
               len(prompts), len(records), time.time() - t0)
  finally:
    if out_f:
      out_f.close()
  stats = dict(stats, prompts=len(prompts), conversations=len(records),
               turns=sum(len(r["finish_reasons"]) for r in records), seconds=time.time() - t0)
  return records, stats


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="Hugging Face model directory (with tokenizer)")
  p.add_argument("--prompts", required=True, help="prompts file (see the module docstring)")
  p.add_argument("--out", required=True, help="output ShareGPT JSONL")
  p.add_argument("--max-new-tokens", type=int, default=512)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--chat", action="store_true", help="same as --template chat_template")
  p.add_argument("--template", choices=templates.TEMPLATES, default=None,
                 help="prompt rendering; default plain (chat_template with --chat)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--system-prompt", default=None, help="for prompts that have none")
  p.add_argument("--max-prompts", type=int, default=0, help="0 = all")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  args = p.parse_args(argv)
  if args.chat and args.template not in (None, "chat_template"):
    p.error("--chat means --template chat_template; pass only one of them")
  template = "chat_template" if args.chat else (args.template or "plain")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  from hydra_jax.decoding import api
  prompts = read_prompts(args.prompts, args.max_prompts)
  model = api.load_model(args.model, dtype=args.dtype)
  _, stats = self_distill(model, prompts, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, template=template,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, system_prompt=args.system_prompt, out_path=args.out)
  stats["template"] = template
  print(json.dumps(stats))
  print(f"wrote {stats['conversations']} conversations to {args.out}; train on them with "
        f"data.source='sharegpt', data.path='{args.out}', data.template='{template}'")
  return stats


if __name__ == "__main__":
  main()
