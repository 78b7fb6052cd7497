"""The training driver: `train_and_evaluate(config, workdir)`, what train.py and notebooks call.

One run: check the config against the base model, build mesh, data, state and the jitted
steps, resume from the latest readable checkpoint in the workdir if there is one, then loop
(host_loop.py: step N is dispatched before step N-1's metrics are pulled). The state is
saved only once every loss up to it, and the params themselves, are known to be finite. A
NaN/inf loss stops the run with `TrainingDivergedError`; the last good checkpoint stays the
latest one. A run whose last checkpoint reached num_steps and whose heads were exported
says so and returns its recorded final metrics without compiling anything.

With data.feature_cache set, the training batches come from that cache (feature_cache.py:
same rows, order and iterator state, plus the base's hidden states, so the train step skips
the base forward); the held-out evaluation always runs the base online.

Before step s (0-based) the data iterator has yielded exactly s batches and the step draws
its dropout rng as fold_in(rng, s), so a resumed run replays the same steps as an
uninterrupted one.

Everything a user can fix raises a `errors.TrainingError` (or a checkpoint / heads error)
whose message names the fix; train.py prints it and exits 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hydra_jax.checkpoint.heads_io import (base_weights_fingerprint, load_heads, read_heads_meta,
                                           save_heads, weights_difference)
from hydra_jax.checkpoint.hf import CheckpointError, HFModel
from hydra_jax.model.heads import HeadsConfig
from hydra_jax.parallel.sharding import (LOGICAL_RULES, base_param_shardings, make_global_batch,
                                         shard_base_params)
from hydra_jax.training import checkpointing, evaluation, feature_cache, metrics_log
from hydra_jax.training.data import BatchIterator, build_datasets, draft_vocabulary
from hydra_jax.training.errors import (CheckpointWriteError, ConfigError, TrainingDivergedError,
                                       is_out_of_space, short_reason)
from hydra_jax.training.host_loop import HostLoop, to_host
from hydra_jax.training.optimizer import make_optimizer
from hydra_jax.training.run_setup import (check_config, heads_config_from, load_base,
                                          make_run_mesh, maybe_initialize_distributed,
                                          prepare_workdir)
from hydra_jax.training.step import build_eval_step, build_train_step, create_train_state

__all__ = ["train_and_evaluate", "check_config", "heads_config_from", "prepare_workdir",
           "maybe_initialize_distributed", "ConfigError", "TrainingDivergedError"]


# --- set-up -----------------------------------------------------------------------------------


def _eval_tree(config, heads_cfg: HeadsConfig):
  if not config.eval_tree:
    return None
  try:
    return evaluation.tree_for_heads(config.eval_tree, heads_cfg.num_heads)
  except (ValueError, OSError) as e:  # TreeError is a ValueError
    raise ConfigError(f"config.eval_tree={config.eval_tree!r}: {e} (or '' for none)") from e


def _notice(msg: str) -> None:
  """A line on stderr for the user (process 0 only), outside any progress bar."""
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Run:
  """Everything one run builds before its first step."""
  config: Any
  workdir: str
  base: HFModel
  heads_cfg: HeadsConfig
  tree: Any  # CompiledTree for the predicted accept length, or None
  ckpt: checkpointing.TrainCheckpointer
  meta: Dict[str, Any]  # what the heads are for: stored in every checkpoint
  mesh: Optional[Mesh] = None
  train_it: Optional[BatchIterator] = None
  eval_it: Optional[BatchIterator] = None
  data_stats: Optional[Dict[str, Any]] = None
  total_steps: int = 0
  export_dir: str = ""

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def _check_resume_compatible(run: _Run, extra: Dict[str, Any]) -> None:
  """Refuses a checkpoint of other heads or another base (shapes, config or weights)."""
  weights = run.meta["base_weights"]
  checkpointing.check_compatible(
      extra.get("meta", {}), run.heads_cfg.to_dict(), run.meta["base_fingerprint"],
      run.ckpt.directory,
      base_weights_ok=lambda recorded: weights_difference(recorded, weights) in (0.0, None))


def _check_latest_checkpoint_early(run: _Run) -> None:
  """The cheap JSON check of the latest checkpoint, before data and compiles."""
  latest = run.ckpt.latest_step()
  if latest is None:
    return
  try:
    extra = run.ckpt.restore_extra(latest)
  except Exception:  # noqa: BLE001 - unreadable: restore_latest_good falls back later
    return
  _check_resume_compatible(run, extra)


def _build_data(run: _Run) -> None:
  c = run.config
  run.train_it, run.eval_it, run.data_stats = build_datasets(
      c.data, run.base.tokenizer, int(c.seq_len), int(c.global_batch_size), int(c.seed),
      max_len=run.base.config.max_position_embeddings)
  run.total_steps = int(c.num_steps) or int(c.num_epochs) * run.train_it.steps_per_epoch
  size = int(c.heads.draft_vocab_size)
  if size:  # the heads' vocabulary comes from the data, so the config gets it only now
    ids = draft_vocabulary(run.train_it, run.base.config.vocab_size, size)
    run.heads_cfg = run.heads_cfg.replace(draft_vocab=ids)
    run.meta["heads_config"] = run.heads_cfg.to_dict()
  if c.data.feature_cache:  # same rows, order and state; the batches carry the base's features
    run.train_it = feature_cache.open_feature_cache(c.data.feature_cache, c, run.base,
                                                    run.train_it)


def _init_or_restore(run: _Run, opt, base_params):
  """(state, state_shardings, start step or None, train rng) for this run."""
  c = run.config
  init_params = None
  if run.ckpt.latest_step() is None and c.heads.init_from:
    init_params = _load_init_heads(c.heads.init_from, run.base, run.heads_cfg)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(int(c.seed)))
  state, state_shardings = create_train_state(run.base.config, run.heads_cfg, base_params, opt,
                                              run.mesh, LOGICAL_RULES, init_rng)
  restored = run.ckpt.restore_latest_good(
      checkpointing.abstract_tree(state, state_shardings),
      check_extra=lambda extra: _check_resume_compatible(run, extra), warn=_notice)
  if restored is not None:
    start, state, extra = restored
    run.train_it.set_state(extra["data"])
    train_rng = jnp.asarray(np.asarray(extra["rng"], np.uint32))
    if int(state.step) != start:
      raise CheckpointError(f"checkpoint {start} in {run.ckpt.directory} holds state.step="
                            f"{int(state.step)}; the checkpoint directory is inconsistent: "
                            f"delete it or use a fresh --workdir")
    return state, state_shardings, start, train_rng
  if init_params is not None:
    params = jax.device_put(init_params, state_shardings.params)
    state = state.replace(params=params, opt_state=jax.jit(
        opt.init, out_shardings=state_shardings.opt_state)(params))
  return state, state_shardings, None, train_rng


def _load_init_heads(path, base: HFModel, heads_cfg):
  """Params of saved heads (ours or released) to start from instead of the random init."""
  # Raises HeadsMismatchError for heads of another base (config or weights).
  saved_cfg, params = load_heads(path, base.config, base_params=base.params)
  ignore = ("dropout", "base_fingerprint")
  as_json = lambda cfg: json.loads(json.dumps(cfg.to_dict()))  # noqa: E731 - tuples vs lists
  saved = {k: v for k, v in as_json(saved_cfg).items() if k not in ignore}
  want = {k: v for k, v in as_json(heads_cfg).items() if k not in ignore}
  if saved != want:
    diffs = [f"{k}: {saved[k]!r} there vs {want.get(k)!r} in the config" for k in saved
             if saved[k] != want.get(k)]
    raise ConfigError(f"heads.init_from={path!r} holds other heads ({'; '.join(diffs)}); set "
                      f"config.heads to match them")
  return params


# --- the run --------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains the heads the config describes; returns the final train and eval metrics."""
  maybe_initialize_distributed(config.distributed)
  # Everything that can be wrong with the inputs is checked before anything is compiled.
  workdir = prepare_workdir(workdir)
  base = load_base(config)
  check_config(config, base.config)
  heads_cfg = heads_config_from(config, base.config)
  tree = _eval_tree(config, heads_cfg)
  meta = {"heads_config": heads_cfg.to_dict(), "base_fingerprint": base.config.fingerprint(),
          "base_weights": base_weights_fingerprint(base.params),
          "model_path": os.path.abspath(config.model_path)}
  ckpt = checkpointing.TrainCheckpointer(workdir, int(config.keep_checkpoints),
                                         async_save=bool(config.async_checkpoints))
  run = _Run(config=config, workdir=workdir, base=base, heads_cfg=heads_cfg, tree=tree,
             ckpt=ckpt, meta=meta,
             export_dir=os.path.abspath(config.export_dir or os.path.join(workdir, "heads")))
  try:
    run.mesh = make_run_mesh(config)
    _build_data(run)  # before the resume check: a draft vocabulary comes from the data
    _check_latest_checkpoint_early(run)
    final = _already_complete(run)
    if final is None:
      final = _train(run)
  except BaseException:
    ckpt.close(quiet=True)  # the error on its way is the one to report
    raise
  ckpt.close()  # finishes a pending save (always of a checked state); never saves anything new
  return final


