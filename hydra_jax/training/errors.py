"""The training errors a user can act on: train.py prints their message (one line) and exits 2.

Each message names what is wrong and the fix. Anything else that escapes the trainer is a
bug and keeps its traceback.
"""

from __future__ import annotations

import errno
from typing import Optional


class TrainingError(Exception):
  """Base of the errors whose message tells the user what to change."""


class ConfigError(TrainingError, ValueError):
  """A config that cannot run; the message names the field and the fix."""


class DataError(TrainingError, ValueError):
  """The training data cannot be read or cut into batches."""


class DataFileNotFoundError(DataError, FileNotFoundError):
  """data.path matches no file."""


class MissingDependencyError(DataError, ImportError):
  """An optional package the data source needs is not installed."""


class TrainingDivergedError(TrainingError, FloatingPointError):
  """The loss (or the params) became NaN/inf; nothing after the last good checkpoint is saved."""


class CheckpointMismatchError(TrainingError, ValueError):
  """The workdir's checkpoint was written for other heads or another base model."""


class CheckpointWriteError(TrainingError, OSError):
  """A checkpoint (or the exported heads) could not be written; earlier checkpoints are intact."""


class CheckpointCorruptError(TrainingError, ValueError):
  """No checkpoint in the workdir can be read back."""


_NO_SPACE_TEXT = ("no space left on device", "enospc", "disk quota exceeded")


def os_error_in(exc: BaseException) -> Optional[OSError]:
  """The first OSError in `exc`'s cause / context chain (orbax re-raises from threads)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
      return exc
    exc = exc.__cause__ or exc.__context__
  return None


def is_out_of_space(exc: BaseException) -> bool:
  """ENOSPC / EDQUOT, raised by Python (OSError) or reported in a TensorStore message."""
  os_err = os_error_in(exc)
  if os_err is not None and os_err.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if any(t in str(exc).lower() for t in _NO_SPACE_TEXT):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def short_reason(exc: BaseException, limit: int = 200) -> str:
  """One line about `exc`: the OSError's strerror when there is one, else its first line."""
  os_err = os_error_in(exc)
  if os_err is not None and os_err.strerror:
    return os_err.strerror
  text = str(exc).strip().splitlines()
  first = text[0] if text else ""
  return f"{type(exc).__name__}: {first[:limit]}" if first else type(exc).__name__
