"""Trains draft heads on a frozen base model: flags -> config -> train_and_evaluate.

  python train.py --config configs/tiny_cpu.py --workdir /tmp/hydra_tiny_run
  python train.py --config configs/hydra_pp_vicuna_7b.py --workdir runs/h7b \
      --config.model_path=/models/vicuna-7b-v1.3 --config.optimizer.lr=1e-3

Rerunning with the same --workdir resumes from its latest checkpoint. On a multi-host slice,
run the same command on every host (jax.distributed is initialised when launched as
several processes; see config.distributed). The final heads land in WORKDIR/heads.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py); override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and heads.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 shows it
  from hydra_jax.training.trainer import train_and_evaluate  # after flags: keeps --help fast
  final = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(final, indent=1, sort_keys=True, default=str), file=sys.stdout)


if __name__ == "__main__":
  app.run(main)