def _already_complete(run: _Run) -> Optional[Dict[str, Any]]:
  """The recorded final metrics when the last checkpoint is final and its heads exported."""
  latest = run.ckpt.latest_step()
  if latest is None or latest < run.total_steps:
    return None
  try:
    exported = read_heads_meta(run.export_dir).get("extra", {}).get("trained_steps")
    finals = [r for r in metrics_log.read_metrics(run.workdir, "final") if r["step"] == latest]
  except (OSError, ValueError, CheckpointError):
    return None  # heads or metrics missing: evaluate and export again
  if exported != latest or not finals:
    return None
  _notice(f"training is already complete: checkpoint {latest} of {run.total_steps} steps in "
          f"{run.ckpt.directory}, heads in {run.export_dir}. Raise --config.num_steps to "
          f"train on, or pass a fresh --workdir.")
  final = {k: v for k, v in finals[-1].items() if k not in ("split", "time")}
  final.update(resumed_from=latest, already_complete=True)
  return final


def _train(run: _Run) -> Dict[str, Any]:
  c = run.config
  opt = make_optimizer(c.optimizer, run.total_steps)
  base_params = shard_base_params(run.base.params, run.mesh, LOGICAL_RULES,
                                  model_cfg=run.base.config)
  base_shardings = base_param_shardings(run.base.config, run.mesh, LOGICAL_RULES)
  state, state_shardings, start, train_rng = _init_or_restore(run, opt, base_params)
  train_step = build_train_step(run.base.config, run.heads_cfg, c.train, opt, run.mesh,
                                state_shardings, base_shardings)
  eval_step = build_eval_step(run.base.config, run.heads_cfg, c.train, run.mesh,
                              state_shardings, base_shardings)
  logger = metrics_log.MetricsLogger(run.workdir, enabled=run.is_main, resume_step=start)
  progress = metrics_log.Progress(run.total_steps, int(start or 0),
                                  enabled=run.is_main and c.progress_bar)
  try:
    _announce(run, start, logger, progress)
    evaluate = lambda at_step, params: _evaluate(run, eval_step, params, base_params, at_step,
                                                 logger, progress)  # noqa: E731
    loop = HostLoop(c.log_every, logger, progress, run.ckpt.directory,
                    int(c.global_batch_size) * int(c.seq_len), start)
    state, step, final_eval = _train_loop(run, state, base_params, train_step, train_rng, loop,
                                          evaluate, int(start or 0))
    if not final_eval:  # e.g. resumed from a finished run's last checkpoint
      final_eval = evaluate(step, state.params)
    run.ckpt.wait()
    _export_heads(run, state, step, final_eval)
    final = {"step": step, "total_steps": run.total_steps, "resumed_from": start,
             "heads_dir": run.export_dir, "workdir": run.workdir,
             "checkpoint_dir": run.ckpt.directory}
    final.update({f"train/{k}": v for k, v in loop.last_metrics.items()})
    final.update({f"eval/{k}": v for k, v in final_eval.items()})
    if loop.tokens_per_s is not None:
      final["tokens_per_s"] = loop.tokens_per_s
    logger.write(step, "final", {k: v for k, v in final.items() if k != "step"})
    return final
  finally:
    progress.close()
    logger.close()


