"""Training checkpoints: orbax CheckpointManager over (train state, JSON extras).

A checkpoint is the directory WORKDIR/checkpoints/<step>/ holding
  state/  the TrainState pytree (head params, optimizer state, step), sharded arrays
  extra/  JSON: data-iterator state, the rng key, and what the heads were made for
          (heads config, base fingerprint), checked before restoring into a new run.
orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp-*` and renames it when every
file is down, so a kill during a save leaves a tmp dir that is never listed as a step (and
is removed at the next start): the previous checkpoint stays the latest usable one.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint was written for other heads or another base model."""


def abstract_tree(tree: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs (with the target shardings) that tell orbax how to lay out a restore."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class TrainCheckpointer:
  """Save/restore (state, extra) every N steps; keeps the last `keep`."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(keep)),
        create=True,
        enable_async_checkpointing=async_save,
        # Leftovers of a save that was killed are deleted at start; they are never a step.
        cleanup_tmp_directories=True,
    )
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "extra"))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, extra: Dict[str, Any]) -> None:
    """Starts (async) or does a save of `state` and the JSON-able `extra` at `step`."""
    self._mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)

  def restore_extra(self, step: int) -> Dict[str, Any]:
    """Only the JSON part (cheap): used to check compatibility before building the state."""
    out = self._mngr.restore(int(step), args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    return dict(out["extra"])

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
    """Restores the state into the structure, dtypes and shardings of `abstract_state`."""
    out = self._mngr.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
    return out["state"], dict(out["extra"])

  def wait(self) -> None:
    """Blocks until a background save is committed (renamed into place)."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


# Heads-config fields that do not change the parameter tree (may differ on resume).
_NOT_SHAPE = ("dropout", "base_fingerprint")


def check_compatible(extra: Dict[str, Any], heads_cfg_dict: Dict[str, Any], base_fingerprint: str,
                     directory: str) -> None:
  """Refuses to resume heads of another shape or for another base model."""
  saved_fp = extra.get("base_fingerprint")
  if saved_fp and saved_fp != base_fingerprint:
    raise CheckpointMismatchError(
        f"the checkpoint in {directory} was trained on a different base model (fingerprint "
        f"{saved_fp}, this model has {base_fingerprint}); use the original --config.model_path "
        f"or a fresh --workdir")
  saved = extra.get("heads_config") or {}
  diffs = [f"{k}: checkpoint {saved[k]!r} vs config {heads_cfg_dict.get(k)!r}"
           for k in sorted(saved)
           if k in heads_cfg_dict and k not in _NOT_SHAPE and saved[k] != heads_cfg_dict[k]]
  if diffs:
    raise CheckpointMismatchError(
        f"the checkpoint in {directory} holds heads of another shape ({'; '.join(diffs)}); "
        f"set the config back to what it was trained with, or use a fresh --workdir")
