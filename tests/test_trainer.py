"""The training driver end to end on the tiny config: metrics, checkpoints, evaluation,
exported heads, a NaN stop that keeps the last good checkpoint, and clear errors for bad
input. One tiny model and one compiled run are shared by the whole module."""

import errno
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hydra_jax.checkpoint.hf import CheckpointError, read_hf_config
from hydra_jax.checkpoint.heads_io import load_heads, save_heads
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import HeadsConfig, HeadsMismatchError, param_shapes
from hydra_jax.training import checkpointing, evaluation, metrics_log
from hydra_jax.training.errors import CheckpointCorruptError, CheckpointWriteError
from hydra_jax.training.trainer import ConfigError, TrainingDivergedError, train_and_evaluate

import _tiny_run as tr


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  with tr.compile_cache(tr.shared_dir(tmp_path_factory, "jax_cache")):
    yield tr.tiny_model(tmp_path_factory), tr.tiny_text(tmp_path_factory)


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
  """One uninterrupted run of the tiny config (8 steps, checkpoints every 2, eval every 4)."""
  model, text = setup
  workdir = str(tmp_path_factory.mktemp("run"))
  final = train_and_evaluate(tr.tiny_config(model, text), workdir)
  return workdir, final


def _restore_state(workdir, step):
  """A checkpoint's train state as plain nested dicts of numpy (no target structure)."""
  with ocp.StandardCheckpointer() as c:
    return c.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _params_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_tiny_config_end_to_end(setup, finished):
  model, _ = setup
  workdir, final = finished
  assert final["step"] == 8 and final["resumed_from"] is None
  assert np.isfinite(final["train/loss"]) and final["tokens_per_s"] > 0

  train = metrics_log.read_metrics(workdir, "train")
  assert [r["step"] for r in train] == list(range(1, 9))
  for r in train:
    assert np.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens_per_s"] > 0
    assert np.isclose(r["loss"], sum(r[f"loss_head_{k}"] for k in range(3)), rtol=1e-5)

  evals = metrics_log.read_metrics(workdir, "eval")
  assert [r["step"] for r in evals] == [4, 8]
  for r in evals:
    for k in range(3):
      assert 0 <= r[f"top1_head_{k}"] <= r[f"top5_head_{k}"] <= 1
      assert 0 <= r[f"base_top1_head_{k}"] <= r[f"base_top5_head_{k}"] <= 1
    # chain_4 cut to 3 heads: 1 + a0 + a0 a1 + a0 a1 a2 with a = top-1 vs the base argmax.
    a = [r[f"base_top1_head_{k}"] for k in range(3)]
    assert r["accept_length"] == pytest.approx(1 + a[0] + a[0] * a[1] + a[0] * a[1] * a[2])
    assert r["accept_length_tree"] == "chain_4@3"

  # Checkpoints at 4, 6, 8 (the last three); the last one is the final state.
  ckpt = checkpointing.TrainCheckpointer(workdir)
  assert ckpt.all_steps() == [4, 6, 8]
  extra = ckpt.restore_extra(8)
  ckpt.close()
  assert extra["meta"]["base_fingerprint"] == read_hf_config(model).fingerprint()
  steps_per_epoch = extra["data"]["position"] or 8  # 8 steps into the first epoch
  assert extra["data"]["epoch"] * steps_per_epoch + extra["data"]["position"] == 8

  # The exported heads load with the base's config and equal the final checkpoint's params.
  cfg, heads = load_heads(final["heads_dir"], read_hf_config(model))
  assert (cfg.arch, cfg.num_heads, cfg.num_layers, cfg.dropout) == ("hydra++", 3, 2, 0.1)
  state = _restore_state(workdir, 8)
  assert int(state["step"]) == 8 and _params_equal(state["params"], heads)
  assert not _params_equal(_restore_state(workdir, 4)["params"], heads)  # training moved them