def _announce(run: _Run, start: Optional[int], logger, progress) -> None:
  c, h, stats = run.config, run.heads_cfg, run.data_stats
  progress.write(
      f"{h.arch} heads ({h.num_heads} x {h.num_layers} layers) on {c.model_path}: "
      f"{run.total_steps} steps of {c.global_batch_size} x {c.seq_len} tokens "
      f"({run.train_it.steps_per_epoch} steps per epoch, {stats.get('train_examples')} train / "
      f"{stats.get('eval_examples')} held-out rows), mesh {dict(run.mesh.shape)}, "
      f"{jax.process_count()} process(es)"
      + (f"; base features from {c.data.feature_cache}" if c.data.feature_cache else ""))
  if start is None:
    logger.write(0, "data", {k: v for k, v in stats.items() if isinstance(v, (int, float, str))})
  else:
    progress.write(f"resumed from checkpoint {start} in {run.ckpt.directory} "
                   f"({max(0, run.total_steps - start)} of {run.total_steps} steps to go)")


def _train_loop(run: _Run, state, base_params, train_step, train_rng, loop: HostLoop, evaluate,
                step: int):
  """Steps until total_steps with checkpoints and evaluations; -> (state, step, last eval)."""
  c = run.config
  final_eval: Dict[str, Any] = {}
  pending = None
  while step < run.total_steps:
    batch = make_global_batch(next(run.train_it), run.mesh)
    # The step folds state.step into the rng itself: dropout masks repeat on resume.
    state, metrics = train_step(state, base_params, batch, train_rng)
    step += 1
    if pending is not None:
      loop.consume(*pending)  # step N is queued; now wait for step N-1's numbers
    pending = (step, metrics)
    if c.step_delay_s:
      time.sleep(float(c.step_delay_s))
    save_now = step % int(c.checkpoint_every) == 0 or step == run.total_steps
    eval_now = step == run.total_steps or (c.eval_every and step % int(c.eval_every) == 0)
    if save_now or eval_now:
      loop.consume(*pending)
      pending = None
    if save_now:
      loop.check_params(step, state)
      run.ckpt.save(step, state, {"data": run.train_it.get_state(), "meta": run.meta,
                                  "rng": np.asarray(train_rng).tolist()})
      loop.last_good = step
    if eval_now:
      final_eval = evaluate(step, state.params)
  if pending is not None:
    loop.consume(*pending)
  return state, step, final_eval


