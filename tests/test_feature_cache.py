"""Feature cache: a step on cached base features equals the online step, a run on the cache
equals the online run and resumes, foreign or corrupted caches are refused with the fix, and
a build killed after some shards finishes to the same bytes as a one-shot build."""

import json
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import _multihost_worker as tiny
import _tiny_run as tr
from hydra_jax.checkpoint.heads_io import load_heads
from hydra_jax.model.llama import LlamaModel
from hydra_jax.parallel import sharding
from hydra_jax.training import feature_cache, metrics_log, step
from hydra_jax.registry.paths import REPO_ROOT
from hydra_jax.training.errors import ConfigError
from hydra_jax.training.trainer import train_and_evaluate

SHARD_ROWS = 32  # several shards from the tiny text (~140 training rows of 64 tokens)


class _Killed(BaseException):
  """A kill in the middle of a build: nothing catches it (as SIGKILL)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  with tr.compile_cache(tr.shared_dir(tmp_path_factory, "jax_cache")):
    yield tr.tiny_model(tmp_path_factory), tr.tiny_text(tmp_path_factory)


@pytest.fixture(scope="module")
def cache_f32(setup, tmp_path_factory):
  """A float32 cache of the tiny run's training rows: steps on it must equal online steps."""
  model, text = setup
  out = str(tmp_path_factory.mktemp("features") / "f32")
  manifest = feature_cache.build_feature_cache(tr.tiny_config(model, text), out,
                                               dtype="float32", shard_rows=SHARD_ROWS)
  assert manifest["complete"] and len(manifest["shards"]) >= 3
  return out


def _hidden(batch, dtype):
  """The base's hidden states for `batch`, as the feature cache stores them."""
  model = LlamaModel(tiny.tiny_model_cfg(), dtype=jnp.float32)
  fn = jax.jit(lambda p, t, q: step.base_hidden(model, p, t, q).astype(dtype))
  return np.asarray(fn(tiny.tiny_base_params(), batch["tokens"], batch["positions"]))


# ~90 s (three train steps compiled); the run-level test below checks the same in default.
@pytest.mark.slow
def test_step_on_cached_features_equals_the_online_step():
  online = tiny.cached_run("hydra++", (1, 1, 1), 8, "teacher", snapshot_at=3)
  batch = tiny.global_batch()

  # float32 features on a (2, 2, 2) mesh (rows over data x fsdp): the same loss, metrics and
  # (through 3 Adam updates) params as the online step on one device, within the tolerance
  # test_train_step allows sharded vs unsharded (f32 reduction order).
  f32 = dict(batch, hidden=_hidden(batch, jnp.float32))
  mesh = sharding.make_mesh((2, 2, 2))
  cached = tiny.run_steps(mesh, f32, num_steps=3)
  np.testing.assert_allclose(cached["losses"], online["losses"][:3], rtol=1e-5)
  for got, want in zip(cached["metrics"], online["metrics"][:3]):
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  params = tiny.host_params(cached["state"].params)
  for key, want in online["snapshot"].items():
    np.testing.assert_allclose(params[key], want, rtol=1e-5, atol=1e-4, err_msg=key)

  # bfloat16 features (the default storage): each hidden value is rounded to 8 significant
  # bits (relative error <= 2**-9 = 0.2%); logits and losses are smooth in the hidden state,
  # so the losses move by about that much (measured here: ~1e-4 relative), never 1%. They do
  # move: the step reads the cached hidden state instead of running the base.
  bf16 = dict(batch, hidden=_hidden(batch, jnp.bfloat16))
  assert bf16["hidden"].dtype == ml_dtypes.bfloat16
  one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rounded = tiny.run_steps(one, bf16, num_steps=3)
  np.testing.assert_allclose(rounded["losses"], online["losses"][:3], rtol=1e-2)
  assert rounded["losses"][0] != online["losses"][0]