def test_geometric_rank_fit_reproduces_top1_and_top5():
  for top1, top5 in [(0.5, 0.8), (0.1, 0.45), (0.9, 0.99), (0.2, 0.2)]:
    acc = evaluation.geometric_rank_accuracy(top1, top5, 10)
    assert acc[0] == pytest.approx(top1) and acc[:5].sum() == pytest.approx(top5, abs=1e-9)
    assert acc.sum() <= 1 + 1e-12 and np.all(np.diff(acc) <= 1e-15)


def test_resume_in_process_matches_uninterrupted(setup, finished, tmp_path):
  """Resume from checkpoint 4 next to a half-written save of 6 (a kill during the save)."""
  model, text = setup
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  shutil.rmtree(os.path.join(ckpt_dir, "6"))
  shutil.rmtree(os.path.join(ckpt_dir, "8"))
  partial = os.path.join(ckpt_dir, "6.orbax-checkpoint-tmp-1234567890")
  shutil.copytree(os.path.join(finished[0], "checkpoints", "6"), partial)
  for root, _, files in os.walk(partial):  # truncate every file: a save cut short
    for name in files:
      open(os.path.join(root, name), "wb").close()
  final = train_and_evaluate(tr.tiny_config(model, text), workdir)
  assert final["resumed_from"] == 4 and final["step"] == 8
  assert not os.path.exists(partial)
  _, ref = load_heads(finished[1]["heads_dir"])
  _, got = load_heads(final["heads_dir"])
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
  ref_losses = {r["step"]: r["loss"] for r in metrics_log.read_metrics(finished[0], "train")}
  got_losses = {r["step"]: r["loss"] for r in metrics_log.read_metrics(workdir, "train")}
  assert sorted(got_losses) == list(range(1, 9))  # steps 5-8 of the first run were dropped
  np.testing.assert_allclose([got_losses[s] for s in range(1, 9)],
                             [ref_losses[s] for s in range(1, 9)], rtol=1e-6)


def _poisoned_copy(model_dir, dest):
  """The same model with a NaN in its LM head: the teacher (and the loss) become NaN."""
  from safetensors.numpy import load_file, save_file
  shutil.copytree(model_dir, dest)
  path = os.path.join(dest, "model.safetensors")
  tensors = load_file(path)
  tensors["lm_head.weight"] = tensors["lm_head.weight"].copy()
  tensors["lm_head.weight"][5, :] = np.nan
  save_file(tensors, path, metadata={"format": "pt"})
  return dest


def test_nan_stops_and_keeps_the_last_good_checkpoint(setup, finished, tmp_path):
  model, text = setup
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))  # resume from 6: steps 7, 8 to go
  before = checkpointing.TrainCheckpointer(workdir)
  assert before.all_steps() == [4, 6]
  good = before.restore_extra(6)
  before.close()
  bad_model = _poisoned_copy(model, str(tmp_path / "nan_model"))
  with pytest.raises(TrainingDivergedError) as err:
    train_and_evaluate(tr.tiny_config(bad_model, text), workdir)
  msg = str(err.value)
  assert "step 7" in msg and "loss = nan" in msg and "last good checkpoint is step 6" in msg
  after = checkpointing.TrainCheckpointer(workdir)
  assert after.all_steps() == [4, 6] and after.restore_extra(6) == good
  after.close()
  # The checkpoint still restores to the same, finite heads as in the good run.
  kept = _restore_state(workdir, 6)
  assert _params_equal(_restore_state(finished[0], 6), kept)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(kept["params"]))
  assert max(r["step"] for r in metrics_log.read_metrics(workdir, "train")) == 6


def _file_hashes(root):
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _truncate_largest_array_file(checkpoint_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(checkpoint_dir, "state"))
           for f in fs]
  target = max(files, key=os.path.getsize)
  with open(target, "r+b") as f:
    f.truncate(100)