def _evaluate(run: _Run, eval_step, params, base_params, at_step: int, logger,
              progress) -> Dict[str, Any]:
  sums, n = evaluation.accumulate(eval_step, params, base_params,
                                  run.eval_it.eval_batches(int(run.config.eval_batches) or None),
                                  lambda b: make_global_batch(b, run.mesh))
  if not n:
    return {}
  out = evaluation.summarize(sums, run.tree)
  out["eval_batches"] = n
  logger.write(at_step, "eval", out)
  progress.write(f"eval @ {at_step}: " + ", ".join(
      f"{k}={v:.4g}" for k, v in out.items()
      if k.startswith(("base_top1", "accept_length")) and isinstance(v, float)))
  return out


def _export_heads(run: _Run, state, step: int, final_eval: Dict[str, Any]) -> None:
  """WORKDIR/heads (save_heads format), with the base's config and weights fingerprints."""
  params_host = to_host(state.params)
  if not run.is_main:
    return
  try:
    save_heads(run.export_dir, params_host, run.heads_cfg, base_cfg=run.base.config,
               base_weights=run.meta["base_weights"],
               extra_meta={"trained_steps": step, "model_path": run.meta["model_path"],
                           "eval": {k: v for k, v in final_eval.items()
                                    if isinstance(v, (int, float, str))}})
  except Exception as e:  # noqa: BLE001 - orbax / TensorStore report a full disk in many types
    if not (isinstance(e, OSError) or is_out_of_space(e)):
      raise
    reason = (f"no space left in {run.export_dir}" if is_out_of_space(e)
              else f"{short_reason(e)} in {run.export_dir}")
    # save_heads writes heads_config.json last: without it the directory never loads.
    raise CheckpointWriteError(
        f"writing the heads failed: {reason}; the training checkpoint of step {step} in "
        f"{run.ckpt.directory} is complete. Free some space (or fix that), then rerun the "
        f"same command to export them.") from e
