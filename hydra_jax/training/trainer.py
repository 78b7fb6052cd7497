"""The training driver: `train_and_evaluate(config, workdir)`, what train.py and notebooks call.

One run: check the config against the base model, build mesh, data, state and the jitted
steps, resume from the latest checkpoint in the workdir if there is one, then loop. The loop
dispatches step N before pulling step N-1's metrics to the host, so the host never waits on
the device except when it has to: before a checkpoint (the state is saved only once every
loss up to it, and the params themselves, are known to be finite), before an evaluation,
and at the end. A NaN/inf loss stops the run with `TrainingDivergedError`; the last good
checkpoint stays the latest one.

Before step s (0-based) the data iterator has yielded exactly s batches and the step draws
its dropout rng as fold_in(rng, s), so a resumed run replays the same steps as an
uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.checkpoint.hf import CheckpointError, load_hf_model
from hydra_jax.checkpoint.heads_io import load_heads, save_heads
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import HeadsConfig
from hydra_jax.training import checkpointing, evaluation, metrics_log
from hydra_jax.training.data import build_datasets
from hydra_jax.training.optimizer import make_optimizer
from hydra_jax.training.sharding import (LOGICAL_RULES, base_param_shardings, make_global_batch,
                                         make_mesh, shard_base_params)
from hydra_jax.training.step import build_eval_step, build_train_step, create_train_state

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
  """A config that cannot run; the message names the field and the fix."""


class TrainingDivergedError(FloatingPointError):
  """The loss (or the params) became NaN/inf; nothing after the last good checkpoint is saved."""


# --- checks ---------------------------------------------------------------------------------


def heads_config_from(config, base_cfg: ModelConfig) -> HeadsConfig:
  """The HeadsConfig the config asks for, sized for `base_cfg`."""
  h = config.heads
  try:
    return HeadsConfig.for_base(base_cfg, h.arch, num_heads=int(h.num_heads),
                                num_layers=int(h.num_layers), shared_inner=bool(h.shared_inner),
                                dropout=float(h.dropout))
  except ValueError as e:
    raise ConfigError(f"config.heads: {e}") from e


def check_config(config, base_cfg: ModelConfig) -> None:
  """Everything about the config that can be checked against the base without running."""
  max_pos = base_cfg.max_position_embeddings
  if config.seq_len > max_pos:
    raise ConfigError(
        f"seq_len={config.seq_len} is beyond the model's max_position_embeddings={max_pos}; "
        f"set --config.seq_len={max_pos} or less")
  k = int(config.heads.num_heads)
  if config.seq_len < k + 2:
    raise ConfigError(
        f"seq_len={config.seq_len} leaves no target for the last of {k} heads (head k "
        f"predicts token t+k+2); use seq_len >= {k + 2} or fewer heads")
  heads_config_from(config, base_cfg)
  dtype = config.train.base_dtype
  if dtype not in _DTYPES:
    raise ConfigError(f"train.base_dtype={dtype!r}; use one of {', '.join(_DTYPES)}")
  if len(tuple(config.mesh_shape)) != 3:
    raise ConfigError(f"mesh_shape={tuple(config.mesh_shape)} needs 3 entries (data, fsdp, tensor)")
  if config.global_batch_size <= 0 or config.global_batch_size % jax.process_count():
    raise ConfigError(f"global_batch_size={config.global_batch_size} must be a positive "
                      f"multiple of the {jax.process_count()} processes")
  if config.num_steps < 0 or (config.num_steps == 0 and config.num_epochs <= 0):
    raise ConfigError("set num_steps > 0, or num_steps = 0 and num_epochs > 0")
  for name in ("checkpoint_every", "log_every", "keep_checkpoints"):
    if config[name] <= 0:
      raise ConfigError(f"{name}={config[name]} must be positive")
  if config.eval_every < 0 or config.eval_batches < 0:
    raise ConfigError("eval_every and eval_batches must be >= 0")


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir and proves it is writable, before any expensive work."""
  if not workdir:
    raise ConfigError("no workdir: pass --workdir DIR (checkpoints, metrics and heads go there)")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir} is a file, not a directory; pass another --workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{uuid.uuid4().hex}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable ({e.strerror}); pass a --workdir you "
                      f"can write to") from e
  return workdir


