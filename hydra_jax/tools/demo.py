"""The demo: speculative decoding with trained draft heads, accepted drafts highlighted.

  python -m hydra_jax.tools.demo                       # the embedded model + its Hydra++ heads
  python -m hydra_jax.tools.demo --prompt "ROMEO:" --max-new-tokens 200 --tree greedy_31
  python -m hydra_jax.tools.demo --model HF_DIR --heads HEADS_DIR --no-color

It decodes one prompt greedily twice, autoregressively and speculatively, on the same model,
and prints the speculative output with every token that came from an ACCEPTED DRAFT
highlighted (the other tokens are the base model's own: one per verify step, plus the first
token, which comes from the prompt's forward pass). Then the accept length (tokens per
base-model step, bonus token included), tokens/s of both, the speedup, and whether the
speculative output equals the autoregressive one (greedy acceptance is lossless, so it must).

Both modes run once untimed first (compilation and warm-up), then `--repeats` timed runs
each, alternating; the fastest run of each mode is reported, so that a noisy shared machine
hurts both alike.

Library use (the notebook renders the same segments as HTML):

    res = run_demo(load_model(dir), heads_dir, "ROMEO:", max_new_tokens=64)
    print(render_text(res.segments, style="brackets"), res.accept_length, res.speedup)
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import os
import sys
from typing import List, Optional, Sequence, Tuple

from hydra_jax.registry.embedded import MODEL_DIR as EMBEDDED_MODEL

HEADS_SUBDIR = "heads"  # MODEL/heads/{medusa,hydra,hydra_pp}/ hold the shipped draft heads
DEFAULT_HEADS_KIND = "hydra_pp"
DEFAULT_PROMPT = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n"
DEFAULT_TREE = "auto"  # the tree fitted to the heads when they ship one (tree.resolve_tree)


# ANSI: accepted drafts black on green (a background shows drafted spaces too), prompt dim.
_ANSI_DRAFT, _ANSI_DIM, _ANSI_RESET = "\x1b[30;42m", "\x1b[2m", "\x1b[0m"

Segment = Tuple[str, bool]  # (text, came from accepted drafts)
NEWLINE_MARK = "\u21b5"  # shown before a drafted line break


class DemoError(ValueError):
  """Missing assets or bad input; the message says what is missing and how to get it."""


# --- which tokens were drafts --------------------------------------------------------------


def draft_mask(accepted_per_step: Sequence[int], num_tokens: int) -> List[bool]:
  """Per output token: True when it was an accepted draft, False when the base model made it.

  Token 0 comes from the prefill. Step i then emits accepted_per_step[i] tokens: that many
  minus one accepted drafts, then the base model's own (bonus) token. The last step can be
  cut short by max_new_tokens or a stop token, hence the truncation to `num_tokens`.
  """
  mask = [False]
  for emitted in accepted_per_step:
    emitted = int(emitted)
    if emitted < 1:
      raise ValueError(f"a speculative step emits at least one token, got {emitted}")
    mask += [True] * (emitted - 1) + [False]
  if len(mask) < num_tokens:
    raise ValueError(f"accepted_per_step accounts for {len(mask)} tokens but the output has "
                     f"{num_tokens}: the statistics do not belong to this output")
  return mask[:num_tokens]


def token_segments(tokenizer, ids: Sequence[int], mask: Sequence[bool],
                   prefix_ids: Sequence[int] = ()) -> List[Segment]:
  """Splits decode(ids) into (text, is_draft) runs, one token at a time.

  Each token's text is what it adds to the decoded prefix, so byte-level BPE merges and
  SentencePiece's leading-space rules come out exactly as in the full decode. A token whose
  text a later token rewrites (it ended inside a multi-byte character, decoded as U+FFFD)
  is merged with the tokens up to that one; a merged piece counts as a draft only when all
  its tokens were drafts. `prefix_ids` (e.g. the prompt) are decoded first as context and
  are not returned.
  """
  if len(ids) != len(mask):
    raise ValueError(f"{len(ids)} tokens but {len(mask)} mask entries")
  prefix_ids = [int(x) for x in prefix_ids]
  ids = [int(x) for x in ids]
  decode = lambda x: tokenizer.decode(x, skip_special_tokens=True)
  shown = decode(prefix_ids)
  texts = [decode(prefix_ids + ids[:i + 1]) for i in range(len(ids))]
  segments: List[Segment] = []
  pending_draft = True
  for i, is_draft in enumerate(mask):
    pending_draft = pending_draft and bool(is_draft)
    # A UTF-8 character spans at most 4 bytes, so only the next 3 tokens can rewrite this one.
    if not all(texts[j].startswith(texts[i]) for j in range(i + 1, min(i + 4, len(ids)))):
      continue  # a later token rewrites this one's text: show them together
    text = texts[i]
    piece = text[len(shown):] if text.startswith(shown) else text[len(_common(shown, text)):]
    shown = text
    if piece:
      if segments and segments[-1][1] == pending_draft:
        segments[-1] = (segments[-1][0] + piece, pending_draft)
      else:
        segments.append((piece, pending_draft))
    pending_draft = True
  return segments


def _common(a: str, b: str) -> str:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return a[:n]


# --- rendering -----------------------------------------------------------------------------


def render_text(segments: Sequence[Segment], style: str = "ansi", prompt: str = "") -> str:
  """The prompt then the segments, drafts in ANSI colour ("ansi") or [brackets] ("brackets")."""
  if style not in ("ansi", "brackets"):
    raise ValueError(f"style must be 'ansi' or 'brackets', got {style!r}")
  out = []
  if prompt:
    out.append(_wrap_lines(prompt, _ANSI_DIM) if style == "ansi" else prompt)
  for text, is_draft in segments:
    if not is_draft:
      out.append(text)
    elif style == "ansi":
      out.append(_wrap_lines(_mark_newlines(text), _ANSI_DRAFT))
    else:
      out.append(_wrap_lines(_mark_newlines(text), "[", "]"))
  return "".join(out)


def _mark_newlines(text: str) -> str:
  # A drafted line break would be invisible: show it as a highlighted NEWLINE_MARK.
  return text.replace("\n", NEWLINE_MARK + "\n")


def _wrap_lines(text: str, start: str, end: str = _ANSI_RESET) -> str:
  # Per line, so that colour or brackets never span a line break.
  return "\n".join(f"{start}{part}{end}" if part else "" for part in text.split("\n"))


def legend(style: str) -> str:
  if style == "ansi":
    sample = f"{_ANSI_DRAFT}highlighted{_ANSI_RESET}"
  else:
    sample = "[bracketed]"
  return (f"legend: {sample} = drafted by the heads and accepted by the base model in the same "
          f"step ({NEWLINE_MARK} = a drafted line break); plain = the base model's own token "
          f"(one per step)")


def render_html(segments: Sequence[Segment], prompt: str = "") -> str:
  """The same as render_text, as HTML for notebooks (drafts on a green background)."""
  parts = ['<div style="font-family:monospace;white-space:pre-wrap;line-height:1.5">']
  if prompt:
    parts.append(f'<span style="color:#888">{html.escape(prompt)}</span>')
  for text, is_draft in segments:
    if is_draft:
      parts.append(f'<span style="background:#b6f2b6;color:#000" title="accepted draft">'
                   f'{html.escape(_mark_newlines(text))}</span>')
    else:
      parts.append(html.escape(text))
  parts.append("</div>")
  return "".join(parts)


def html_legend() -> str:
  return ('<div style="font-size:90%"><span style="background:#b6f2b6;color:#000">'
          'highlighted</span> = drafted by the heads and accepted by the base model in the '
          f'same step ({NEWLINE_MARK} = a drafted line break); plain = the base model\'s own '
          'token (one per step)</div>')


# --- the run -------------------------------------------------------------------------------


@dataclasses.dataclass
class DemoResult:
  prompt: str
  prompt_ids: List[int]
  output_ids: List[int]  # the speculative output (new tokens)
  ar_output_ids: List[int]  # the autoregressive output
  mask: List[bool]  # per output token: came from an accepted draft
  segments: List[Segment]
  accept_length: float  # tokens per verify step, bonus included
  steps: int  # verify steps (base forwards after prefill), speculative
  ar_steps: int
  spec_tokens_per_s: float
  ar_tokens_per_s: float
  spec_time_s: float
  ar_time_s: float
  compile_s: float  # compilation + warm-up of both modes (not in the timings)
  identical: bool  # every speculative run's output equals the autoregressive output
  first_mismatch: Optional[int]  # index of the first differing token, when not identical
  heads_arch: str = ""
  tree: str = ""
  repeats: int = 1

  @property
  def speedup(self) -> float:
    return self.spec_tokens_per_s / self.ar_tokens_per_s if self.ar_tokens_per_s > 0 else 0.0

  @property
  def drafted_tokens(self) -> int:
    return sum(self.mask)


def _first_mismatch(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


def run_demo(model, heads, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 128,
             tree=DEFAULT_TREE, repeats: int = 2, chat: bool = False,
             log=None) -> DemoResult:
  """Greedy AR and speculative decoding of one prompt, timed after one warm-up run each.

  `model`: an HFModel (from load_model) or a model directory; `heads`: a heads directory or
  a (HeadsConfig, params) pair; `tree`: a preset name, JSON file or CompiledTree.
  """
  import time

  from hydra_jax.decoding.api import dtype_name, generate, load_draft_heads, load_model
  from hydra_jax.decoding.tree import resolve_tree

  if isinstance(model, str):
    model = load_model(model)
  if model.tokenizer is None:
    raise DemoError(f"{model.path} has no tokenizer files: the demo needs one to show text")
  if int(repeats) < 1:
    raise DemoError(f"repeats must be >= 1, got {repeats}")
  heads_cfg, heads_params = load_draft_heads(model, heads)
  compiled = resolve_tree(tree, None if isinstance(heads, (tuple, list)) else heads,
                          heads_cfg.num_heads, heads_cfg.draft_vocab_size,
                          dtype=dtype_name(model))
  say = log or (lambda msg: None)
  kw = dict(max_new_tokens=int(max_new_tokens), chat=chat)
  spec_kw = dict(kw, heads=(heads_cfg, heads_params), tree=compiled, mode="spec")

  t0 = time.perf_counter()
  say("compiling and warming up autoregressive decoding ...")
  [ar] = generate(model, [prompt], mode="ar", **kw)
  say(f"compiling and warming up speculative decoding ({heads_cfg.arch} heads, tree "
      f"{compiled.name or 'custom'}: {compiled.num_nodes} nodes, depth {compiled.depth}) ...")
  [sp] = generate(model, [prompt], **spec_kw)
  compile_s = time.perf_counter() - t0
  mismatch = _first_mismatch(sp.output_ids, ar.output_ids)
  best_ar, best_sp = ar, sp
  for i in range(int(repeats)):
    say(f"timed run {i + 1}/{repeats} ...")
    [ar_i] = generate(model, [prompt], mode="ar", **kw)
    [sp_i] = generate(model, [prompt], **spec_kw)
    if mismatch is None:  # every run must reproduce the same greedy output
      mismatch = _first_mismatch(sp_i.output_ids, ar.output_ids)
    # The first timed run replaces the warm-up; later ones only when faster.
    if i == 0 or ar_i.time_s < best_ar.time_s:
      best_ar = ar_i
    if i == 0 or sp_i.time_s < best_sp.time_s:
      best_sp = sp_i

  per_step = [int(x) for x in (sp.extra.get("accepted_per_step") or [])]
  mask = draft_mask(per_step, len(sp.output_ids))
  segments = token_segments(model.tokenizer, sp.output_ids, mask, prefix_ids=sp.prompt_ids)
  return DemoResult(
      prompt=prompt, prompt_ids=list(sp.prompt_ids), output_ids=list(sp.output_ids),
      ar_output_ids=list(ar.output_ids), mask=mask, segments=segments,
      accept_length=float(sp.extra.get("accept_length") or 0.0), steps=sp.steps,
      ar_steps=ar.steps, spec_tokens_per_s=best_sp.tokens_per_s,
      ar_tokens_per_s=best_ar.tokens_per_s, spec_time_s=best_sp.time_s,
      ar_time_s=best_ar.time_s, compile_s=compile_s, identical=mismatch is None,
      first_mismatch=mismatch, heads_arch=heads_cfg.arch, tree=compiled.name or "custom",
      repeats=int(repeats))


def summary_lines(res: DemoResult) -> List[str]:
  n = len(res.output_ids)
  lines = [
      f"accept length: {res.accept_length:.2f} tokens per base-model step (bonus token "
      f"included): {n} tokens in {res.steps} verify steps + the prefill's first token, "
      f"{res.drafted_tokens} of them accepted drafts; autoregressive decoding needs "
      f"{res.ar_steps} steps",
      f"tokens/s: {res.spec_tokens_per_s:.1f} speculative ({res.heads_arch} heads, tree "
      f"{res.tree}) vs {res.ar_tokens_per_s:.1f} autoregressive (greedy, same prompt, compile "
      f"excluded, best of {res.repeats} runs each)",
      f"speedup: {res.speedup:.2f}x over autoregressive decoding "
      f"({res.ar_time_s * 1e3:.0f} ms -> {res.spec_time_s * 1e3:.0f} ms)",
  ]
  if res.identical:
    lines.append(f"lossless: the speculative output is identical to autoregressive greedy "
                 f"decoding ({n} tokens)")
  else:
    lines.append(f"lossless: NO - the speculative output differs from autoregressive greedy "
                 f"decoding at token {res.first_mismatch}: this is a bug")
  return lines


# --- assets and CLI ------------------------------------------------------------------------


def default_heads_dir(model_dir: str, kind: str = DEFAULT_HEADS_KIND) -> str:
  return os.path.join(model_dir, HEADS_SUBDIR, kind)


def check_assets(model_dir: str, heads_dir: str, embedded: bool) -> None:
  """Raises DemoError naming what is missing (the embedded model, its heads) and the fix."""
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    if embedded:
      raise DemoError(
          f"the embedded base model is missing: {model_dir}/config.json not found. It ships "
          f"with the repository (made by scripts/pretrain_base.py); pass --model DIR to use "
          f"another Hugging Face model directory")
    raise DemoError(f"--model {model_dir}: no config.json there; give a Hugging Face model "
                    f"directory (config.json, model.safetensors, tokenizer files)")
  if embedded and not os.path.isfile(os.path.join(heads_dir, "heads_config.json")):
    raise DemoError(
        f"the embedded model's trained draft heads are missing: {heads_dir}/heads_config.json "
        f"not found (the shipped heads are {os.path.join(model_dir, HEADS_SUBDIR)}/"
        f"{{medusa,hydra,hydra_pp}}/). Train them with train.py and configs/embedded_*.py (see "
        f"those files), or pass --heads DIR with heads trained for this model")
  if not os.path.isdir(heads_dir) or not os.listdir(heads_dir):
    raise DemoError(f"no draft heads for {model_dir}: {heads_dir} does not exist; pass --heads "
                    f"DIR (heads saved by train.py, or a released Hydra / Medusa directory)")


def use_color(flag: Optional[bool], stream) -> bool:
  """--color / --no-color win; else NO_COLOR / FORCE_COLOR; else colour only on a TTY."""
  if flag is not None:
    return flag
  if os.environ.get("NO_COLOR"):
    return False
  if os.environ.get("FORCE_COLOR"):
    return True
  return bool(getattr(stream, "isatty", lambda: False)())


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m hydra_jax.tools.demo",
      description="Speculative decoding with draft heads, accepted drafts highlighted, vs "
                  "autoregressive decoding in the same run.")
  p.add_argument("--model", default=None,
                 help="Hugging Face model directory (default: the embedded model, "
                      "hydra_jax/assets/tiny_shakespeare)")
  p.add_argument("--heads", default=None,
                 help=f"draft heads directory (default: MODEL/{HEADS_SUBDIR}/{DEFAULT_HEADS_KIND}, "
                      f"the Hydra++ heads)")
  p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt (default: %(default)r)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--tree", default=DEFAULT_TREE,
                 help="speculation tree: a preset name, a JSON file of top-k rank paths, "
                      "dynamic:N (N nodes chosen per step), or auto (HEADS_DIR/tree_auto.json "
                      "when the heads have one, else "
                      "mc_sim_7b_63); default: %(default)s")
  p.add_argument("--repeats", type=int, default=2,
                 help="timed runs per mode after the warm-up; the fastest counts")
  p.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  color = p.add_mutually_exclusive_group()
  color.add_argument("--color", dest="color", action="store_true", default=None,
                     help="force ANSI colour (default: only on a terminal)")
  color.add_argument("--no-color", dest="color", action="store_false",
                     help="mark accepted drafts with [brackets] instead of colour")
  return p.parse_args(argv)


def main(argv=None, stdout=None) -> int:
  args = parse_args(argv)
  out = stdout or sys.stdout
  err = lambda msg: print(msg, file=sys.stderr, flush=True)
  model_dir = os.path.abspath(os.path.expanduser(args.model or EMBEDDED_MODEL))
  embedded = args.model is None
  heads_dir = os.path.abspath(os.path.expanduser(args.heads or default_heads_dir(model_dir)))
  try:
    check_assets(model_dir, heads_dir, embedded=embedded and args.heads is None)
  except DemoError as e:
    err(f"hydra_jax.tools.demo: {e}")
    return 2
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  # Heavy imports after the checks, so --help and missing assets answer at once.
  from hydra_jax.decoding.api import INPUT_ERRORS, load_model

  try:
    err(f"loading {model_dir} and heads {heads_dir}")
    model = load_model(model_dir, dtype=args.dtype)
    res = run_demo(model, heads_dir, args.prompt, args.max_new_tokens, args.tree,
                   repeats=args.repeats, chat=args.chat, log=err)
  except (DemoError,) + INPUT_ERRORS as e:
    err(f"hydra_jax.tools.demo: error: {e}")
    return 2
  style = "ansi" if use_color(args.color, out) else "brackets"
  prompt_text = model.tokenizer.decode(res.prompt_ids, skip_special_tokens=True)
  print(legend(style), file=out)
  print("-" * 72, file=out)
  print(render_text(res.segments, style, prompt=prompt_text), file=out)
  print("-" * 72, file=out)
  for line in summary_lines(res):
    print(line, file=out)
  out.flush()
  return 0 if res.identical else 1


if __name__ == "__main__":
  sys.exit(main())
