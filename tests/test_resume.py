"""Kill-and-resume: train.py is SIGKILLed right after a checkpoint lands, a half-written
save is left next to it, and a restart continues from the checkpoint to exactly the state
(and the per-step losses) of an uninterrupted in-process run of the same config."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from hydra_jax.checkpoint.heads_io import load_heads
from hydra_jax.training import checkpointing, metrics_log
from hydra_jax.registry.paths import REPO_ROOT
from hydra_jax.training.trainer import train_and_evaluate

import _tiny_run as tr

KILL_AFTER = 4  # checkpoint step to wait for before the kill (checkpoints every 2 of 8 steps)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  cache = tr.shared_dir(tmp_path_factory, "jax_cache")
  with tr.compile_cache(cache):
    yield tr.tiny_model(tmp_path_factory), tr.tiny_text(tmp_path_factory), cache


def _train_py(workdir, model, text, cache, *extra):
  cmd = [tr.PYTHON, os.path.join(REPO_ROOT, "train.py"),
         f"--config={os.path.join(REPO_ROOT, 'configs', 'tiny_cpu.py')}",
         f"--workdir={workdir}", *tr.cli_overrides(model, text), *extra]
  return subprocess.Popen(cmd, cwd=REPO_ROOT, env=tr.subprocess_env(cache),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, ckpt_dir, step, timeout=300.0):
  """Polls until <ckpt_dir>/<step> exists (orbax renames it there once complete)."""
  deadline = time.time() + timeout
  final = os.path.join(ckpt_dir, str(step))
  while time.time() < deadline:
    if os.path.isdir(final):
      return
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"train.py exited ({proc.returncode}) before checkpoint {step}:\n{err[-3000:]}")
    time.sleep(0.02)
  proc.kill()
  pytest.fail(f"no checkpoint {step} after {timeout} s")


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_log.read_metrics(workdir, "train")}


@pytest.mark.slow  # three runs, two of them fresh processes: ~2.5 min on 2 shared cores
def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(setup, tmp_path):
  model, text, cache = setup
  ref_dir = str(tmp_path / "uninterrupted")
  ref = train_and_evaluate(tr.tiny_config(model, text), ref_dir)

  workdir = str(tmp_path / "killed")
  ckpt_dir = os.path.join(workdir, checkpointing.CHECKPOINT_SUBDIR)
  # A pause per step keeps the run from reaching its next checkpoint before the kill lands.
  proc = _train_py(workdir, model, text, cache, "--config.step_delay_s=0.5")
  _wait_for_checkpoint(proc, ckpt_dir, KILL_AFTER)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert steps[-1] == KILL_AFTER, steps
  assert not os.path.exists(os.path.join(workdir, "heads"))
  killed_losses = _losses(workdir)
  assert max(killed_losses) >= KILL_AFTER  # the metrics of the steps before the kill are there

  # A save killed half way: orbax's tmp dir with a partial state. It must never be used.
  partial = os.path.join(ckpt_dir, f"{KILL_AFTER + 2}.orbax-checkpoint-tmp-1234567890")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "manifest.ocdbt"), "wb") as f:
    f.write(b"\x00garbage")

  proc = _train_py(workdir, model, text, cache)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  final = json.loads(out[out.index("{"):])
  assert final["resumed_from"] == KILL_AFTER and final["step"] == 8
  assert f"resumed from checkpoint {KILL_AFTER}" in err
  assert not os.path.exists(partial)  # cleaned up at start

  # Same params as the uninterrupted run (exported heads and the last checkpoint).
  _, heads_ref = load_heads(ref["heads_dir"])
  _, heads_res = load_heads(final["heads_dir"])
  for a, b in zip(jax.tree.leaves(heads_ref), jax.tree.leaves(heads_res)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  assert jax.tree.structure(heads_ref) == jax.tree.structure(heads_res)

  # Same losses for every step, before and after the kill; one record per step.
  losses_ref, losses_res = _losses(ref_dir), _losses(workdir)
  assert sorted(losses_res) == list(range(1, 9))
  assert len(metrics_log.read_metrics(workdir, "train")) == 8
  np.testing.assert_allclose([losses_res[s] for s in range(1, 9)],
                             [losses_ref[s] for s in range(1, 9)], rtol=1e-6)
  for s in range(1, KILL_AFTER + 1):
    assert losses_res[s] == killed_losses[s]
  assert final["eval/accept_length"] == pytest.approx(ref["eval/accept_length"], rel=1e-6)