def _launched_as_several_processes(dcfg) -> bool:
  env = os.environ
  if int(dcfg.num_processes) > 1 or dcfg.coordinator_address:
    return True
  if env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1:
    return True
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(env.get(var, "1") or 1) > 1:
      return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


def maybe_initialize_distributed(dcfg) -> None:
  """jax.distributed.initialize() when launched as several processes (or when asked to)."""
  mode = dcfg.initialize
  if mode not in ("auto", "always", "never"):
    raise ConfigError(f"distributed.initialize={mode!r}; use 'auto', 'always' or 'never'")
  if mode == "never" or jax.distributed.is_initialized():
    return
  if mode == "auto" and not _launched_as_several_processes(dcfg):
    return
  kwargs = {}
  if dcfg.coordinator_address:
    kwargs["coordinator_address"] = dcfg.coordinator_address
  if int(dcfg.num_processes) > 0:
    kwargs["num_processes"] = int(dcfg.num_processes)
  if int(dcfg.process_id) >= 0:
    kwargs["process_id"] = int(dcfg.process_id)
  jax.distributed.initialize(**kwargs)


# --- helpers --------------------------------------------------------------------------------


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _to_host(tree):
  """Full numpy copies of (possibly sharded, possibly multi-process) arrays."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def _scalars(metrics: Dict[str, Any]) -> Dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}


def _load_base(config):
  path = config.model_path
  if not path:
    raise ConfigError("config.model_path is empty: set --config.model_path=DIR (a Hugging Face "
                      "model directory)")
  if not os.path.isdir(os.path.expanduser(path)):
    raise CheckpointError(f"config.model_path: model directory {path!r} does not exist; set "
                          f"--config.model_path=DIR to a Hugging Face model directory "
                          f"(config.json + safetensors + tokenizer)")
  try:
    base = load_hf_model(path, param_dtype=_DTYPES[config.train.base_dtype],
                         dtype=_DTYPES[config.train.base_dtype], tokenizer=True)
  except CheckpointError as e:
    raise CheckpointError(f"config.model_path: {e}") from e
  if base.tokenizer is None:
    raise CheckpointError(f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json)"
                          f"; the data pipeline needs the base model's tokenizer")
  return base


# --- the run --------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains the heads the config describes; returns the final train and eval metrics."""
  maybe_initialize_distributed(config.distributed)
  # Everything that can be wrong with the inputs is checked before anything is compiled.
  workdir = prepare_workdir(workdir)
  base = _load_base(config)
  check_config(config, base.config)
  heads_cfg = heads_config_from(config, base.config)
  tree = (evaluation.tree_for_heads(config.eval_tree, heads_cfg.num_heads)
          if config.eval_tree else None)
  ckpt = checkpointing.TrainCheckpointer(workdir, int(config.keep_checkpoints),
                                         async_save=bool(config.async_checkpoints))
  try:
    return _run(config, workdir, base, heads_cfg, tree, ckpt)
  finally:
    ckpt.close()  # finishes a pending save (always of a checked state); never saves anything new


