"""Decode prompts with a Hugging Face model directory (a thin CLI over `hydra_jax.generate`).

  python decode.py --model DIR --prompt "Once upon a time" --max-new-tokens 64
  python decode.py --model DIR --prompts-file prompts.jsonl --chat --max-new-tokens 128 \
      --temperature 0.7 --top-p 0.9 --batch-size 4 --json

--prompts-file holds one JSON object per line, with "prompt" (text) or "prompt_ids" (token ids,
used as is). --json prints one JSON object per prompt on stdout, in input order; logs go to
stderr. Bad input exits with code 2 and a message, without a traceback.

Speculative decoding with draft heads (ours, or a released Hydra / Medusa checkpoint dir):

  python decode.py --model DIR --heads HEADS_DIR --tree mc_sim_7b_63 --prompt "..." \
      --max-new-tokens 128 [--accept greedy|typical|exact] [--json]

--json then adds accept_length (tokens per base forward, bonus included) and accepted_per_step.
Heads recorded for another base model (config or weights) are refused; --allow-heads-mismatch
loads them anyway when the shapes fit.

Sharded over a device mesh (tensor parallel over "tensor", the batch over "data"), the weights
read straight into each device's shards:

  python decode.py --model DIR --mesh data=2,tensor=4 --batch-size 8 ...

On several hosts, run the same command on each with --coordinator HOST:PORT
--num-processes N --process-id I (jax.distributed; the mesh spans every process's devices);
process 0 prints the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Callable, List, Union

from hydra_jax.decoding.dtype_choice import DTYPE_CHOICES  # light: parsing stays instant


class UsageError(ValueError):
  pass


def _number(kind: Callable, what: str, ok: Callable[[float], bool]):
  """An argparse type: `kind` (int / float) that is finite and passes `ok`, else a usage error."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      what_kind = "an integer" if kind is int else "a number"
      raise argparse.ArgumentTypeError(f"{text!r} is not {what_kind}")
    if not math.isfinite(value) or not ok(value):
      raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
    return value
  parse.__name__ = kind.__name__  # argparse names the type in its messages
  return parse


_NON_NEGATIVE = _number(float, "a finite number >= 0", lambda v: v >= 0)
_POSITIVE_INT = _number(int, "an integer >= 1", lambda v: v >= 1)
_TOKEN_ID = _number(int, "a token id >= 0", lambda v: v >= 0)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True,
                 help="a Hugging Face model directory, a llama.cpp FILE.gguf, or a known model's "
                      "name (python -m hydra_jax.registry.models list), e.g. smollm2")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="one text prompt")
  src.add_argument("--prompts-file", help='JSONL: {"prompt": TEXT} or {"prompt_ids": [ids]}')
  p.add_argument("--chat", action="store_true", help="render text prompts with the chat template")
  p.add_argument("--max-new-tokens", type=_POSITIVE_INT, required=True)
  p.add_argument("--temperature", type=_NON_NEGATIVE, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=_number(int, "an integer >= 0", lambda v: v >= 0), default=0,
                 help="0 = off")
  p.add_argument("--top-p", type=_number(float, "in (0, 1]", lambda v: 0 < v <= 1), default=1.0,
                 help="1.0 = off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=_POSITIVE_INT, default=1)
  p.add_argument("--stop-ids", type=_TOKEN_ID, nargs="*", default=None,
                 help="extra stop token ids (the model's EOS ids always stop)")
  p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
  p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                 help="param and compute dtype (auto: the one tree_fit --dtype auto measured "
                      "faster for these heads on this device, else float32 on a CPU and "
                      "bfloat16 on an accelerator; bf16 greedy output can part from f32's)")
  p.add_argument("--cache-len", "--max-cache-len", dest="cache_len", type=_POSITIVE_INT,
                 default=None,
                 help="KV cache slots per row (default: prompt + max new tokens, bucketed)")
  p.add_argument("--heads", default=None,
                 help="draft heads directory (ours, or released Hydra / Medusa); enables --mode spec")
  p.add_argument("--allow-heads-mismatch", action="store_true",
                 help="load heads recorded for another base model (config or weights) as long "
                      "as their shapes fit, with a warning")
  p.add_argument("--tree", default="mc_sim_7b_63",
                 help="speculation tree: a preset name, a JSON file of top-k rank paths, "
                      "dynamic:N[:D[:K]] (N nodes chosen per step from the heads' scores, depth "
                      "D, beam K) or auto (HEADS_DIR/tree_auto.json from "
                      "hydra_jax.decoding.tree_fit)")
  p.add_argument("--mode", choices=("ar", "spec"), default=None,
                 help="ar = autoregressive, spec = speculative (default: spec when --heads given)")
  p.add_argument("--accept", choices=("greedy", "typical", "exact"), default=None,
                 help="acceptance rule (default: greedy at temperature 0, exact otherwise)")
  p.add_argument("--posterior-threshold", type=_NON_NEGATIVE, default=0.09,
                 help="typical acceptance: eps in p(x) > min(eps, alpha * exp(-H))")
  p.add_argument("--posterior-alpha", type=_NON_NEGATIVE, default=0.3,
                 help="typical acceptance: alpha in p(x) > min(eps, alpha * exp(-H))")
  p.add_argument("--mesh", default=None,
                 help="decode sharded on a device mesh, e.g. data=2,tensor=4 (data x tensor = "
                      "the number of devices, of all processes)")
  p.add_argument("--coordinator", default=None,
                 help="HOST:PORT of process 0: run as one of --num-processes processes "
                      "(jax.distributed)")
  p.add_argument("--num-processes", type=_POSITIVE_INT, default=None)
  p.add_argument("--process-id", type=_number(int, "an integer >= 0", lambda v: v >= 0),
                 default=None)
  args = p.parse_args(argv)
  given = [x is not None for x in (args.coordinator, args.num_processes, args.process_id)]
  if any(given) and not all(given):
    p.error("--coordinator, --num-processes and --process-id go together")
  return args