def test_rerun_of_a_finished_run_says_so_without_training(setup, finished, tmp_path, capsys):
  model, text = setup
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  before = _file_hashes(workdir)
  again = train_and_evaluate(tr.tiny_config(model, text), workdir)
  assert again["already_complete"] and again["resumed_from"] == 8 and again["step"] == 8
  assert again["eval/accept_length"] == finished[1]["eval/accept_length"]
  assert "training is already complete: checkpoint 8 of 8 steps" in capsys.readouterr().err
  assert _file_hashes(workdir) == before


def test_disk_full_during_a_checkpoint_keeps_the_last_good_one(setup, finished, tmp_path,
                                                               monkeypatch):
  """ENOSPC in orbax's background write of checkpoint 6: one clear error, no partial save."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch
  model, text = setup
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for step in ("6", "8"):
    shutil.rmtree(os.path.join(ckpt_dir, step))
  shutil.rmtree(os.path.join(workdir, "heads"))
  good = _file_hashes(os.path.join(ckpt_dir, "4"))
  write = jch.JsonCheckpointHandler._save_fn

  async def disk_full(self, item, directory):
    (directory / "metadata").write_text(json.dumps(item)[:10])  # half a file, then no space
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))

  monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", disk_full)
  with pytest.raises(CheckpointWriteError) as err:
    train_and_evaluate(tr.tiny_config(model, text), workdir)
  assert str(err.value).startswith(
      f"checkpoint write failed: no space left in {workdir}; the last good checkpoint is "
      f"step 4 in {ckpt_dir}; removed the partial checkpoint 6.")
  assert sorted(os.listdir(ckpt_dir)) == ["4"]  # no tmp dir left
  assert _file_hashes(os.path.join(ckpt_dir, "4")) == good
  monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", write)
  final = train_and_evaluate(tr.tiny_config(model, text), workdir)  # space is back: resume
  assert final["resumed_from"] == 4 and final["step"] == 8


def test_unreadable_checkpoint_falls_back_to_the_previous_one(setup, finished, tmp_path, capsys):
  model, text = setup
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  shutil.rmtree(os.path.join(workdir, "heads"))  # else the rerun is "already complete"
  ckpt_dir = os.path.join(workdir, "checkpoints")
  _truncate_largest_array_file(os.path.join(ckpt_dir, "8"))
  kept = _file_hashes(os.path.join(ckpt_dir, "6"))
  final = train_and_evaluate(tr.tiny_config(model, text), workdir)
  err = capsys.readouterr().err
  assert "warning: checkpoint 8 in" in err and "resuming from checkpoint 6" in err
  assert "Traceback" not in err and "Event loop is closed" not in err
  assert final["resumed_from"] == 6 and final["step"] == 8
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "8"))
  assert _file_hashes(os.path.join(ckpt_dir, "6")) == kept
  # Steps 7 and 8 replayed from checkpoint 6: the same heads as the uninterrupted run.
  _, ref = load_heads(finished[1]["heads_dir"])
  _, got = load_heads(final["heads_dir"])
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)

  # When no checkpoint reads back: one error naming the directory, nothing touched.
  for step in os.listdir(ckpt_dir):
    _truncate_largest_array_file(os.path.join(ckpt_dir, step))
  shutil.rmtree(os.path.join(workdir, "heads"))
  before = _file_hashes(workdir)
  with pytest.raises(CheckpointCorruptError, match=f"no checkpoint in {ckpt_dir} can be read "
                                                   f".*delete {ckpt_dir} to start over"):
    train_and_evaluate(tr.tiny_config(model, text), workdir)
  assert _file_hashes(workdir) == before


# --- bad input: each fails before anything is compiled -------------------------------------


def test_seq_len_beyond_the_model(setup, tmp_path):
  model, text = setup
  with pytest.raises(ConfigError, match=r"seq_len=256 .*max_position_embeddings=128"):
    train_and_evaluate(tr.tiny_config(model, text, seq_len=256), str(tmp_path))


def test_batch_that_does_not_split_over_the_mesh(setup, tmp_path):
  model, text = setup
  with pytest.raises(ConfigError, match="global_batch_size=4 does not split .* 8 ways"):
    train_and_evaluate(tr.tiny_config(model, text, global_batch_size=4), str(tmp_path))


def test_heads_that_do_not_fit(setup, tmp_path):
  model, text = setup
  with pytest.raises(ConfigError, match="no target for the last of 70 heads"):
    train_and_evaluate(tr.tiny_config(model, text, **{"heads.num_heads": 70}), str(tmp_path))
  with pytest.raises(ConfigError, match="unknown heads arch"):
    train_and_evaluate(tr.tiny_config(model, text, **{"heads.arch": "eagle"}), str(tmp_path))

  # Warm start from heads made for another base (hidden size 48, not 32).
  other = ModelConfig(vocab_size=512, hidden_size=48, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=12, max_position_embeddings=128)
  hc = HeadsConfig.for_base(other, "hydra++", num_heads=3, num_layers=2)
  heads = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), param_shapes(hc, other))
  save_heads(str(tmp_path / "other_heads"), heads, hc, base_cfg=other)
  with pytest.raises(HeadsMismatchError, match="hidden size 48 but the model has 32"):
    train_and_evaluate(tr.tiny_config(model, text, **{"heads.init_from": str(
        tmp_path / "other_heads")}), str(tmp_path / "w1"))


def test_resume_refuses_a_checkpoint_of_other_heads_or_base(setup, finished, tmp_path,
                                                           tmp_path_factory):
  model, text = setup
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="num_layers: checkpoint 2"):
    train_and_evaluate(tr.tiny_config(model, text, **{"heads.num_layers": 3}), workdir)
  other = tr.tiny_model(tmp_path_factory, "trainer_other_model", num_layers=3)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="different base model"):
    train_and_evaluate(tr.tiny_config(other, text), workdir)
  # Same architecture (config fingerprint), other weights: caught by the weights record.
  twin = tr.tiny_model(tmp_path_factory, "trainer_twin_model", seed=1)
  assert read_hf_config(twin).fingerprint() == read_hf_config(model).fingerprint()
  with pytest.raises(checkpointing.CheckpointMismatchError, match="other weights"):
    train_and_evaluate(tr.tiny_config(twin, text), workdir)


def test_unwritable_workdir_and_missing_model(setup, tmp_path):
  model, text = setup
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(ConfigError, match="not writable"):
    train_and_evaluate(tr.tiny_config(model, text), str(blocker / "workdir"))
  if os.geteuid() != 0:  # root ignores permission bits
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ConfigError, match="not writable"):
      train_and_evaluate(tr.tiny_config(model, text), str(ro / "w"))
  with pytest.raises(CheckpointError, match=r"config.model_path: .*does not exist"):
    train_and_evaluate(tr.tiny_config(str(tmp_path / "nope"), text), str(tmp_path / "w2"))


def test_distributed_initialize_only_when_launched_as_several_processes(monkeypatch):
  from hydra_jax.training import trainer
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  dcfg = tr.load_tiny_config().distributed
  trainer.maybe_initialize_distributed(dcfg)  # one process: nothing to join
  monkeypatch.setenv("SLURM_NTASKS", "1")
  trainer.maybe_initialize_distributed(dcfg)
  assert calls == []
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")  # launched as 2 processes: jax reads the rest
  trainer.maybe_initialize_distributed(dcfg)
  assert calls == [{}]
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  dcfg.coordinator_address, dcfg.num_processes, dcfg.process_id = "127.0.0.1:1234", 2, 1
  trainer.maybe_initialize_distributed(dcfg)
  assert calls[-1] == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                       "process_id": 1}
  dcfg.initialize = "never"
  trainer.maybe_initialize_distributed(dcfg)
  assert len(calls) == 2
  dcfg.initialize = "sometimes"
  with pytest.raises(ConfigError, match="distributed.initialize"):
    trainer.maybe_initialize_distributed(dcfg)
