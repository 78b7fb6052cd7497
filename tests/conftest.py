"""Test set-up: CPU only, 8 fake devices for sharding tests, f32 matmuls for parity.

These must be set before jax initialises its backends, hence at import time here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")
jax.config.update("jax_numpy_rank_promotion", "raise")


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_leftover_log_handlers():
  """A CLI's main() run in-process may attach a handler to pytest's captured stderr; once that
  stream closes, later log lines print "--- Logging error ---" tracebacks into other tests."""
  loggers = [logging.getLogger(), logging.getLogger("hydra_jax")]
  before = [list(lg.handlers) for lg in loggers]
  yield
  for lg, kept in zip(loggers, before):
    for h in list(lg.handlers):
      if h not in kept:
        lg.removeHandler(h)
