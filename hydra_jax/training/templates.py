"""Chat records -> token ids and an assistant-only loss mask.

A record is validated into a list of {"role", "content"} messages (`normalize_conversation`),
then rendered either with the tokenizer's own chat template or with a named template, and
tokenized once as a whole string. Which tokens are trainable is decided on characters, not
tokens: the renderer reports the character spans of every assistant reply (its content
through the end-of-turn token), and a token is trainable when its offset range overlaps one
of them. Tokenizing the whole string (rather than turn by turn) gives exactly the ids the
model sees at inference, including merges across turn boundaries.

Named templates:
  vicuna_v1.1  FastChat's Vicuna v1.1: "{system} USER: {q} ASSISTANT: {a}</s>USER: ...",
               with FastChat's default system prompt when the record has none.
  plain        no role markers: "{system}\n{q}\n{a}</s>{q}\n{a}</s>".
  chat_template  the tokenizer's `chat_template` (Jinja). With `{% generation %}` tags the
               mask is transformers' `return_assistant_tokens_mask`; otherwise each assistant
               turn is located by rendering the conversation prefix with and without it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from hydra_jax.training.errors import DataError

VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("chat_template", "vicuna_v1.1", "plain")

# ShareGPT dumps and OpenAI-style records name roles differently.
_ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "model": "assistant",
    "system": "system",
}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Message = Dict[str, str]
Span = Tuple[int, int]


class MalformedRecord(ValueError):
  """A record that cannot be trained on; `reason` is a short key counted in the data stats."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


def normalize_conversation(record) -> List[Message]:
  """Validates a ShareGPT / OpenAI-style record into [system?] user, assistant, user, ... .

  Accepts {"conversations": [{"from": "human"|"gpt"|"system", "value": str}]} and
  {"messages": [{"role": "user"|"assistant"|"system", "content": str}]}. A trailing user turn
  (a question without an answer) is dropped since nothing in it is trained. Raises
  MalformedRecord for anything else.
  """
  if not isinstance(record, dict):
    raise MalformedRecord("not_a_dict", type(record).__name__)
  turns = None
  for key in ("conversations", "conversation", "messages"):
    if key in record:
      turns = record[key]
      break
  if turns is None:
    raise MalformedRecord("no_conversations", f"keys {sorted(record)[:8]}")
  if not isinstance(turns, list):
    raise MalformedRecord("conversations_not_a_list", type(turns).__name__)
  if not turns:
    raise MalformedRecord("empty_conversation")
  messages: List[Message] = []
  for turn in turns:
    if not isinstance(turn, dict):
      raise MalformedRecord("turn_not_a_dict", type(turn).__name__)
    role = turn.get("from", turn.get("role"))
    content = turn["value"] if "value" in turn else turn.get("content")
    if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
      raise MalformedRecord("unknown_role", repr(role)[:40])
    if not isinstance(content, str):
      raise MalformedRecord("non_string_value", type(content).__name__)
    messages.append({"role": _ROLE_ALIASES[role.lower()], "content": content})

  system = messages.pop(0) if messages[0]["role"] == "system" else None
  if any(m["role"] == "system" for m in messages):
    raise MalformedRecord("misplaced_system", "a system turn after the first turn")
  if messages and messages[-1]["role"] == "user":
    messages.pop()
  if not messages:
    raise MalformedRecord("no_assistant_turn")
  if messages[0]["role"] != "user":
    raise MalformedRecord("first_turn_not_human", messages[0]["role"])
  for i, m in enumerate(messages):
    if m["role"] != ("user" if i % 2 == 0 else "assistant"):
      raise MalformedRecord("roles_not_alternating", f"turn {i} is {m['role']}")
    if not m["content"].strip():
      raise MalformedRecord("empty_turn", f"turn {i} ({m['role']})")
  if system is not None and system["content"].strip():
    messages.insert(0, system)
  return messages


def _split_system(messages: Sequence[Message]) -> Tuple[Optional[str], Sequence[Message]]:
  if messages and messages[0]["role"] == "system":
    return messages[0]["content"], messages[1:]
  return None, messages


def _eos_text(tokenizer) -> str:
  if not tokenizer.eos_token:
    raise DataError("named chat templates end each assistant turn with the tokenizer's EOS "
                     "token, but this tokenizer has none; set tokenizer.eos_token")
  return tokenizer.eos_token


def render_vicuna(messages: Sequence[Message], eos: str,
                  system_prompt: Optional[str] = None) -> Tuple[str, List[Span]]:
  """FastChat's vicuna_v1.1 (sep " ", sep2 "</s>"), with `eos` as sep2; spans = replies+eos."""
  system, turns = _split_system(messages)
  text = (system or system_prompt or VICUNA_SYSTEM_PROMPT) + " "
  spans: List[Span] = []
  for m in turns:
    if m["role"] == "user":
      text += "USER: " + m["content"] + " "
    else:
      text += "ASSISTANT: "
      start = len(text)
      text += m["content"] + eos
      spans.append((start, len(text)))
  return text, spans


def render_plain(messages: Sequence[Message], eos: str,
                 system_prompt: Optional[str] = None) -> Tuple[str, List[Span]]:
  """No role markers: prompts end with a newline, replies with EOS."""
  system, turns = _split_system(messages)
  system = system or system_prompt
  text = system + "\n" if system else ""
  spans: List[Span] = []
  for m in turns:
    if m["role"] == "user":
      text += m["content"] + "\n"
    else:
      start = len(text)
      text += m["content"] + eos
      spans.append((start, len(text)))
  return text, spans


