"""Training checkpoints: orbax CheckpointManager over (train state, JSON extras).

A checkpoint is the directory WORKDIR/checkpoints/<step>/ holding
  state/  the TrainState pytree (head params, optimizer state, step), sharded arrays
  extra/  JSON: data-iterator state, the rng key, and what the heads were made for
          (heads config, base fingerprints), checked before restoring into a new run.
orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp*` and renames it when every
file is down, so a kill during a save leaves a tmp dir that is never listed as a step (and
is removed at the next start): the previous checkpoint stays the latest usable one.

What goes wrong, and what happens then:
- a save fails (disk full, quota, permissions), possibly in orbax's background thread:
  the partial tmp dir is removed and `CheckpointWriteError` says which checkpoint is the
  last good one; the earlier checkpoints are never touched.
- a finalized checkpoint cannot be read back (a truncated array file): `restore_latest_good`
  falls back to the newest readable one with a warning and moves the unreadable ones to
  WORKDIR/corrupt_checkpoints/; when none is readable, `CheckpointCorruptError` names the
  directory to delete.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from hydra_jax.checkpoint.heads_io import silence_aborted_reads

from hydra_jax.training.errors import (CheckpointCorruptError, CheckpointMismatchError,
                                       CheckpointWriteError, is_out_of_space, short_reason)

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt_checkpoints"
_TMP_GLOB = "*.orbax-checkpoint-tmp*"

__all__ = ["TrainCheckpointer", "CheckpointMismatchError", "CheckpointWriteError",
           "CheckpointCorruptError", "abstract_tree", "check_compatible"]


def abstract_tree(tree: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs (with the target shardings) that tell orbax how to lay out a restore."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _read_error(error: BaseException) -> str:
  """The useful line of a failed restore: TensorStore's own status message when there is one,
  not orbax's wrapper (which embeds a whole TensorStore spec)."""
  exc, seen = error, set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    text = str(exc)
    for marker in ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND", "FAILED_PRECONDITION",
                   "INVALID_ARGUMENT", "UNKNOWN"):
      if marker + ":" in text:
        return text[text.index(marker):].splitlines()[0][:240]
    exc = exc.__cause__ or exc.__context__
  return short_reason(error, limit=120)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"hydra_jax:{name}")


