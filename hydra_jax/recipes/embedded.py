"""How the embedded model's files are made: the heads' training data, prompt files, shipped heads.

Where they are (and the TinyShakespeare split) is `hydra_jax.registry.embedded`.

  python -m hydra_jax.recipes.embedded --write-prompts data/shakespeare_heldout_prompts.jsonl
  python -m hydra_jax.recipes.embedded --self-distill      # the heads' training data (~7 min on CPU)
  python -m hydra_jax.recipes.embedded --ship-heads /work/embedded_heads/hydra_pp/heads hydra_pp

The heads are trained on the base model's own greedy continuations of speeches from the
training split (self-distillation): that is the text they draft for at decode time.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from hydra_jax.registry.embedded import (HEAD_KINDS, HEADS_ROOT, MODEL_DIR, SELF_DISTILL_NEW_TOKENS,
                                         SELF_DISTILL_PROMPTS, calibration_prompts,
                                         directory_bytes, heldout_prompts, self_distill_file,
                                         self_distill_prompts, train_split_file)


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