def has_generation_tags(tokenizer) -> bool:
  template = getattr(tokenizer, "chat_template", None)
  return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


def render_chat_template(messages: Sequence[Message], tokenizer) -> Tuple[str, List[Span]]:
  """Renders with the tokenizer's template; finds each reply by rendering prefixes.

  For assistant turn i, `prefix` is messages[:i] with the generation prompt and `upto` is
  messages[:i+1]; the reply is upto[len(prefix):]. The span starts where the reply's content
  starts (a separator the template puts after the generation prompt, e.g. the space in
  "ASSISTANT: ", is prompt, as with `{% generation %}` tags) and ends at the end-of-turn
  token; whitespace the template adds after that token is never generated, so not trained.
  """
  def render(msgs, gen):
    return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)

  full = render(messages, False)
  spans: List[Span] = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prefix, upto = render(messages[:i], True), render(messages[:i + 1], False)
    if not (upto.startswith(prefix) and full.startswith(upto)):
      raise MalformedRecord(
          "template_not_prefix_stable",
          f"rendering turn {i} does not extend the rendering of the turns before it; "
          "use data.template='vicuna_v1.1' or a template with {% generation %} tags")
    start = -1
    for needle in (m["content"], m["content"].strip()):
      start = upto.find(needle, len(prefix))
      if start >= 0:
        break
    if start < 0:  # the template rewrote the content: train on everything after the prompt
      start = len(prefix)
    end = max(start, len(upto.rstrip()))
    spans.append((start, end))
  return full, spans


@dataclasses.dataclass
class Rendered:
  """A conversation as text plus trainable character spans, or (generation-tag templates)
  already as ids and mask from transformers."""
  text: str = ""
  spans: Tuple[Span, ...] = ()
  add_special_tokens: bool = False
  ids: Optional[np.ndarray] = None
  mask: Optional[np.ndarray] = None


def render_conversation(messages: Sequence[Message], tokenizer, template: str = "chat_template",
                        system_prompt: Optional[str] = None) -> Rendered:
  """Renders one validated conversation; raises MalformedRecord when the template cannot.

  `system_prompt` is used when the conversation has no system turn (for vicuna_v1.1 the
  default is FastChat's).
  """
  if template == "chat_template":
    if not getattr(tokenizer, "chat_template", None):
      raise DataError("the tokenizer has no chat_template; set data.template='vicuna_v1.1' "
                       "(or 'plain'), or give the tokenizer a template")
    msgs = list(messages)
    if system_prompt and msgs[0]["role"] != "system":
      msgs.insert(0, {"role": "system", "content": system_prompt})
    try:
      if has_generation_tags(tokenizer):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return Rendered(ids=np.asarray(out["input_ids"], np.int32),
                        mask=np.asarray(out["assistant_masks"], np.uint8))
      text, spans = render_chat_template(msgs, tokenizer)
    except MalformedRecord:
      raise
    except Exception as e:  # a template may refuse a record (e.g. "system role not supported")
      raise MalformedRecord("template_error", f"{type(e).__name__}: {e}"[:200]) from e
    # Templates write their own BOS into the text, as apply_chat_template assumes.
    return Rendered(text, tuple(spans), add_special_tokens=False)
  if template == "vicuna_v1.1":
    text, spans = render_vicuna(messages, _eos_text(tokenizer), system_prompt)
  elif template == "plain":
    text, spans = render_plain(messages, _eos_text(tokenizer), system_prompt)
  else:
    raise DataError(f"unknown chat template {template!r}; use one of {TEMPLATES}")
  # Named templates are plain text: the tokenizer adds its usual BOS (as FastChat does).
  return Rendered(text, tuple(spans), add_special_tokens=True)


def tokenize_rendered(tokenizer,
                      rendered: Sequence[Rendered]) -> List[Tuple[np.ndarray, np.ndarray]]:
  """(ids int32 [L], mask uint8 [L]) per conversation; a token is trainable when its
  character range overlaps a span. Texts are tokenized in one batched call."""
  if not getattr(tokenizer, "is_fast", False):
    raise TypeError("assistant masks need character offsets, which only fast (Rust) "
                    "tokenizers give; load the tokenizer with use_fast=True")
  out: List[Tuple[np.ndarray, np.ndarray]] = [None] * len(rendered)  # type: ignore[list-item]
  for special in (False, True):
    todo = [i for i, r in enumerate(rendered) if r.ids is None and r.add_special_tokens == special]
    if not todo:
      continue
    enc = tokenizer([rendered[i].text for i in todo], add_special_tokens=special,
                    return_offsets_mapping=True)
    for j, i in enumerate(todo):
      ids = np.asarray(enc["input_ids"][j], np.int32)
      offsets = np.asarray(enc["offset_mapping"][j], np.int64).reshape(-1, 2)
      starts, ends = offsets[:, 0], offsets[:, 1]
      mask = np.zeros(ids.shape, bool)
      for s, e in rendered[i].spans:
        # Zero-width tokens (a BOS the tokenizer adds, offsets (0, 0)) are never trainable.
        mask |= (starts < e) & (ends > s) & (ends > starts)
      out[i] = (ids, mask.astype(np.uint8))
  for i, r in enumerate(rendered):
    if r.ids is not None:
      out[i] = (r.ids, r.mask)
  return out


def tokenize_conversation(messages: Sequence[Message], tokenizer, template: str = "chat_template",
                          system_prompt: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
  """Token ids int32 [L] and loss mask uint8 [L] (1 on assistant replies incl. their EOS)."""
  return tokenize_rendered(
      tokenizer, [render_conversation(messages, tokenizer, template, system_prompt)])[0]