class TrainCheckpointer:
  """Save/restore (state, extra) every N steps; keeps the last `keep`."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_SUBDIR)
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(keep)),
        create=True,
        enable_async_checkpointing=async_save,
        # Leftovers of a save that was killed are deleted at start; they are never a step.
        cleanup_tmp_directories=True,
    )
    self._mngr = self._open()
    # A failed save or restore is reported here in one line; orbax's leftover reads and
    # writes would print tracebacks over it, from the moment of the failure on.
    silence_aborted_reads()
    self._in_flight: Optional[int] = None  # step of a background save not yet committed
    self._failed = False
    self._threads_before_save = set()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=("state", "extra"))

  # --- what is there --------------------------------------------------------------------

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self) -> List[int]:
    return sorted(self._mngr.all_steps())

  def finalized_steps(self) -> List[int]:
    """Steps whose directory is on disk (renamed into place, so complete), read afresh."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory)
                  if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

  # --- saving ---------------------------------------------------------------------------

  def save(self, step: int, state: Any, extra: Dict[str, Any]) -> None:
    """Starts (async) or does a save of `state` and the JSON-able `extra` at `step`."""
    self.wait()  # a failure of the previous background save is reported as that step's
    self._threads_before_save = set(threading.enumerate())
    try:
      self._mngr.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)
    except Exception as e:  # noqa: BLE001 - orbax and TensorStore raise many types
      raise self._write_failed(e, int(step)) from e
    self._in_flight = int(step)
    if not self._options.enable_async_checkpointing:
      self.wait()

  def wait(self) -> None:
    """Blocks until a background save is committed (renamed into place)."""
    if self._failed:
      return
    step, self._in_flight = self._in_flight, None
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._write_failed(e, step) from e
    # orbax logs (and swallows) some commit errors and then skips the rename: check.
    if step is not None and step not in self.finalized_steps():
      raise self._write_failed(None, step)

  def _write_failed(self, error: Optional[BaseException], step: Optional[int]):
    """Removes the partial save and returns the CheckpointWriteError to raise."""
    self._failed = True
    try:
      self._mngr.close()
    except Exception:  # noqa: BLE001 - it re-raises the failure we are reporting
      pass
    # orbax's close stops at that failure; its other save threads may still write metadata
    # into the tmp dir. Let them finish first, or they recreate what is removed.
    deadline = time.monotonic() + 30.0
    for thread in set(threading.enumerate()) - self._threads_before_save:
      if thread is not threading.current_thread():
        thread.join(max(0.0, deadline - time.monotonic()))
    removed = self._remove_partial_saves()
    good = self.finalized_steps()
    last = (f"the last good checkpoint is step {good[-1]} in {self.directory}" if good
            else "no checkpoint was written yet")
    what = f"checkpoint {step}" if step is not None else "a checkpoint"
    if error is not None and is_out_of_space(error):
      reason, fix = f"no space left in {self.workdir}", "Free some space"
    elif error is not None:
      reason, fix = f"{short_reason(error)} in {self.directory}", "Fix that"
    else:
      reason = (f"orbax did not finalize {what} in {self.directory} (rerun with --verbosity=0 "
                f"for its log)")
      fix = "Check the disk"
    cleaned = f"; removed the partial {what}" if removed else ""
    resume = "to resume from it" if good else "to start over"
    return CheckpointWriteError(f"checkpoint write failed: {reason}; {last}{cleaned}. {fix}, "
                                f"then rerun the same command {resume}.")

  def _remove_partial_saves(self) -> bool:
    if jax.process_index() != 0:
      return False
    partial = glob.glob(os.path.join(self.directory, _TMP_GLOB))
    for path in partial:
      shutil.rmtree(path, ignore_errors=True)
    return bool(partial)

  # --- restoring ------------------------------------------------------------------------

  def restore_extra(self, step: int) -> Dict[str, Any]:
    """Only the JSON part (cheap): used to check compatibility before building the state."""
    out = self._mngr.restore(int(step), args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    return dict(out["extra"])

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
    """Restores the state into the structure, dtypes and shardings of `abstract_state`."""
    out = self._mngr.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
    return out["state"], dict(out["extra"])

  def restore_latest_good(self, abstract_state: Any, check_extra: Callable[[Dict], None],
                          warn: Callable[[str], None]
                          ) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
    """(step, state, extra) of the newest checkpoint that reads back; None when there is none.

    `check_extra` sees each candidate's JSON first and raises for a checkpoint of other
    heads or another base (that is not corruption: it propagates). Unreadable newer
    checkpoints are moved to WORKDIR/corrupt_checkpoints/ once a good one is found.
    """
    unreadable: List[Tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      try:
        extra = self.restore_extra(step)
      except Exception as e:  # noqa: BLE001 - a damaged JSON or metadata file
        unreadable.append((step, _read_error(e)))
        continue
      check_extra(extra)
      try:
        state, extra = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - TensorStore errors for damaged array files
        unreadable.append((step, _read_error(e)))
        continue
      if unreadable:
        moved = self._set_aside([s for s, _ in unreadable])
        warn(f"warning: checkpoint {', '.join(str(s) for s, _ in unreadable)} in {self.directory} "
             f"cannot be read ({unreadable[0][1]}); moved to {moved}, resuming from "
             f"checkpoint {step}")
      return step, state, extra
    if unreadable:
      raise CheckpointCorruptError(
          f"no checkpoint in {self.directory} can be read (step {unreadable[0][0]}: "
          f"{unreadable[0][1]}); delete {self.directory} to start over (or restore it from a "
          f"backup)")
    return None

  def _set_aside(self, steps: List[int]) -> str:
    """Moves unreadable step dirs out of orbax's sight, so the resumed run can save them anew."""
    target = os.path.join(self.workdir, CORRUPT_SUBDIR)
    self._mngr.close()
    if jax.process_index() == 0:
      os.makedirs(target, exist_ok=True)
      for step in steps:
        dest, n = os.path.join(target, str(step)), 1
        while os.path.exists(dest):
          dest, n = os.path.join(target, f"{step}.{n}"), n + 1
        shutil.move(os.path.join(self.directory, str(step)), dest)
    _sync("set_aside_checkpoints")
    self._mngr = self._open()
    return target

  def close(self, quiet: bool = False) -> None:
    """Finishes a pending save; `quiet` (an error is already on its way) never raises."""
    if self._failed:
      return
    try:
      self.wait()
      self._mngr.close()
    except Exception:  # noqa: BLE001
      if not quiet:
        raise


# Heads-config fields that do not change the parameter tree (may differ on resume).
_NOT_SHAPE = ("dropout", "base_fingerprint")


def check_compatible(extra: Dict[str, Any], heads_cfg_dict: Dict[str, Any], base_fingerprint: str,
                     directory: str, base_weights_ok: Optional[Callable[[Dict], bool]] = None
                     ) -> None:
  """Refuses to resume heads of another shape or for another base model.

  `base_weights_ok(recorded)` says whether the base-weights record of the checkpoint (see
  heads_io.base_weights_fingerprint) matches the base of this run.
  """
  saved_fp = extra.get("base_fingerprint")
  if saved_fp and saved_fp != base_fingerprint:
    raise CheckpointMismatchError(
        f"the checkpoint in {directory} was trained on a different base model (fingerprint "
        f"{saved_fp}, this model has {base_fingerprint}); use the original --config.model_path "
        f"or a fresh --workdir")
  recorded = extra.get("base_weights")
  if recorded and base_weights_ok is not None and not base_weights_ok(recorded):
    raise CheckpointMismatchError(
        f"the checkpoint in {directory} was trained on a different base model (same "
        f"architecture, other weights: its embedding and LM head differ); use the original "
        f"--config.model_path or a fresh --workdir")
  saved = extra.get("heads_config") or {}
  want = json.loads(json.dumps(heads_cfg_dict))  # as the checkpoint stored it: tuples are lists
  diffs = [f"{k}: checkpoint {saved[k]!r} vs config {want.get(k)!r}"
           for k in sorted(saved)
           if k in want and k not in _NOT_SHAPE and saved[k] != want[k]]
  if diffs:
    raise CheckpointMismatchError(
        f"the checkpoint in {directory} holds heads of another shape ({'; '.join(diffs)}); "
        f"set the config back to what it was trained with, or use a fresh --workdir")
