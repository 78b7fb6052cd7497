"""Self-distillation data with no dataset at all: the chat model writes the questions too.

The Magpie recipe (Xu et al., 2024): an instruction-tuned model, given its chat template only
up to where a user turn's text begins (e.g. "<|im_start|>user\\n"), samples a plausible user
message; answered greedily by the same model, those pairs are conversations drawn from the
distribution the model itself expects, which is what its draft heads will face at decode time.

    python -m hydra_jax.training.magpie --model smollm2 --target-tokens 500000 \\
        --out data/smollm2_magpie

The output is a directory data set, written shard by shard so that a run that stops keeps
every finished shard and the same command (in this or a later session) continues it:

    DIR/shard-00000.jsonl, shard-00001.jsonl, ...   ShareGPT JSONL, each written atomically
    DIR/manifest.json                               the model (config fingerprint, sampled
                                                    weights), the settings that shape the data,
                                                    and per shard: conversations, answer
                                                    tokens, sha256, seed, timings

A rerun verifies the shards against the manifest, refuses another model or other settings
(--allow-mismatch adds to it anyway), and adds shards until --target-tokens answer tokens or
--num-queries queries. Shard i samples its queries with a seed derived from (--seed, i), and
a question already in any shard (compared as stripped, case-folded text with whitespace
collapsed) is not asked again, so stopping and continuing writes the same shards as one run.

Queries are sampled (temperature / top-p, one key per row) and kept when they ended on an
end-of-turn token, are long enough and new; answers are greedy, through `self_distill`.
Train on the directory with data.source="sharegpt", data.path=DIR and
data.template="chat_template". Evaluation prompts (MT-Bench) are never involved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from hydra_jax.checkpoint.heads_io import file_sha256
from hydra_jax.training.errors import DataError
from hydra_jax.training.self_distill import self_distill

log = logging.getLogger("hydra_jax.training.magpie")  # also when run as __main__

FORMAT = "hydra_jax.magpie/1"
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^shard-(\d{5})\.jsonl$")
_MARKER = "\u2063MAGPIE\u2063"  # a string no chat template contains
_TEMPLATE = "chat_template"  # queries and answers are rendered in the model's own template


class MagpieDataError(DataError):
  """The output directory cannot be continued as asked; the message names the fix."""


def shard_name(index: int) -> str:
  return f"shard-{index:05d}.jsonl"


def shard_seed(seed: int, index: int) -> int:
  """The query-sampling seed of shard `index`: distinct per shard, the same on every rerun."""
  import numpy as np
  return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0] >> 1)


def normalize_query(text: str) -> str:
  """The key questions are deduplicated by: stripped, case-folded, whitespace collapsed."""
  return " ".join(str(text).casefold().split())


def pre_query_ids(tokenizer) -> List[int]:
  """Token ids of the chat template up to where the first user message's text begins."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("Magpie needs a chat model: the tokenizer has no chat template")
  text = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}], tokenize=False,
                                       add_generation_prompt=False)
  if _MARKER not in text:
    raise ValueError("the chat template does not render the user message verbatim")
  return list(tokenizer(text[:text.index(_MARKER)], add_special_tokens=False)["input_ids"])


def _query_candidates(model, prefix: List[int], rows: int, *, max_new_tokens: int,
                      temperature: float, top_p: float, seed: int, batch_size: int,
                      min_chars: int) -> List[str]:
  """One round: `rows` sampled user messages that ended on an end-of-turn token and are long
  enough, in row order (duplicates included)."""
  from hydra_jax.decoding import api
  results = api.generate(model, [prefix] * rows, max_new_tokens, temperature=temperature,
                         top_p=top_p, seed=seed, batch_size=batch_size)
  texts = [(res.text or "").strip() for res in results
           if res.finish_reason in ("eos", "stop")]
  return [t for t in texts if len(t) >= min_chars]


