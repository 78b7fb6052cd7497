"""Two processes x 4 CPU devices (jax.distributed over 127.0.0.1) decode the tokens of one
process x 8 devices on the data=2,tensor=4 mesh, each loading straight into its own shards."""

import json
import os
import warnings

import pytest

import _multihost_decode_worker as worker
from _multiprocess import workers
from hydra_jax.decoding.api import load_model, resolve_mesh
from hydra_jax.tools.testing import make_hf_model

WORKER = os.path.join(os.path.dirname(__file__), "_multihost_decode_worker.py")


@pytest.mark.slow
def test_two_processes_decode_like_one(tmp_path):
  model_dir = str(tmp_path / "model")
  # 4 kv heads of 8 query heads: attention really splits over tensor=4.
  make_hf_model(model_dir, "llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                num_layers=2, num_heads=8, num_kv_heads=4, weight_std=0.15, tokenizer=False)
  out = str(tmp_path / "out.json")
  with workers(WORKER, model_dir, out, timeout=900):
    mesh = resolve_mesh(worker.MESH)  # the single-process reference, while the workers run
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      want = worker.decode_all(load_model(model_dir, tokenizer=False, mesh=mesh), mesh)
  with open(out) as f:
    got = json.load(f)
  assert got["tokens"] == want
  # Loading onto data=1,tensor=8, each process reads its devices' slices: about half the
  # model (norms are replicated).
  for read in got["bytes_read"]:
    assert read < 0.6 * got["file_bytes"], got
