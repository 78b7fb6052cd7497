"""The embedded model's files: where they are, and the TinyShakespeare split it was trained on.

The package ships a small pretrained base (`assets/tiny_shakespeare`, see its README.md) and
three sets of draft heads trained for it (`assets/tiny_shakespeare/heads/{medusa,hydra,
hydra_pp}`, see heads/README.md). The base was pretrained on the first ~90% of
TinyShakespeare; the tail, cut at a speech boundary, is held out. Head training must see the
same training split and never the held-out tail, and the benchmark's prompts come from the
tail, so both take the split from here rather than re-deriving it.

  python -m hydra_jax.embedded --write-prompts data/shakespeare_heldout_prompts.jsonl
  python -m hydra_jax.embedded --self-distill      # the heads' training data (~7 min on CPU)
  python -m hydra_jax.embedded --ship-heads /work/embedded_heads/hydra_pp/heads hydra_pp

The heads are trained on the base model's own greedy continuations of speeches from the
training split (self-distillation): that is the text they draft for at decode time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Dict, List, Optional, Tuple

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)
MODEL_DIR = os.path.join(PACKAGE_DIR, "assets", "tiny_shakespeare")
HEADS_ROOT = os.path.join(MODEL_DIR, "heads")
# Benchmark / table order; directory names (hydra_pp: "+" is awkward in paths and shells).
HEAD_KINDS = ("medusa", "hydra", "hydra_pp")
HEAD_LABELS = {"medusa": "Medusa", "hydra": "Hydra", "hydra_pp": "Hydra++"}
PROMPTS_FILE = os.path.join(REPO_ROOT, "data", "shakespeare_heldout_prompts.jsonl")

# hydra_jax.pretrain.PretrainConfig.val_fraction of the shipped model; the model card states
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


def split_corpus(path: Optional[str] = None) -> Tuple[str, str]:
  """(train, held-out) text exactly as the embedded model was pretrained on.

  Uses hydra_jax.pretrain.split_text (the function that made the split) and checks the cut
  against the model card, so a changed corpus or fraction fails loudly instead of leaking
  held-out text into head training.
  """
  from hydra_jax.pretrain import split_text
  with open(path or corpus_path(), encoding="utf-8") as f:
    text = f.read()
  train, heldout = split_text(text, VAL_FRACTION)
  expected = _card_train_chars()
  if expected is not None and expected != len(train):
    raise ValueError(f"the split gives {len(train):,} training characters but the model card "
                     f"({MODEL_DIR}/README.md) says {expected:,}: the corpus or VAL_FRACTION "
                     f"differs from what the model was pretrained on")
  return train, heldout


def cache_dir() -> str:
  return os.environ.get("HYDRA_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hydra_jax")


def train_split_file(directory: Optional[str] = None) -> str:
  """A plain-text file holding only the training split (written once; named by content hash).

  The trainer's "text" source reads whole files, so head-training configs point it here.
  """
  train, _ = split_corpus()
  digest = hashlib.sha256(train.encode("utf-8")).hexdigest()[:12]
  directory = directory or cache_dir()
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
  """Where `--self-distill` writes the heads' training data (ShareGPT JSONL, plain template)."""
  return os.path.join(directory or cache_dir(), "tiny_shakespeare_selfdistill_v1.jsonl")


def write_self_distill(path: Optional[str] = None, count: int = SELF_DISTILL_PROMPTS,
                       max_new_tokens: int = SELF_DISTILL_NEW_TOKENS, batch_size: int = 32) -> str:
  """The base answers `count` training-split prompts greedily; written atomically to `path`."""
  from hydra_jax.training.self_distill import self_distill
  path = path or self_distill_file()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  prompts = [{"id": str(i), "system": None, "turns": [p]}
             for i, p in enumerate(self_distill_prompts(count))]
  tmp = f"{path}.{os.getpid()}.tmp"
  self_distill(MODEL_DIR, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
               template="plain", out_path=tmp)
  os.replace(tmp, path)
  return path


def require_self_distill_file() -> str:
  """The training data path for the embedded heads' configs, or an error naming the fix."""
  path = self_distill_file()
  if not os.path.isfile(path):
    raise EmbeddedAssetError(f"{path} does not exist: write the heads' training data first with "
                             f"`python -m hydra_jax.embedded --self-distill` (~7 min on CPU)")
  return path


CALIBRATION_SEED = 1  # training-split speeches other than the self-distillation order's


def calibration_prompts(count: int = 32) -> List[str]:
  """Training-split speech openings for fitting trees (`tree_fit --prompts`): the held-out
  prompts are the benchmark's and never fit anything. Each ends with a newline, as those do."""
  return [p + "\n" for p in self_distill_prompts(count, seed=CALIBRATION_SEED)]


def write_prompts(path: str, count: int = 32, lines: int = 3, calibration: bool = False) -> int:
  prompts = calibration_prompts(count) if calibration else heldout_prompts(count, lines)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for p in prompts:
      f.write(json.dumps({"prompt": p}) + "\n")
  return len(prompts)


def ship_heads(src: str, kind: str, root: Optional[str] = None) -> str:
  """Copies trained heads (train.py's WORKDIR/heads) into the package as bfloat16."""
  from hydra_jax.checkpoint.heads_io import ship_heads as ship
  if kind not in HEAD_KINDS:
    raise ValueError(f"kind must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
  return ship(src, os.path.join(root or HEADS_ROOT, kind))


def directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


if __name__ == "__main__":
  import argparse
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--write-prompts", metavar="FILE", default=None,
                  help="write held-out prompts as JSONL {\"prompt\": text}")
  ap.add_argument("--write-calibration-prompts", metavar="FILE", default=None,
                  help="write --count TRAINING-split prompts for tree fitting (JSONL)")
  ap.add_argument("--count", type=int, default=32)
  ap.add_argument("--lines", type=int, default=3, help="verse lines after the speaker line")
  ap.add_argument("--train-file", action="store_true", help="print the training-split file path")
  ap.add_argument("--self-distill", nargs="?", const="", default=None, metavar="FILE",
                  help="write the heads' training data: the base's greedy continuations of "
                       "training-split speeches (default FILE: the cache path the configs read)")
  ap.add_argument("--ship-heads", nargs=2, metavar=("SRC", "KIND"), default=None,
                  help=f"store trained heads SRC as bf16 in {HEADS_ROOT}/KIND "
                       f"(KIND: {', '.join(HEAD_KINDS)})")
  args = ap.parse_args()
  if args.ship_heads:
    dst = ship_heads(*args.ship_heads)
    print(f"{args.ship_heads[0]} -> {dst} ({directory_bytes(dst) / 1e6:.1f} MB)")
  if args.write_prompts:
    print(f"{write_prompts(args.write_prompts, args.count, args.lines)} prompts -> "
          f"{args.write_prompts}")
  if args.write_calibration_prompts:
    n = write_prompts(args.write_calibration_prompts, args.count, calibration=True)
    print(f"{n} calibration prompts -> {args.write_calibration_prompts}")
  if args.train_file:
    print(train_split_file())
  if args.self_distill is not None:
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(write_self_distill(args.self_distill or None))