def read_prompts_file(path: str) -> List[Union[str, List[int]]]:
  from hydra_jax.decoding.prompt_files import PromptFileError, read_single_turn_prompts
  try:
    return read_single_turn_prompts(path, "--prompts-file", "decode.py")
  except PromptFileError as e:
    raise UsageError(str(e)) from None


def main(argv=None) -> int:
  args = parse_args(argv)
  # Our progress at INFO on stderr; other libraries' loggers keep their defaults.
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(message)s"))
  logger = logging.getLogger("hydra_jax")
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  # Importing orbax (heads checkpoints) installs a handler on the root logger; propagating
  # there printed every line a second time, as "INFO:hydra_jax.decoding:...".
  logger.propagate = False
  try:
    return _run(args)
  finally:  # called in-process (tests, notebooks): leave no handler on a stream that may close
    logger.removeHandler(handler)
    logger.propagate = True


def _run(args) -> int:
  # Heavy imports after argument parsing, so --help and usage errors are instant.
  from hydra_jax.decoding import dtype_choice
  from hydra_jax.decoding.api import INPUT_ERRORS, generate, load_model, resolve_mesh
  if args.coordinator:
    import jax
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  try:
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file else [args.prompt]
    mesh = resolve_mesh(args.mesh)
    dtype = args.dtype
    if dtype == dtype_choice.DTYPE_AUTO:
      dtype, why = dtype_choice.resolve_dtype(dtype, args.heads if args.mode != "ar" else None)
      dtype_choice.announce(dtype, why)
    model = load_model(args.model, dtype=dtype, mesh=mesh)
    results = generate(model, prompts, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       batch_size=args.batch_size, chat=args.chat, stop_ids=args.stop_ids,
                       cache_len=args.cache_len, heads=args.heads, tree=args.tree,
                       mode=args.mode, accept=args.accept,
                       posterior_threshold=args.posterior_threshold,
                       posterior_alpha=args.posterior_alpha,
                       allow_heads_mismatch=args.allow_heads_mismatch, mesh=mesh)
  except (UsageError,) + INPUT_ERRORS as e:
    print(f"decode.py: error: {e}", file=sys.stderr)
    return 2
  if args.coordinator and args.process_id != 0:
    return 0  # every process holds the same results; process 0 prints them

  for r in results:
    if args.json:
      print(json.dumps(r.to_json()), flush=True)
    else:
      print(r.text if r.text is not None else " ".join(map(str, r.output_ids)), flush=True)
  new = sum(r.new_tokens for r in results)
  # Rows of a batch share its wall time: count each batch once.
  batches = {r.batch: (r.time_s, r.compile_s) for r in results}
  run_s = sum(t for t, _ in batches.values())
  compile_s = sum(c for _, c in batches.values())
  summary = (f"{len(results)} prompt(s), {new} new tokens in {run_s:.3f}s "
             f"({new / max(run_s, 1e-9):.1f} tokens/s), "
             f"{sum(r.steps for r in results)} base steps, compile {compile_s:.2f}s")
  taus = [r.extra["accept_length"] for r in results if r.extra.get("accept_length")]
  if taus:
    # Tokens per verify forward over all prompts (the prefill token is not a verify step).
    acc = [a for r in results for a in r.extra.get("accepted_per_step") or []]
    summary += f", accept length {sum(acc) / max(len(acc), 1):.2f} tokens/step"
  print(summary, file=sys.stderr if args.json else sys.stdout)
  return 0


if __name__ == "__main__":
  sys.exit(main())
