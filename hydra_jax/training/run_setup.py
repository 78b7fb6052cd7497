"""What a run checks and sets up before it builds anything: config, base model, mesh.

Shared by the trainer and the feature-cache builder (feature_cache.py), which must load the
same base the same way (registry names, dtype, tokenizer) and split rows over the same mesh.
Everything a user can fix raises a `errors.TrainingError` or a `CheckpointError` whose
message names the fix.
"""

from __future__ import annotations

import os
import uuid

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from hydra_jax.checkpoint.hf import CheckpointError, HFModel, load_hf_model
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import HeadsConfig
from hydra_jax.parallel.sharding import make_mesh
from hydra_jax.registry import models
from hydra_jax.training import losses
from hydra_jax.training.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def heads_config_from(config, base_cfg: ModelConfig) -> HeadsConfig:
  """The HeadsConfig the config asks for, sized for `base_cfg`."""
  h = config.heads
  try:
    return HeadsConfig.for_base(base_cfg, h.arch, num_heads=int(h.num_heads),
                                num_layers=int(h.num_layers), shared_inner=bool(h.shared_inner),
                                dropout=float(h.dropout), lm_head=str(h.lm_head))
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
  size = int(config.heads.draft_vocab_size)
  if not 0 <= size <= base_cfg.vocab_size:
    raise ConfigError(f"heads.draft_vocab_size={size} must lie in [0, {base_cfg.vocab_size}] "
                      f"(0 = the full vocabulary)")
  for field in ("base_dtype", "compute_dtype"):
    check_choice(f"train.{field}", config.train[field], tuple(DTYPES))
  check_choice("train.loss", config.train.loss, losses.LOSS_KINDS)
  check_choice("train.head_weights", config.train.head_weights, losses.HEAD_WEIGHTS)
  if config.train.logits_chunk < 0:
    raise ConfigError(f"train.logits_chunk={config.train.logits_chunk} must be >= 0 (0 = the "
                      f"whole sequence at once)")
  o = config.optimizer
  if o.lr < 0 or o.warmup_steps < 0 or o.weight_decay < 0:
    raise ConfigError(f"optimizer.lr={o.lr}, warmup_steps={o.warmup_steps} and weight_decay="
                      f"{o.weight_decay} must be >= 0")
  if o.grad_accum_steps < 1:
    raise ConfigError(f"optimizer.grad_accum_steps={o.grad_accum_steps} must be >= 1 (1 = no "
                      f"accumulation)")
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


def check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(f"{name}={value!r}; use one of {', '.join(map(repr, choices))}")


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



def load_base(config) -> HFModel:
  path = config.model_path
  check_choice("train.base_dtype", config.train.base_dtype, tuple(DTYPES))
  if not path:
    raise ConfigError("config.model_path is empty: set --config.model_path=DIR (a Hugging Face "
                      "model directory)")
  if not os.path.isdir(os.path.expanduser(path)) and path in models.REGISTRY:
    try:  # a known model's name: fetched and converted on first use, so configs load offline
      path = models.model_path(path)
    except models.RegistryError as e:
      raise CheckpointError(f"config.model_path={config.model_path!r}: {e}") from e
  if not os.path.isdir(os.path.expanduser(path)):
    raise CheckpointError(f"config.model_path: model directory {path!r} does not exist; set "
                          f"--config.model_path=DIR to a Hugging Face model directory "
                          f"(config.json + safetensors + tokenizer)")
  try:
    base = load_hf_model(path, param_dtype=DTYPES[config.train.base_dtype],
                         dtype=DTYPES[config.train.base_dtype], tokenizer=True)
  except CheckpointError as e:
    raise CheckpointError(f"config.model_path: {e}") from e
  if base.tokenizer is None:
    raise CheckpointError(f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json)"
                          f"; the data pipeline needs the base model's tokenizer")
  return base


def make_run_mesh(config) -> Mesh:
  try:
    mesh = make_mesh(tuple(config.mesh_shape))
  except ValueError as e:
    raise ConfigError(f"config.mesh_shape: {e}") from e
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.global_batch_size % batch_ways:
    raise ConfigError(
        f"global_batch_size={config.global_batch_size} does not split over the data x fsdp "
        f"mesh axes ({dict(mesh.shape)}: {batch_ways} ways); use a multiple of {batch_ways} or "
        f"move devices to the tensor axis of mesh_shape")
  return mesh