def test_training_on_the_cache_matches_online_and_resumes(setup, cache_f32, tmp_path):
  model, text = setup
  online = train_and_evaluate(tr.tiny_config(model, text), str(tmp_path / "online"))
  cfg = tr.tiny_config(model, text, **{"data.feature_cache": cache_f32})
  cached = train_and_evaluate(cfg, str(tmp_path / "cached"))
  assert cached["step"] == online["step"] == 8

  def losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_log.read_metrics(workdir, "train")}

  # Same rows in the same shuffled order, same dropout masks: the same losses.
  want = losses(str(tmp_path / "online"))
  got = losses(str(tmp_path / "cached"))
  assert sorted(got) == sorted(want) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                             rtol=1e-5)
  for key in ("eval/base_top1_head_0", "eval/soft_loss", "eval/accept_length"):
    np.testing.assert_allclose(cached[key], online[key], rtol=1e-4, err_msg=key)

  # Resume from checkpoint 4 of the cached run: the iterator state comes back, and the rest
  # of the run repeats the uninterrupted one exactly.
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(str(tmp_path / "cached"), resumed_dir)
  for s in ("6", "8"):
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", s))
  resumed = train_and_evaluate(cfg, resumed_dir)
  assert resumed["resumed_from"] == 4 and resumed["step"] == 8
  again = losses(resumed_dir)
  np.testing.assert_allclose([again[s] for s in range(1, 9)], [got[s] for s in range(1, 9)],
                             rtol=1e-6)
  _, ref = load_heads(cached["heads_dir"])
  _, heads = load_heads(resumed["heads_dir"])
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(heads)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_refuses_a_cache_of_other_weights_rows_or_bytes(setup, cache_f32, tmp_path,
                                                        tmp_path_factory):
  model, text = setup

  def run(model_path, cache, **kw):
    cfg = tr.tiny_config(model_path, text, **{"data.feature_cache": cache}, **kw)
    return train_and_evaluate(cfg, str(tmp_path / "work"))

  other = tr.tiny_model(tmp_path_factory, "feature_cache_other_seed", seed=1)
  with pytest.raises(ConfigError, match=r"built for other base weights \(base\.weights_sha256"):
    run(other, cache_f32)
  with pytest.raises(ConfigError, match="built for another seq_len .*seq_len: 64 in the cache "
                                        "vs 32 here.*python -m hydra_jax.training.feature_cache"):
    run(model, cache_f32, seq_len=32)
  with pytest.raises(ConfigError, match="built for other training rows"):
    run(model, cache_f32, seed=1)  # another held-out split
  with pytest.raises(ConfigError, match="holds no feature cache .*--out"):
    run(model, str(tmp_path / "nothing"))

  broken = str(tmp_path / "broken")
  shutil.copytree(cache_f32, broken)
  victim = os.path.join(broken, "shard_00001.hidden.npy")
  with open(victim, "r+b") as f:  # one flipped byte in the data, the header intact
    f.seek(-5, os.SEEK_END)
    byte = f.read(1)
    f.seek(-5, os.SEEK_END)
    f.write(bytes([byte[0] ^ 0x40]))
  with pytest.raises(ConfigError, match="shard_00001.hidden.npy is missing or does not match "
                                        "its sha256"):
    run(model, broken)

  # train.py reports it in one line and exits 2, no traceback.
  proc = subprocess.run(
      [tr.PYTHON, os.path.join(REPO_ROOT, "train.py"),
       f"--config={os.path.join(REPO_ROOT, 'configs', 'tiny_cpu.py')}",
       f"--workdir={tmp_path / 'cli'}", *tr.cli_overrides(model, text),
       f"--config.data.feature_cache={broken}"],
      cwd=REPO_ROOT, env=tr.subprocess_env(str(tmp_path / "jax_cache")), capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert "train.py: error: data.feature_cache=" in proc.stderr and "sha256" in proc.stderr


def test_build_killed_after_some_shards_resumes_to_the_one_shot_bytes(setup, tmp_path,
                                                                      monkeypatch, caplog):
  model, text = setup
  cfg = tr.tiny_config(model, text)
  caplog.set_level("INFO", logger="hydra_jax.training.feature_cache")
  one_shot = feature_cache.build_feature_cache(cfg, str(tmp_path / "one"),
                                               shard_rows=SHARD_ROWS)
  assert one_shot["dtype"] == "bfloat16" and "ETA" in caplog.text
  n = len(one_shot["shards"])
  assert n >= 3 and one_shot["built_rows"] == one_shot["rows"]
  assert one_shot["tokens"] == one_shot["rows"] * cfg.seq_len

  out = str(tmp_path / "killed")
  real_write, calls = feature_cache._write_shard, []

  def dies_at_the_third_shard(*args):
    calls.append(args[1])
    if len(calls) == 3:
      raise _Killed()
    return real_write(*args)

  monkeypatch.setattr(feature_cache, "_write_shard", dies_at_the_third_shard)
  with pytest.raises(_Killed):
    feature_cache.build_feature_cache(cfg, out, shard_rows=SHARD_ROWS)
  monkeypatch.setattr(feature_cache, "_write_shard", real_write)
  partial = feature_cache.read_manifest(out)
  assert not partial["complete"] and len(partial["shards"]) == 2
  with pytest.raises(ConfigError, match="is unfinished .2 of .* shards.*finish it"):
    train_and_evaluate(tr.tiny_config(model, text, **{"data.feature_cache": out}),
                       str(tmp_path / "work"))

  # Shard 1 is corrupted as well: the rebuild keeps shard 0 (not rewritten) and redoes 1 on.
  first = os.path.join(out, "shard_00000.hidden.npy")
  stamp = os.stat(first).st_mtime_ns
  with open(os.path.join(out, "shard_00001.tokens.npy"), "r+b") as f:
    f.seek(-1, os.SEEK_END)
    f.write(b"\xff")
  caplog.clear()
  resumed = feature_cache.build_feature_cache(cfg, out, shard_rows=SHARD_ROWS)
  assert "rebuilding from shard 1" in caplog.text
  assert os.stat(first).st_mtime_ns == stamp
  assert resumed["complete"]
  assert json.dumps(resumed["shards"]) == json.dumps(one_shot["shards"])  # same bytes (sha256)

  # A build into a cache of something else is refused, not mixed in.
  with pytest.raises(ConfigError, match="holds a feature cache of something else.*seq_len"):
    feature_cache.build_feature_cache(tr.tiny_config(model, text, seq_len=32), out,
                                      shard_rows=SHARD_ROWS)
