"""Sharded decoding as one of several processes; also the decode calls the test compares.

Launched by test_multihost_decode.py, one per process:

  XLA_FLAGS= python tests/_multihost_decode_worker.py PROCESS_ID NUM_PROCESSES PORT MODEL_DIR OUT.json

Each process sees 8 / NUM_PROCESSES CPU devices; together they form the data=2,tensor=4 mesh
(data across the processes, tensor within each). Each loads the model straight into its own
shards and runs `decode_all`; process 0 writes the tokens, and what each process reads from
the checkpoint to load onto data=1,tensor=8 (where each holds half of every split weight; on
data=2,tensor=4 each process holds a whole replica, so it reads the whole file).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

MESH = "data=2,tensor=4"
PROMPTS = [[5, 17, 42, 9, 100, 7, 63], [11, 12], [200, 201, 202, 203, 204]]
MAX_NEW = 10


def tiny_heads(base_cfg, arch="hydra++"):
  """Random Hydra++ heads made on the host from a fixed seed: the same in every process."""
  import jax
  from hydra_jax.model.heads import HeadsConfig, param_shapes
  cfg = HeadsConfig.for_base(base_cfg, arch, num_heads=4, num_layers=2)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda x: (rng.normal(0.0, 0.05, x.shape) + (x.ndim == 1) * 1.0).astype(np.float32),
      param_shapes(cfg, base_cfg))
  return cfg, params


def decode_all(model, mesh) -> dict:
  """AR greedy, speculative greedy and speculative exact sampling: output ids per prompt."""
  from hydra_jax.decoding.api import generate
  heads = tiny_heads(model.config)
  runs = {"ar": dict(), "spec": dict(heads=heads),
          "spec_exact": dict(heads=heads, temperature=0.8, top_p=0.9, seed=3, accept="exact")}
  return {name: [r.output_ids for r in generate(model, PROMPTS, MAX_NEW, batch_size=3,
                                                 tree="mc_sim_7b_63", mesh=mesh, **kw)]
          for name, kw in runs.items()}


def main(argv):
  process_id, num_processes, port, model_dir, out = (int(argv[1]), int(argv[2]), argv[3],
                                                     argv[4], argv[5])
  import jax
  jax.config.update("jax_num_cpu_devices", 8 // num_processes)
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_default_matmul_precision", "float32")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 8 // num_processes
  from hydra_jax.checkpoint import sharded_load
  from hydra_jax.decoding.api import load_model, resolve_mesh
  from hydra_jax.parallel.mesh import decode_shardings
  mesh = resolve_mesh(MESH)
  model = load_model(model_dir, tokenizer=False, mesh=mesh)
  tokens = decode_all(model, mesh)
  # What this process reads when loading into its shards of data=1,tensor=8, counted.
  source = sharded_load.SafetensorsSource(model_dir)
  tensor8 = resolve_mesh("data=1,tensor=8")
  sharded_load.load_params_sharded(source, model.config,
                                   decode_shardings(model.config, tensor8)[0])
  read = np.asarray([source.bytes_read], np.int64)
  from jax.experimental import multihost_utils
  read_all = multihost_utils.process_allgather(read).reshape(-1).tolist()
  if process_id == 0:
    total = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
    with open(out, "w") as f:
      json.dump({"tokens": tokens, "bytes_read": read_all, "file_bytes": total}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
