"""Shared set-up of the trainer tests: one tiny model, a short text, the tiny config, and a
persistent compilation cache so that the second and later runs (in-process or in a
subprocess) of the same config load the compiled steps instead of recompiling them."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import jax
from jax.experimental.compilation_cache import compilation_cache

from hydra_jax.registry import embedded
from hydra_jax.tools import testing
from hydra_jax.registry.paths import REPO_ROOT

MODEL_KW = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                max_position_embeddings=128, vocab_size=512, seed=0)
_CACHE_OPTS = {"jax_compilation_cache_dir": None,
               "jax_persistent_cache_min_compile_time_secs": 0.0,
               "jax_persistent_cache_min_entry_size_bytes": 0}


def shared_dir(tmp_path_factory, name: str) -> str:
  """A directory shared by every test module of this pytest session."""
  return str(tmp_path_factory.getbasetemp() / name)


def tiny_model(tmp_path_factory, name: str = "trainer_tiny_model", **kw) -> str:
  path = shared_dir(tmp_path_factory, name)
  if not os.path.exists(os.path.join(path, "config.json")):
    testing.make_hf_model(path, **{**MODEL_KW, **kw})
  return path


def tiny_text(tmp_path_factory, chars: int = 30_000) -> str:
  path = shared_dir(tmp_path_factory, "trainer_text.txt")
  if not os.path.exists(path):
    with open(embedded.corpus_path(), encoding="utf-8") as f:
      text = f.read(chars)
    with open(path, "w") as f:
      f.write(text)
  return path


def load_tiny_config():
  spec = importlib.util.spec_from_file_location(
      "tiny_cpu_config", os.path.join(REPO_ROOT, "configs", "tiny_cpu.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


# The run every trainer test shares (same shapes and constants: one compile per session).
RUN_OVERRIDES = {"num_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 3,
                 "eval_every": 4, "eval_batches": 2, "log_every": 1, "eval_tree": "chain_4"}


def tiny_config(model_path: str, text_path: str, **overrides):
  c = load_tiny_config()
  c.model_path = model_path
  c.data.path = text_path
  for key, value in {**RUN_OVERRIDES, **overrides}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def cli_overrides(model_path: str, text_path: str, **overrides):
  """The same run as `tiny_config` as train.py flags."""
  out = [f"--config.model_path={model_path}", f"--config.data.path={text_path}"]
  out += [f"--config.{k}={v}" for k, v in {**RUN_OVERRIDES, **overrides}.items()]
  return out


@contextlib.contextmanager
def compile_cache(cache_dir: str):
  """Turns the persistent compilation cache on (and back off afterwards)."""
  old = {k: getattr(jax.config, k) for k in _CACHE_OPTS}
  for k, v in {**_CACHE_OPTS, "jax_compilation_cache_dir": cache_dir}.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()


def subprocess_env(cache_dir: str) -> dict:
  """What tests/conftest.py sets in-process, as env vars (so the compiled code is the same)."""
  env = dict(os.environ)
  env.update({
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
      "JAX_DEFAULT_MATMUL_PRECISION": "float32",
      "JAX_NUMPY_RANK_PROMOTION": "raise",
      "JAX_COMPILATION_CACHE_DIR": cache_dir,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "TOKENIZERS_PARALLELISM": "false",
      "HF_HUB_OFFLINE": "1",
      "TRANSFORMERS_OFFLINE": "1",
      "PYTHONUNBUFFERED": "1",
  })
  env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return env


PYTHON = sys.executable
