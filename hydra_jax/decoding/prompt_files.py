"""Prompt files, read one way for decode.py, the bench and tree_fit.

Two layouts, told apart by the first non-empty line:
  JSONL, one object per line, each with one of
    "turns":      ["user turn", ...]   (MT-Bench; a multi-turn conversation)
    "prompt":     "text"               (one turn)
    "prompt_ids": [token ids]          (already tokenized)
  or plain text: every non-empty line is a one-turn prompt.

An entry is a list of turns (strings) or a list of token ids (ints). Errors name the file and
line; each command line maps `PromptFileError` to its own exit code. Nothing heavy is
imported: decode.py reads its prompts before loading jax.

(Self-distillation's prompt files carry more: system prompts and ShareGPT records, with bad
records skipped; they are read by `hydra_jax.training.self_distill.read_prompts`.)
"""

from __future__ import annotations

import json
from typing import List, Union

Entry = Union[List[str], List[int]]


class PromptFileError(ValueError):
  """A prompt file that cannot be read; the message names the file, the line and the fix."""


def _is_ids(value) -> bool:
  return isinstance(value, list) and all(
      isinstance(x, int) and not isinstance(x, bool) for x in value)


def _entry(obj, path: str, n: int) -> Entry:
  if not isinstance(obj, dict):
    raise PromptFileError(f"{path}:{n}: expected a JSON object")
  turns = obj.get("turns")
  if isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns):
    return list(turns)
  if isinstance(obj.get("prompt"), str):
    return [obj["prompt"]]
  if "prompt_ids" in obj:
    if not _is_ids(obj["prompt_ids"]):
      raise PromptFileError(f"{path}:{n}: \"prompt_ids\" must be a list of integer token ids")
    return list(obj["prompt_ids"])
  raise PromptFileError(f"{path}:{n}: expected an object with \"turns\" (a list of strings), "
                        f"\"prompt\" (text) or \"prompt_ids\" (a list of token ids)")


def read_prompt_file(path: str, flag: str = "--prompts") -> List[Entry]:
  """The entries of a prompt file (layouts above), in file order; `flag` names the option
  that gave the path, for the error messages."""
  try:
    with open(path, "rb") as f:
      raw_lines = f.read().split(b"\n")
  except OSError as e:
    raise PromptFileError(f"cannot read {flag} {path}: {e.strerror}") from None
  body = []
  for n, raw in enumerate(raw_lines, 1):
    try:
      line = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
      raise PromptFileError(f"{path}:{n}: not UTF-8 (byte {e.start} of the line); save the "
                            f"file as UTF-8") from None
    if line.strip():
      body.append((n, line))
  if not body:
    raise PromptFileError(f"{flag} {path} holds no prompts")
  try:
    is_jsonl = isinstance(json.loads(body[0][1]), dict)
  except json.JSONDecodeError:
    is_jsonl = False
  if not is_jsonl:
    return [[line] for _, line in body]
  out: List[Entry] = []
  for n, line in body:
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise PromptFileError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    out.append(_entry(obj, path, n))
  return out


def read_single_turn_prompts(path: str, flag: str, tool: str) -> List[Union[str, List[int]]]:
  """The file's entries as one prompt each: its text, or its token ids (decode.py, tree_fit).
  `tool` answers one turn per prompt, so a multi-turn entry is an error that says where such
  files go."""
  out: List[Union[str, List[int]]] = []
  for i, entry in enumerate(read_prompt_file(path, flag), 1):
    if entry and isinstance(entry[0], str):
      if len(entry) > 1:
        raise PromptFileError(f"{path}: prompt {i} has {len(entry)} turns; {tool} answers one "
                              "turn per prompt (python -m hydra_jax.bench answers multi-turn "
                              "conversations)")
      out.append(entry[0])
    else:
      out.append(list(entry))
  return out