def _run(config, workdir, base, heads_cfg, tree, ckpt) -> Dict[str, Any]:
  is_main = jax.process_index() == 0
  start = ckpt.latest_step()
  meta = {"heads_config": heads_cfg.to_dict(), "base_fingerprint": base.config.fingerprint(),
          "model_path": os.path.abspath(config.model_path)}
  if start is not None:
    checkpointing.check_compatible(ckpt.restore_extra(start).get("meta", {}),
                                   heads_cfg.to_dict(), base.config.fingerprint(),
                                   ckpt.directory)
  init_params = None
  if start is None and config.heads.init_from:
    init_params = _load_init_heads(config.heads.init_from, base.config, heads_cfg)
  mesh = make_mesh(tuple(config.mesh_shape))
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.global_batch_size % batch_ways:
    raise ConfigError(
        f"global_batch_size={config.global_batch_size} does not split over the data x fsdp "
        f"mesh axes ({dict(mesh.shape)}: {batch_ways} ways); use a multiple of {batch_ways} or "
        f"move devices to the tensor axis of mesh_shape")

  train_it, eval_it, data_stats = build_datasets(
      config.data, base.tokenizer, int(config.seq_len), int(config.global_batch_size),
      int(config.seed), max_len=base.config.max_position_embeddings)
  total_steps = int(config.num_steps) or int(config.num_epochs) * train_it.steps_per_epoch
  opt = make_optimizer(config.optimizer, total_steps)

  base_params = shard_base_params(base.params, mesh, LOGICAL_RULES, model_cfg=base.config)
  base_shardings = base_param_shardings(base.config, mesh, LOGICAL_RULES)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
  state, state_shardings = create_train_state(base.config, heads_cfg, base_params, opt, mesh,
                                              LOGICAL_RULES, init_rng)
  if start is not None:
    state, extra = ckpt.restore(start, checkpointing.abstract_tree(state, state_shardings))
    train_it.set_state(extra["data"])
    train_rng = jnp.asarray(np.asarray(extra["rng"], np.uint32))
    if int(state.step) != start:
      raise CheckpointError(f"checkpoint {start} in {ckpt.directory} holds state.step="
                            f"{int(state.step)}; the checkpoint directory is inconsistent")
  elif init_params is not None:
    params = jax.device_put(init_params, state_shardings.params)
    state = state.replace(params=params, opt_state=jax.jit(
        opt.init, out_shardings=state_shardings.opt_state)(params))

  train_step = build_train_step(base.config, heads_cfg, config.train, opt, mesh,
                                state_shardings, base_shardings)
  eval_step = build_eval_step(base.config, heads_cfg, config.train, mesh, state_shardings,
                              base_shardings)

  step = int(start or 0)
  logger = metrics_log.MetricsLogger(workdir, enabled=is_main, resume_step=start)
  progress = metrics_log.Progress(total_steps, step, enabled=is_main and config.progress_bar)
  progress.write(
      f"{heads_cfg.arch} heads ({heads_cfg.num_heads} x {heads_cfg.num_layers} layers) on "
      f"{config.model_path}: {total_steps} steps of {config.global_batch_size} x "
      f"{config.seq_len} tokens ({train_it.steps_per_epoch} steps per epoch, "
      f"{data_stats.get('train_examples')} train / {data_stats.get('eval_examples')} held-out "
      f"rows), mesh {dict(mesh.shape)}, {jax.process_count()} process(es)")
  if start is None:
    logger.write(0, "data", {k: v for k, v in data_stats.items()
                             if isinstance(v, (int, float, str))})
  else:
    progress.write(f"resumed from checkpoint {start} in {ckpt.directory}")
  loop = _Loop(config, logger, progress, ckpt,
               int(config.global_batch_size) * int(config.seq_len), start)
  final_eval: Dict[str, Any] = {}

  def run_eval(at_step):
    sums, n = evaluation.accumulate(eval_step, state.params, base_params,
                                    eval_it.eval_batches(int(config.eval_batches) or None),
                                    lambda b: make_global_batch(b, mesh))
    if not n:
      return {}
    out = evaluation.summarize(sums, tree)
    out["eval_batches"] = n
    logger.write(at_step, "eval", out)
    progress.write(f"eval @ {at_step}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in out.items()
        if k.startswith(("base_top1", "accept_length")) and isinstance(v, float)))
    return out

  try:
    pending = None
    while step < total_steps:
      batch = make_global_batch(next(train_it), mesh)
      # The step folds state.step into the rng itself: dropout masks repeat on resume.
      state, metrics = train_step(state, base_params, batch, train_rng)
      step += 1
      if pending is not None:
        loop.consume(*pending)  # step N is queued; now wait for step N-1's numbers
      pending = (step, metrics)
      if config.step_delay_s:
        time.sleep(float(config.step_delay_s))
      save_now = step % int(config.checkpoint_every) == 0 or step == total_steps
      eval_now = step == total_steps or (config.eval_every and step % int(config.eval_every) == 0)
      if save_now or eval_now:
        loop.consume(*pending)
        pending = None
      if save_now:
        if not bool(_all_finite((state.params, state.opt_state))):
          raise TrainingDivergedError(loop.diverged_message(step, "the params became non-finite"))
        ckpt.save(step, state, {"data": train_it.get_state(), "meta": meta,
                                "rng": np.asarray(train_rng).tolist()})
        loop.last_good = step
      if eval_now:
        final_eval = run_eval(step)
    if pending is not None:
      loop.consume(*pending)
    if not final_eval:  # e.g. resumed from a finished run's last checkpoint
      final_eval = run_eval(step)
    ckpt.wait()

    export_dir = os.path.abspath(config.export_dir or os.path.join(workdir, "heads"))
    params_host = _to_host(state.params)
    if is_main:
      save_heads(export_dir, params_host, heads_cfg, base_cfg=base.config,
                 extra_meta={"trained_steps": step, "model_path": meta["model_path"],
                             "eval": {k: v for k, v in final_eval.items()
                                      if isinstance(v, (int, float, str))}})
    final = {"step": step, "total_steps": total_steps, "resumed_from": start,
             "heads_dir": export_dir, "workdir": workdir, "checkpoint_dir": ckpt.directory}
    final.update({f"train/{k}": v for k, v in loop.last_metrics.items()})
    final.update({f"eval/{k}": v for k, v in final_eval.items()})
    if loop.tokens_per_s is not None:
      final["tokens_per_s"] = loop.tokens_per_s
    logger.write(step, "final", {k: v for k, v in final.items() if k != "step"})
    return final
  finally:
    progress.close()
    logger.close()