def _rows_for(missing: int, yield_rate: float, batch_size: int) -> int:
  """Rows to sample for `missing` queries at `yield_rate` new queries per row: a 1.25 margin,
  whole batches, at least one batch and at most a full round (8 batches)."""
  wanted = 1.25 * missing / max(yield_rate, 1e-3)
  return min(batch_size * 8, max(batch_size, -(-int(wanted) // batch_size) * batch_size))


def sample_queries(model, num_queries: int, *, max_new_tokens: int = 96, temperature: float = 1.0,
                   top_p: float = 1.0, seed: int = 0, batch_size: int = 32,
                   min_chars: int = 12, max_rounds: int = 20,
                   seen: Optional[Set[str]] = None,
                   expected_yield: Optional[float] = None) -> Tuple[List[str], int, int]:
  """(queries, rows, found): up to `num_queries` user messages sampled after the pre-query
  template, none of them (normalized: `normalize_query`) in `seen` or repeated; the rows
  sampled and the new distinct queries found (before the cut to `num_queries`: the yield's
  numerator).

  A sample counts when it ended with an end-of-turn token (not cut off by max_new_tokens),
  is at least `min_chars` long and new. Rounds run until enough or `max_rounds`; fewer come
  back only when the model stopped writing new questions. The first round samples
  `batch_size * 8` rows, or, given `expected_yield` (new queries per row, as the last shard
  measured), what that yield needs; a later round only what the last round's yield says is
  still missing (`_rows_for`): sampling is a third of a shard's time, and a full round for
  the last few dozen queries wasted half of it.
  """
  prefix = pre_query_ids(model.tokenizer)
  seen = set(seen or ())
  queries: List[str] = []
  rows = (batch_size * 8 if expected_yield is None
          else _rows_for(num_queries, expected_yield, batch_size))
  sampled = 0
  for r in range(max_rounds):
    before = len(queries)
    for text in _query_candidates(model, prefix, rows, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed + 1000003 * r,
                                  batch_size=batch_size, min_chars=min_chars):
      key = normalize_query(text)
      if key not in seen:
        seen.add(key)
        queries.append(text)
    sampled += rows
    log.info("magpie: round %d, %d rows, %d new distinct queries", r + 1, rows, len(queries))
    if len(queries) >= num_queries:
      break
    rows = _rows_for(num_queries - len(queries), (len(queries) - before) / rows, batch_size)
  return queries[:num_queries], sampled, len(queries)


# --- the directory data set -------------------------------------------------------------------


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def check_out_dir(out_dir: str) -> None:
  """Refuses an --out that is (or looks like) the single JSONL file of earlier versions."""
  path = os.path.expanduser(out_dir)
  if path.endswith(".jsonl") or os.path.isfile(path):
    stem = path[:-len(".jsonl")] if path.endswith(".jsonl") else path + "_magpie"
    raise MagpieDataError(
        f"--out {out_dir} is a file; Magpie now writes a directory (shard-*.jsonl + "
        f"{MANIFEST}) so runs can stop and continue: pass a directory, e.g. --out {stem}")


def read_manifest(out_dir: str) -> Optional[Dict[str, Any]]:
  """The manifest of `out_dir` with every shard verified (sha256), or None for a new data set.

  Raises MagpieDataError for a directory that is not ours, a missing or edited shard.
  """
  path = os.path.expanduser(out_dir)
  check_out_dir(out_dir)
  mpath = os.path.join(path, MANIFEST)
  if not os.path.exists(mpath):
    strays = [f for f in os.listdir(path) if SHARD_RE.match(f)] if os.path.isdir(path) else []
    if strays:
      raise MagpieDataError(f"{path} holds shard files but no {MANIFEST}, so they cannot be "
                            "checked or continued: move them away or pass another --out")
    return None
  try:
    with open(mpath, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise MagpieDataError(f"{mpath} cannot be read ({e}); restore it or pass another "
                          "--out") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise MagpieDataError(f"{mpath} is not a Magpie manifest ({FORMAT}); pass another --out")
  for entry in manifest.get("shards", []):
    fpath = os.path.join(path, entry["file"])
    if not os.path.isfile(fpath):
      problem = "is missing"
    elif file_sha256(fpath) != entry["sha256"]:
      problem = "does not match its sha256 in the manifest (edited or truncated)"
    else:
      continue
    raise MagpieDataError(
        f"{fpath} {problem}: restore it, or delete that file and its entry in {mpath} (the "
        "other shards stay valid; the next run adds a new shard)")
  return manifest


def read_shard_queries(out_dir: str, manifest: Dict[str, Any]) -> Set[str]:
  """Every question asked so far, normalized: the first user turn of each conversation in the
  manifest's shards and the questions that got no answer (listed in the manifest)."""
  seen: Set[str] = set()
  for entry in manifest.get("shards", []):
    seen.update(normalize_query(q) for q in entry.get("unanswered", []))
    with open(os.path.join(os.path.expanduser(out_dir), entry["file"]), encoding="utf-8") as f:
      for line in f:
        if line.strip():
          seen.update(_record_queries(json.loads(line)))
  return seen


def _record_queries(record: Dict[str, Any]) -> List[str]:
  return [normalize_query(t["value"]) for t in record.get("conversations", [])[:2]
          if t.get("from") == "human"][:1]


def model_identity(model, source: Optional[str] = None) -> Dict[str, Any]:
  """What the data depend on in the model: its config and a cheap sample of its weights."""
  from hydra_jax.checkpoint.heads_io import base_weights_fingerprint
  ident = {"source": str(source if source is not None else model.path),
           "path": str(model.path), "config_fingerprint": model.config.fingerprint(),
           "weights": base_weights_fingerprint(model.params)}
  if str(model.path).endswith(".gguf") and os.path.isfile(model.path):
    ident["file_bytes"] = os.path.getsize(model.path)
  return ident


def generation_settings(model, *, answer_tokens: int, query_tokens: int, temperature: float,
                        top_p: float, min_chars: int) -> Dict[str, Any]:
  """The settings that change what the data set holds (not how fast it is written)."""
  import numpy as np
  template = getattr(model.tokenizer, "chat_template", None) or ""
  return {"template": _TEMPLATE, "system_prompt": None,
          "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
          "answer_temperature": 0.0, "answer_tokens": int(answer_tokens),
          "query_tokens": int(query_tokens), "query_temperature": float(temperature),
          "query_top_p": float(top_p), "min_chars": int(min_chars),
          "dtype": np.dtype(model.dtype).name}


def _mismatches(manifest: Dict[str, Any], model_id: Dict[str, Any],
                settings: Dict[str, Any]) -> List[str]:
  from hydra_jax.checkpoint.heads_io import weights_difference
  out = []
  rec = manifest.get("model", {})
  if rec.get("config_fingerprint") != model_id["config_fingerprint"]:
    out.append(f"model config {rec.get('config_fingerprint')} (now "
               f"{model_id['config_fingerprint']})")
  else:
    worst = weights_difference(rec.get("weights") or {}, model_id["weights"])
    if worst is None or worst > 0.0:
      out.append("other model weights (the sampled embedding / LM head values differ)")
  for key, value in settings.items():
    was = manifest.get("settings", {}).get(key)
    if was != value:
      out.append(f"{key}={was!r} (now {value!r})")
  return out


def _format_eta(seconds: float) -> str:
  if seconds != seconds or seconds == float("inf"):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _totals(manifest: Dict[str, Any]) -> Dict[str, int]:
  shards = manifest["shards"]
  return {"shards": len(shards), "queries": sum(s["queries"] for s in shards),
          "conversations": sum(s["conversations"] for s in shards),
          "answer_tokens": sum(s["answer_tokens"] for s in shards)}


def _done(totals: Dict[str, int], target_tokens: int, num_queries: int) -> bool:
  return bool((target_tokens and totals["answer_tokens"] >= target_tokens)
              or (num_queries and totals["queries"] >= num_queries))


def _load_heads(model, heads: str, tree):
  """Draft heads loaded once, as the (config, params) pair `generate` takes, and their tree."""
  from hydra_jax.decoding import api
  from hydra_jax.decoding.tree import resolve_tree
  heads_cfg, heads_params = api.load_draft_heads(model, heads, False)
  tree_used = resolve_tree(tree, heads, num_heads=heads_cfg.num_heads,
                           max_topk=heads_cfg.draft_vocab_size, dtype=api.dtype_name(model))
  return (heads_cfg, heads_params), tree_used


def write_magpie(model, out_dir: str, *, target_tokens: int = 0, num_queries: int = 0,
                 shard_queries: int = 256, answer_tokens: int = 256, query_tokens: int = 96,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int = 32, min_chars: int = 12, max_rounds: int = 20,
                 heads: Optional[str] = None, tree: Any = "auto", max_shards: int = 0,
                 allow_mismatch: bool = False, model_source: Optional[str] = None
                 ) -> Dict[str, Any]:
  """Adds shards to the Magpie data set in `out_dir` until `target_tokens` answer tokens or
  `num_queries` queries (whichever is given and reached first); returns the manifest.

  Shards already there are verified and kept; `max_shards` > 0 stops after that many new
  shards (a session's budget). `heads` (a heads directory, with `tree`) answers with
  speculative decoding: greedy, so the answers are those of autoregressive decoding.
  """
  if not target_tokens and not num_queries:
    raise MagpieDataError("say how much data to write: --target-tokens N (answer tokens) or "
                          "--num-queries N")
  if shard_queries < 1:
    raise MagpieDataError(f"--shard-queries must be >= 1, got {shard_queries}")
  path = os.path.expanduser(out_dir)
  manifest = read_manifest(out_dir)
  model_id = model_identity(model, model_source)
  settings = generation_settings(model, answer_tokens=answer_tokens, query_tokens=query_tokens,
                                 temperature=temperature, top_p=top_p, min_chars=min_chars)
  identity_note = None
  if manifest is None:
    os.makedirs(path, exist_ok=True)
    manifest = {"format": FORMAT, "model": model_id, "settings": settings, "shards": []}
    manifest["totals"] = _totals(manifest)
    # Written before any shard: a shard file is never without the manifest that checks it.
    _write_json_atomic(os.path.join(path, MANIFEST), manifest)
    seen: Set[str] = set()
  else:
    diffs = _mismatches(manifest, model_id, settings)
    if diffs:
      what = (f"{path} was written with {'; '.join(diffs)}: adding to it would mix two "
              "distributions")
      if not allow_mismatch:
        raise MagpieDataError(f"{what}. Pass the same model and settings (see its {MANIFEST}), "
                              "another --out, or --allow-mismatch to add to it anyway")
      log.warning("%s; adding anyway (--allow-mismatch)", what)
      identity_note = {"model": model_id, "settings": settings}
    seen = read_shard_queries(out_dir, manifest)
  listed = {s["file"] for s in manifest["shards"]}
  for f in sorted(os.listdir(path)):  # left by a run that stopped before updating the manifest
    if (SHARD_RE.match(f) and f not in listed) or (f.startswith("shard-") and f.endswith(".tmp")):
      log.info("magpie: removing %s (not in the manifest: an interrupted run's)", f)
      os.remove(os.path.join(path, f))

  heads_arg, tree_arg = _load_heads(model, heads, tree) if heads else (None, None)
  totals = _totals(manifest)
  t_run, tokens_run, new_shards = time.time(), 0, 0
  next_index = max((s["index"] for s in manifest["shards"]), default=-1) + 1
  if _done(totals, target_tokens, num_queries):
    log.info("magpie: %s already holds %d answer tokens, %d queries in %d shards: nothing to do",
             path, totals["answer_tokens"], totals["queries"], totals["shards"])
  while not _done(totals, target_tokens, num_queries):
    if max_shards and new_shards >= max_shards:
      log.info("magpie: stopping after %d new shards (--max-shards); rerun to continue", new_shards)
      break
    index, t0 = next_index, time.time()
    n = shard_queries if not num_queries else min(shard_queries, num_queries - totals["queries"])
    s_seed = shard_seed(seed, index)
    last = manifest["shards"][-1] if manifest["shards"] else {}
    # The last shard's yield sizes the first round (it falls as the data set grows).
    expected = last.get("query_yield")
    queries, rows, found = sample_queries(
        model, n, max_new_tokens=query_tokens, temperature=temperature, top_p=top_p,
        seed=s_seed, batch_size=batch_size, min_chars=min_chars, max_rounds=max_rounds,
        seen=seen, expected_yield=expected)
    if not queries:
      log.warning("magpie: the model wrote no new question in %d rounds of %d samples; "
                  "stopping (raise --query-tokens or lower --min-chars)", max_rounds,
                  batch_size * 8)
      break
    t1 = time.time()
    prompts = [{"id": f"magpie-{index:05d}-{j:05d}", "system": None, "turns": [q]}
               for j, q in enumerate(queries)]
    fname = shard_name(index)
    fpath = os.path.join(path, fname)
    tmp = f"{fpath}.{os.getpid()}.tmp"
    decode_kw = {"heads": heads_arg, "tree": tree_arg} if heads_arg is not None else {}
    records, stats = self_distill(model, prompts, max_new_tokens=answer_tokens,
                                  batch_size=batch_size, template=_TEMPLATE, out_path=tmp,
                                  **decode_kw)
    os.replace(tmp, fpath)
    answered = {k for rec in records for k in _record_queries(rec)}
    entry = {"file": fname, "index": index, "seed": s_seed, "queries": len(queries),
             "query_rows": rows, "query_yield": round(found / max(rows, 1), 4),
             "conversations": stats["conversations"],
             "answer_tokens": int(stats.get("new_tokens", 0)), "sha256": file_sha256(fpath),
             "bytes": os.path.getsize(fpath), "query_seconds": round(t1 - t0, 3),
             "answer_seconds": round(time.time() - t1, 3),
             "decoding": "speculative" if heads else "autoregressive",
             # not in the shard (an empty first answer): kept here so they are not asked again
             "unanswered": [q for q in queries if normalize_query(q) not in answered],
             "stats": {k: v for k, v in stats.items() if k.startswith(("finish_", "empty_",
                                                                       "prompt_too", "conv"))}}
    if identity_note:
      entry["written_with"] = identity_note
    manifest["shards"].append(entry)
    manifest["totals"] = totals = _totals(manifest)
    _write_json_atomic(os.path.join(path, MANIFEST), manifest)
    seen.update(normalize_query(q) for q in queries)
    next_index, new_shards = index + 1, new_shards + 1
    tokens_run += entry["answer_tokens"]
    rate = tokens_run / max(time.time() - t_run, 1e-9)
    if target_tokens:
      goal = f"{totals['answer_tokens']:,} / {target_tokens:,} answer tokens"
      left = max(target_tokens - totals["answer_tokens"], 0) / max(rate, 1e-9)
    else:
      goal = f"{totals['queries']:,} / {num_queries:,} queries ({totals['answer_tokens']:,} " \
             "answer tokens)"
      q_rate = sum(s["queries"] for s in manifest["shards"][-new_shards:]) / max(
          time.time() - t_run, 1e-9)
      left = max(num_queries - totals["queries"], 0) / max(q_rate, 1e-9)
    log.info("magpie: %s done (%d shards, %d this run): %s, %.1f answer tokens/s, ETA %s",
             fname, totals["shards"], new_shards, goal, rate,
             "0s" if _done(totals, target_tokens, num_queries) else _format_eta(left))
  return manifest


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Bad input (another model or settings than the data set's, "
                                     "an edited shard) exits 2 with one line that names the fix.")
  p.add_argument("--model", required=True,
                 help="a chat model: HF directory, FILE.gguf or a known name (smollm2)")
  p.add_argument("--out", required=True,
                 help="output directory (shard-*.jsonl + manifest.json); an existing one is "
                      "verified and continued")
  p.add_argument("--target-tokens", type=int, default=0,
                 help="stop once the data set holds this many answer tokens (e.g. 500000)")
  p.add_argument("--num-queries", type=int, default=0,
                 help="stop once this many queries were asked (in all shards)")
  p.add_argument("--shard-queries", type=int, default=256, help="queries per shard")
  p.add_argument("--max-shards", type=int, default=0,
                 help="stop after this many new shards (0: until the target); rerun to continue")
  p.add_argument("--query-tokens", type=int, default=96, help="max tokens of a sampled query")
  p.add_argument("--answer-tokens", type=int, default=256, help="max tokens of an answer")
  p.add_argument("--temperature", type=float, default=1.0, help="for the queries")
  p.add_argument("--top-p", type=float, default=1.0, help="for the queries (1.0: no sort per step)")
  p.add_argument("--min-chars", type=int, default=12, help="shortest query kept")
  p.add_argument("--seed", type=int, default=0, help="shard i samples with a seed from (seed, i)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--heads", default=None,
                 help="answer with speculative decoding with these draft heads (default: off). "
                      "Only faster, the data do not change: answers are greedy, identical to "
                      "autoregressive decoding (in float32; in bfloat16 a near-tie between two "
                      "tokens can break either way); queries are always sampled without heads")
  p.add_argument("--tree", default="auto", help="the heads' tree (default: HEADS/tree_auto.json)")
  p.add_argument("--allow-mismatch", action="store_true",
                 help="add to a data set written by another model or with other settings "
                      "(the shards then mix two distributions)")
  args = p.parse_args(argv)
  if args.target_tokens < 0 or args.num_queries < 0 or not (args.target_tokens or
                                                             args.num_queries):
    p.error("give --target-tokens N or --num-queries N (positive)")
  if args.shard_queries < 1:
    p.error("--shard-queries must be >= 1")
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
  logger = logging.getLogger("hydra_jax")
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  from hydra_jax.checkpoint.hf import CheckpointError
  from hydra_jax.decoding.api import DecodeInputError
  from hydra_jax.decoding.tree import TreeError
  from hydra_jax.model.config import UnsupportedModelError
  from hydra_jax.model.heads import HeadsMismatchError
  from hydra_jax.registry.models import RegistryError
  try:
    read_manifest(args.out)  # fail before loading the model
    from hydra_jax.decoding import api
    model = api.load_model(args.model, dtype=args.dtype)
    manifest = write_magpie(
        model, args.out, target_tokens=args.target_tokens, num_queries=args.num_queries,
        shard_queries=args.shard_queries, answer_tokens=args.answer_tokens,
        query_tokens=args.query_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, batch_size=args.batch_size, min_chars=args.min_chars, heads=args.heads,
        tree=args.tree, max_shards=args.max_shards, allow_mismatch=args.allow_mismatch,
        model_source=args.model)
  except (MagpieDataError, DecodeInputError, CheckpointError, UnsupportedModelError, TreeError,
          HeadsMismatchError, RegistryError) as e:
    print(f"magpie: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  finally:
    logger.removeHandler(handler)
    logger.propagate = True
  totals = _totals(manifest)
  print(json.dumps(totals))
  print(f"{args.out}: {totals['conversations']} conversations, {totals['answer_tokens']} answer "
        f"tokens in {totals['shards']} shards; train on it with data.source='sharegpt', "
        f"data.path='{args.out}', data.template='chat_template'")
  return 0


if __name__ == "__main__":
  sys.exit(main())
