"""Shared tiny training set-up, and the worker process of the multi-process test.

Imported by tests (the single-process runs) and launched as a script by test_multihost.py:

  XLA_FLAGS= python tests/_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each worker process sees 4 CPU devices; together they form the (2, 2, 2) mesh, each feeding
its own half of the fixed global batch. Process 0 writes the losses and the gathered params.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

GLOBAL_BATCH, SEQ = 8, 16
NUM_STEPS = 3
TRAIN_CFG = dict(loss="teacher", head_weights="equal", base_dtype="float32",
                 compute_dtype="float32", logits_chunk=6)
OPT_CFG = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, warmup_steps=2,
               final_lr_multiplier=0.33, clip_norm=1.0, grad_accum_steps=1)
TOTAL_STEPS = 10


def tiny_model_cfg():
  from hydra_jax.model.config import ModelConfig
  return ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)


def tiny_heads_cfg(arch="hydra++", **kw):
  """Hydra++: 3 heads x 2 layers with dropout (the recipe's shape); others 2 x 2."""
  from hydra_jax.model.heads import HeadsConfig
  defaults = (dict(num_heads=3, num_layers=2, dropout=0.1) if arch == "hydra++"
              else dict(num_heads=2, num_layers=2))
  kw = dict(defaults, **kw)
  return HeadsConfig.for_base(tiny_model_cfg(), arch, **kw)


@functools.lru_cache(maxsize=None)
def tiny_base_params():
  """Random base params (numpy, N(0, 0.02), norms 1), made on the host: no XLA compile, and
  identical in every process. The LM head is scaled up so the base's next-token
  distributions are peaked (a near-uniform teacher leaves nothing to learn)."""
  import jax
  from hydra_jax.model.llama import init_params
  cfg = tiny_model_cfg()
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)

  def make(path, leaf):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return np.ones(leaf.shape, np.float32)
    return rng.normal(0.0, 0.02, leaf.shape).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(make, shapes)
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20.0
  return params


def global_batch(seed=0, rows=GLOBAL_BATCH, seq=SEQ):
  """A fixed batch with repeating structure (learnable) and a partial loss mask."""
  rng = np.random.default_rng(seed)
  pattern = rng.integers(4, 256, (5,))
  tokens = np.stack([np.roll(np.tile(pattern, seq // 5 + 2), -r)[:seq] for r in range(rows)])
  tokens = np.where(rng.random(tokens.shape) < 0.2, rng.integers(4, 256, tokens.shape), tokens)
  mask = np.ones((rows, seq), np.float32)
  mask[:, :3] = 0.0  # an untrained "prompt"
  mask[-1, seq - 4:] = 0.0  # "padding"
  positions = np.tile(np.arange(seq, dtype=np.int32), (rows, 1))
  return {"tokens": tokens.astype(np.int32), "positions": positions, "loss_mask": mask}


def run_steps(mesh, local_batch, arch="hydra++", num_steps=NUM_STEPS, train_cfg=TRAIN_CFG,
              opt_cfg=OPT_CFG, snapshot_at=None, heads_kw=None):
  """Builds state and step on `mesh`, runs `num_steps` on the same batch.

  Returns dict(losses, metrics, state, base_before (numpy), base (device), initial / snapshot:
  host params before the first step / after `snapshot_at` steps, shardings, heads_cfg).
  """
  import jax
  from hydra_jax.parallel import sharding
  from hydra_jax.training import optimizer, step
  cfg, heads_cfg = tiny_model_cfg(), tiny_heads_cfg(arch, **(heads_kw or {}))
  base_np = tiny_base_params()
  base = sharding.shard_base_params(base_np, mesh, model_cfg=cfg)
  opt = optimizer.make_optimizer(opt_cfg, TOTAL_STEPS)
  state, shardings = step.create_train_state(cfg, heads_cfg, base, opt, mesh,
                                             rng=jax.random.PRNGKey(1))
  train_step = step.build_train_step(cfg, heads_cfg, train_cfg, opt, mesh, shardings,
                                     jax.tree.map(lambda x: x.sharding, base))
  batch = sharding.make_global_batch(local_batch, mesh)
  initial = host_params(state.params)
  losses, metrics, snapshot = [], [], None
  for i in range(num_steps):
    state, m = train_step(state, base, batch, jax.random.PRNGKey(2))
    m = {k: float(v) for k, v in m.items()}
    losses.append(m["loss"])
    metrics.append(m)
    if snapshot_at == i + 1:
      snapshot = host_params(state.params)
  return dict(losses=losses, metrics=metrics, state=state, base_before=base_np, base=base,
              initial=initial, snapshot=snapshot, shardings=shardings, heads_cfg=heads_cfg)


@functools.lru_cache(maxsize=None)
def cached_run(arch, mesh_shape, num_steps, loss="teacher", snapshot_at=None):
  """run_steps on the first prod(mesh_shape) local devices and the fixed global batch, memoised
  so test modules share the compiles (a run's state is final: never step it again)."""
  import jax
  from hydra_jax.parallel import sharding
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  return run_steps(mesh, global_batch(), arch=arch, num_steps=num_steps,
                   train_cfg=dict(TRAIN_CFG, loss=loss), snapshot_at=snapshot_at)


def host_params(params) -> dict:
  """Flat {path: numpy array} of (possibly multi-process) params."""
  import jax
  from jax.experimental import multihost_utils
  if jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)
  flat = jax.tree_util.tree_leaves_with_path(params)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def main(argv):
  process_id, num_processes, port, out = int(argv[1]), int(argv[2]), argv[3], argv[4]
  import jax
  jax.config.update("jax_num_cpu_devices", 8 // num_processes)
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_default_matmul_precision", "float32")
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id)
  assert jax.device_count() == 8, jax.devices()
  from hydra_jax.parallel import sharding
  mesh = sharding.make_mesh((2, 2, 2))
  batch = global_batch()
  rows = GLOBAL_BATCH // num_processes
  local = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in batch.items()}
  result = run_steps(mesh, local)
  params = host_params(result["state"].params)
  if process_id == 0:
    np.savez(out, losses=np.asarray(result["losses"]), **{f"param:{k}": v
                                                          for k, v in params.items()})
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
