"""Pretrains the embedded base model (hydra_jax/assets/tiny_shakespeare) on TinyShakespeare.

The defaults are the shipped model; the command that made it (its README.md has the exact
line and the numbers; 30-45 minutes on a shared 2-core CPU):

  python scripts/pretrain_base.py --workdir /work/pretrain_run2 \
      --export_dir hydra_jax/assets/tiny_shakespeare --steps 650 --minutes 60

A minute-long smoke run:

  python scripts/pretrain_base.py --workdir /tmp/pt_smoke --hidden_size 64 --num_layers 2 \
      --num_heads 4 --num_kv_heads 4 --intermediate_size 128 --vocab_size 512 --seq_len 64 \
      --steps 30 --eval_every 10

Rerunning with the same --workdir resumes from its checkpoint. Every PretrainConfig field is
a flag (see hydra_jax/pretrain.py for what each one means).
"""

import argparse
import dataclasses
import os
import shlex
import sys

from hydra_jax.recipes.pretrain import PretrainConfig, pretrain


def _flag_type(field):
  if field.type in ("bool", bool):
    return lambda s: s.lower() in ("1", "true", "yes")
  default = field.default
  return type(default) if default is not None else str


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  for f in dataclasses.fields(PretrainConfig):
    p.add_argument(f"--{f.name}", type=_flag_type(f), default=f.default,
                   help=f"(default: {f.default})")
  args = p.parse_args(argv)
  cfg = PretrainConfig(**vars(args))
  command = "python scripts/pretrain_base.py " + " ".join(
      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
  s = pretrain(cfg, command=command)
  print(f"steps {s['steps_done']}, tokens seen {s['tokens_seen']:,}, "
        f"{s['seconds_per_step']:.2f} s/step; final train loss {s['final_train_loss']:.4f}, "
        f"val loss {s['final_val_loss']:.4f} (exported: {s['exported_val_loss']:.4f}); "
        f"{s['size_bytes'] / 1e6:.1f} MB in {cfg.export_dir or os.path.join(cfg.workdir, 'export')}")
  print("greedy sample:\n" + s["sample_prompt"] + s["greedy_sample"])


if __name__ == "__main__":
  main()