def _load_init_heads(path, base_cfg, heads_cfg):
  """Params of saved heads (ours or released) to start from instead of the random init."""
  saved_cfg, params = load_heads(path, base_cfg)  # raises HeadsMismatchError for another base
  ignore = ("dropout", "base_fingerprint")
  saved = {k: v for k, v in saved_cfg.to_dict().items() if k not in ignore}
  want = {k: v for k, v in heads_cfg.to_dict().items() if k not in ignore}
  if saved != want:
    diffs = [f"{k}: {saved[k]!r} there vs {want.get(k)!r} in the config" for k in saved
             if saved[k] != want.get(k)]
    raise ConfigError(f"heads.init_from={path!r} holds other heads ({'; '.join(diffs)}); set "
                      f"config.heads to match them")
  return params


class _Loop:
  """Host side of the loop: metric pulls, NaN checks, logging, progress and throughput."""

  def __init__(self, config, logger, progress, ckpt, tokens_per_step, start):
    self.config, self.logger, self.progress, self.ckpt = config, logger, progress, ckpt
    self.tokens_per_step = tokens_per_step
    self.last_good = start
    self.window = []
    self.last_metrics: Dict[str, float] = {}
    self.tokens_per_s: Optional[float] = None
    self._t_last = time.perf_counter()
    self._t_window = self._t_last
    self._consumed = start or 0

  def diverged_message(self, step, what):
    good = (f"the last good checkpoint is step {self.last_good} in {self.ckpt.directory}"
            if self.last_good else "no checkpoint was written")
    return (f"training diverged at step {step}: {what}; {good} (the bad state was not saved). "
            f"Lower optimizer.lr, raise optimizer.warmup_steps or check the data, then rerun "
            f"to resume from that checkpoint.")

  def consume(self, step: int, metrics) -> None:
    """Pulls one step's metrics (blocks until that step ran), checks, logs."""
    if step <= self._consumed:
      return
    m = _scalars(jax.device_get(metrics))
    bad = {k: v for k, v in m.items() if k in ("loss", "grad_norm") and not math.isfinite(v)}
    if bad:
      raise TrainingDivergedError(self.diverged_message(
          step, ", ".join(f"{k} = {v}" for k, v in bad.items())))
    now = time.perf_counter()
    dt, self._t_last = now - self._t_last, now
    self._consumed = step
    self.last_metrics = m
    self.window.append(m)
    self.progress.update(1, {"loss": f"{m.get('loss', float('nan')):.4f}",
                             "tok/s": f"{self.tokens_per_step / max(dt, 1e-9):.0f}"})
    if step % int(self.config.log_every) == 0 or step == 1:
      elapsed = now - self._t_window
      self._t_window = now
      mean = {k: float(np.mean([w[k] for w in self.window])) for k in self.window[-1]}
      self.tokens_per_s = self.tokens_per_step * len(self.window) / max(elapsed, 1e-9)
      mean["tokens_per_s"] = self.tokens_per_s
      mean["steps_in_mean"] = len(self.window)
      self.logger.write(step, "train", mean)
      self.window = []
