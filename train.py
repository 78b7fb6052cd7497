r"""Trains draft heads on a frozen base model: flags -> config -> train_and_evaluate.

  python train.py --config configs/tiny_cpu.py --workdir /tmp/hydra_tiny_run
  python train.py --config configs/hydra_pp_vicuna_7b.py --workdir runs/h7b \
      --config.model_path=/models/vicuna-7b-v1.3 --config.optimizer.lr=1e-3

Rerunning with the same --workdir resumes from its latest checkpoint. On a multi-host slice,
run the same command on every host (jax.distributed is initialised when launched as
several processes; see config.distributed). The final heads land in WORKDIR/heads.

Bad input (a missing config file, an unknown field, an unusable workdir or data file, a
full disk, ...) exits with code 2 and one line on stderr that names the fix.
"""

import json
import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/NAME.py); override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and heads.")

USAGE_EXIT = 2
_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


class _UsageError(Exception):
  """A command line that cannot run; the message names the fix."""


def _fail(message: str) -> None:
  print(f"train.py: error: {message}", file=sys.stderr, flush=True)
  _exit(USAGE_EXIT)


def _exit(code: int) -> None:
  # os._exit, not sys.exit: orbax / TensorStore reads still in flight after a failed restore
  # would print "Event loop is closed" tracebacks while the interpreter shuts down.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _flag_value(argv, name: str):
  """The value of --name=V / --name V in argv (None if absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv):
  """[(dotted field, the argument)] of every --config.FIELD[=VALUE] in argv."""
  out = []
  for arg in argv:
    if arg.startswith("--config."):
      out.append((arg[len("--config."):].split("=", 1)[0], arg))
  return out


def _check_config_file(argv) -> None:
  path = _flag_value(argv, "config")
  if path is None:
    raise _UsageError("pass --config configs/NAME.py (e.g. configs/tiny_cpu.py; the recipes "
                      "are in configs/)")
  file_part = path.split(":", 1)[0]  # config_flags accepts PATH:ARGS
  if not os.path.isfile(file_part):
    raise _UsageError(f"config file {file_part} does not exist; pass --config "
                      f"configs/NAME.py (the recipes are in configs/)")


def _unknown_field_message(argv) -> str:
  """Which --config.FIELD names no field, with the close names (difflib)."""
  from hydra_jax.training.config_base import field_paths, suggestion
  plain = [a for a in argv if not a.startswith("--config.")]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=plain)
  fv(plain, known_only=True)
  known = field_paths(fv["config"].value)
  for name, arg in _overrides(argv):
    if name not in known:
      return (f"unknown config field {name!r} ({arg.split('=', 1)[0]}){suggestion(name, known)}"
              f"; every field is listed in hydra_jax/training/config_base.py")
  return "an override names no config field; see hydra_jax/training/config_base.py"


def parse_flags(argv):
  """absl's flag parsing, with one-line errors (exit 2) instead of tracebacks."""
  asks_for_help = any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:])
  try:
    if not asks_for_help:
      _check_config_file(argv)
    rest = flags.FLAGS(argv)
    config = _CONFIG.value
    if not isinstance(config, config_dict.ConfigDict):  # config_flags defers load errors
      config.keys()
  except _UsageError as e:
    _fail(str(e))
  except flags.Error as e:
    _fail(f"{e}; see python train.py --helpshort")
  except (AttributeError, KeyError) as e:  # config_dict's error for an unknown override
    try:
      _fail(_unknown_field_message(argv))
    except Exception:  # noqa: BLE001 - the config itself is broken: report the first error
      _fail(f"bad --config.* override: {e}")
  except Exception as e:  # noqa: BLE001 - the config file raised while loading
    _fail(f"cannot load config {_flag_value(argv, 'config')}: {type(e).__name__}: {e}")
  if _WORKDIR.value is None:
    _fail("pass --workdir DIR (checkpoints, metrics and the trained heads go there)")
  if len(rest) > 1:
    _fail(f"unexpected arguments: {' '.join(rest[1:])} (fields are set with --config.FIELD=V)")
  return rest


class _DropOrbaxLogs(py_logging.Filter):
  """orbax logs every save and, on a failed one, several tracebacks from its threads; the
  trainer reports the failure itself in one line."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv):
  del argv  # parsed by parse_flags
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 shows it
    logging.get_absl_handler().addFilter(_DropOrbaxLogs())
  # After the flags: keeps --help and usage errors fast.
  from hydra_jax.checkpoint.hf import CheckpointError
  from hydra_jax.registry.embedded import EmbeddedAssetError
  from hydra_jax.model.config import UnsupportedModelError
  from hydra_jax.model.heads import HeadsMismatchError
  from hydra_jax.training.errors import TrainingError
  from hydra_jax.training.trainer import train_and_evaluate
  try:
    final = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (TrainingError, CheckpointError, HeadsMismatchError, UnsupportedModelError,
          EmbeddedAssetError) as e:
    _fail(str(e))
  print(json.dumps(final, indent=1, sort_keys=True, default=str), file=sys.stdout, flush=True)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
