"""The embedded model's files: where they are, and the TinyShakespeare split it was trained on.

The package ships a small pretrained base (`assets/tiny_shakespeare`, see its README.md) and
three sets of draft heads trained for it (`assets/tiny_shakespeare/heads/{medusa,hydra,
hydra_pp}`, see heads/README.md). The base was pretrained on the first ~90% of
TinyShakespeare; the tail, cut at a speech boundary, is held out. Head training must see the
same training split and never the held-out tail, and the benchmark's prompts come from the
tail, so both take the split from here rather than re-deriving it.

How these files are made (the heads' self-distilled data, the prompt files, shipping heads)
is `hydra_jax.recipes.embedded`; this module only says where they are, so that loading a
model or a config never needs the recipes.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Dict, List, Optional, Tuple

from hydra_jax.registry.paths import HEAD_KINDS, HEAD_LABELS, PACKAGE_DIR, REPO_ROOT, cache_root

MODEL_DIR = os.path.join(PACKAGE_DIR, "assets", "tiny_shakespeare")
HEADS_ROOT = os.path.join(MODEL_DIR, "heads")
PROMPTS_FILE = os.path.join(REPO_ROOT, "data", "shakespeare_heldout_prompts.jsonl")

# hydra_jax.recipes.pretrain.PretrainConfig.val_fraction of the shipped model; the model card states
# the resulting character counts, which `split_corpus` checks.
VAL_FRACTION = 0.1


class EmbeddedAssetError(FileNotFoundError):
  """A shipped file (corpus, model, heads) is missing; the message says how to make it."""


def corpus_path() -> str:
  """TinyShakespeare: the repository copy, else ../shared/data (a development checkout)."""
  for path in (os.path.join(REPO_ROOT, "data", "tinyshakespeare.txt"),
               os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "tinyshakespeare.txt")):
    if os.path.isfile(path):
      return path
  raise EmbeddedAssetError(
      "data/tinyshakespeare.txt is missing: it ships with the repository (run from a clone, "
      "not from an installed wheel)")


def heads_dirs() -> Dict[str, str]:
  """{kind: directory} of the shipped heads that exist, in HEAD_KINDS order."""
  return {k: os.path.join(HEADS_ROOT, k) for k in HEAD_KINDS
          if os.path.isfile(os.path.join(HEADS_ROOT, k, "heads_config.json"))}


def _card_train_chars() -> Optional[int]:
  """The training-split size in characters the model card states, if it states one."""
  card = os.path.join(MODEL_DIR, "README.md")
  if not os.path.isfile(card):
    return None
  with open(card, encoding="utf-8") as f:
    m = re.search(r"the first\s+([\d,]+)\s+characters are training data", f.read())
  return int(m.group(1).replace(",", "")) if m else None


def split_text(text: str, val_fraction: float) -> Tuple[str, str]:
  """(train, val): val is the contiguous tail, starting at the first speech after the cut."""
  if not 0.0 < val_fraction < 0.5:
    raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
  cut = int(len(text) * (1.0 - val_fraction))
  boundary = text.find("\n\n", cut)
  cut = boundary + 2 if boundary >= 0 else cut
  return text[:cut], text[cut:]


def split_corpus(path: Optional[str] = None) -> Tuple[str, str]:
  """(train, held-out) text exactly as the embedded model was pretrained on.

  Uses split_text (the function that made the split) and checks the cut
  against the model card, so a changed corpus or fraction fails loudly instead of leaking
  held-out text into head training.
  """
  with open(path or corpus_path(), encoding="utf-8") as f:
    text = f.read()
  train, heldout = split_text(text, VAL_FRACTION)
  expected = _card_train_chars()
  if expected is not None and expected != len(train):
    raise ValueError(f"the split gives {len(train):,} training characters but the model card "
                     f"({MODEL_DIR}/README.md) says {expected:,}: the corpus or VAL_FRACTION "
                     f"differs from what the model was pretrained on")
  return train, heldout


def train_split_file(directory: Optional[str] = None) -> str:
  """A plain-text file holding only the training split (written once; named by content hash).

  The trainer's "text" source reads whole files, so head-training configs point it here.
  """
  train, _ = split_corpus()
  digest = hashlib.sha256(train.encode("utf-8")).hexdigest()[:12]
  directory = directory or cache_root()
  path = os.path.join(directory, f"tinyshakespeare_train_{digest}.txt")
  if not os.path.isfile(path):
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(train)
    os.replace(tmp, path)  # atomic: concurrent callers write identical bytes
  return path


def heldout_prompts(count: int = 32, lines: int = 3, min_chars: int = 60) -> List[str]:
  """`count` prompts from the held-out split, evenly spaced, in text order.

  A prompt is the start of one speech: the speaker line plus up to `lines` verse lines (the
  model then continues the speech). Speeches shorter than `min_chars` are skipped.
  """
  _, heldout = split_corpus()
  speeches = [s.strip("\n") for s in heldout.split("\n\n")]
  candidates = []
  for s in speeches:
    rows = s.split("\n")
    if len(rows) < 2 or not rows[0].endswith(":"):
      continue
    prompt = "\n".join(rows[:1 + lines]) + "\n"
    if len(prompt) >= min_chars:
      candidates.append(prompt)
  if len(candidates) < count:
    raise ValueError(f"the held-out split has only {len(candidates)} usable speeches; ask for "
                     f"fewer than {count} prompts")
  step = len(candidates) / count
  return [candidates[int(i * step)] for i in range(count)]


SELF_DISTILL_PROMPTS = 2400  # speeches from the training split
SELF_DISTILL_NEW_TOKENS = 224  # greedy tokens per speech: ~0.5M training tokens in all
SELF_DISTILL_COMMAND = "python -m hydra_jax.recipes.embedded --self-distill"  # ~7 min on CPU


def self_distill_prompts(count: int = SELF_DISTILL_PROMPTS, seed: int = 0) -> List[str]:
  """Speech openings from the TRAINING split: a speaker line and 1-3 verse lines, shuffled
  deterministically and distinct; the plain template adds the newline the held-out prompts
  end with, so training contexts look like the benchmark's."""
  import random
  train, _ = split_corpus()
  lines = train.split("\n")
  speakers = [i for i, line in enumerate(lines) if re.fullmatch(r"[A-Z][A-Za-z' ]*:", line)]
  rng = random.Random(seed)
  seen: Dict[str, None] = {}
  while len(seen) < count:
    i = rng.choice(speakers)
    body = []
    for line in lines[i + 1:i + 1 + rng.randint(1, 3)]:
      if not line.strip():
        break
      body.append(line)
    if body:
      seen.setdefault(lines[i] + "\n" + "\n".join(body))
  return list(seen)


def self_distill_file(directory: Optional[str] = None) -> str:
  """Where the heads' training data lives (ShareGPT JSONL, plain template); written by
  SELF_DISTILL_COMMAND."""
  return os.path.join(directory or cache_root(), "tiny_shakespeare_selfdistill_v1.jsonl")


CALIBRATION_SEED = 1  # training-split speeches other than the self-distillation order's


def calibration_prompts(count: int = 32) -> List[str]:
  """Training-split speech openings for fitting trees (`tree_fit --prompts`): the held-out
  prompts are the benchmark's and never fit anything. Each ends with a newline, as those do."""
  return [p + "\n" for p in self_distill_prompts(count, seed=CALIBRATION_SEED)]


def directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
