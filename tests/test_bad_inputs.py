"""Bad input through the command lines: every case exits 2 with one line that names the fix.

Each case runs `python train.py ...` or `python decode.py ...` in a subprocess on the
embedded model, and checks the exit code, a key phrase of the message, that stderr holds no
traceback (nor orbax's "Event loop is closed" noise), and that no input or checkpoint changed
(sha256 of every file before and after). The training cases share one tiny run (a single
Medusa head, 16-token rows, 4 steps) and a persistent compilation cache.

The decode-side library checks (generate's argument validation) are here too.
"""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hydra_jax.registry import embedded
from hydra_jax.registry.paths import REPO_ROOT

TRAIN = os.path.join(REPO_ROOT, "train.py")
DECODE = os.path.join(REPO_ROOT, "decode.py")
TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "tiny_cpu.py")
MODEL = embedded.MODEL_DIR
SHIPPED_HEADS = os.path.join(embedded.HEADS_ROOT, "medusa")

# The smallest run of the tiny config: one Medusa head, short rows, checkpoints at 2 and 4.
TINY_RUN = ["--config.num_steps=4", "--config.checkpoint_every=2", "--config.keep_checkpoints=2",
            "--config.eval_every=0", "--config.eval_batches=1", "--config.progress_bar=False",
            "--config.heads.arch=medusa", "--config.heads.num_heads=1",
            "--config.heads.num_layers=1", "--config.heads.dropout=0.0",
            "--config.train.loss=hard", "--config.seq_len=16", "--config.eval_tree=chain_4"]

# train.py with orbax's JSON write failing with ENOSPC from checkpoint FAIL_STEP on (after
# half a file), as a full disk does in orbax's background commit thread.
_DISK_FULL = """
import errno, json, os, runpy, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch
fail_from, write = int(os.environ["FAIL_STEP"]), jch.JsonCheckpointHandler._save_fn
async def disk_full(self, item, directory):
  if int(os.path.basename(os.path.dirname(str(directory))).split(".")[0]) < fail_from:
    return await write(self, item, directory)
  (directory / "metadata").write_text(json.dumps(item)[:10])
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
jch.JsonCheckpointHandler._save_fn = disk_full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# --- helpers ----------------------------------------------------------------------------------


def _hashes(*paths):
  """{file: sha256} of every file under `paths` (files or directories)."""
  out = {}
  for root in paths:
    files = [root] if os.path.isfile(root) else [
        os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    for path in files:
      with open(path, "rb") as f:
        out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


@contextlib.contextmanager
def _unchanged(*paths):
  before = _hashes(*paths)
  yield
  assert _hashes(*paths) == before, "an input or checkpoint file changed"


def _run(env, *args, fault_step=None, timeout=600):
  cmd = [sys.executable, *args]
  if fault_step is not None:
    cmd = [sys.executable, "-c", _DISK_FULL, *args]
    env = dict(env, FAIL_STEP=str(fault_step))
  return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                        timeout=timeout)


def _train(env, workdir, *extra, text, **kw):
  return _run(env, TRAIN, "--config", TINY_CONFIG, "--workdir", str(workdir), *TINY_RUN,
              f"--config.data.path={text}", *extra, **kw)


def _decode(env, *extra):
  return _run(env, DECODE, "--model", MODEL, "--max-new-tokens", "4", *extra)


def _assert_clean(proc):
  err = proc.stderr
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
  assert "Exception ignored" not in err and "ERROR:absl" not in err, err[-3000:]


def _assert_fails(proc, phrase, tool="train.py"):
  """Exit 2, the phrase in ONE error line on stderr, no traceback."""
  _assert_clean(proc)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{tool}: error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert phrase in errors[0], errors[0]
  return errors[0]


def _corrupt_largest_file(directory, how):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  target = max(files, key=os.path.getsize)
  if how == "truncate":
    with open(target, "r+b") as f:
      f.truncate(100)
  else:  # random bytes over 4 KB, the size unchanged
    with open(target, "r+b") as f:
      f.seek(64)
      f.write(np.random.default_rng(0).bytes(4096))
  return target


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  out = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  out.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
  out["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, out.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return out


@pytest.fixture(scope="module")
def text(tmp_path_factory):
  """The start of the training split: enough windows for 4 steps, quick to tokenize."""
  path = tmp_path_factory.mktemp("data") / "train_start.txt"
  with open(embedded.train_split_file(), encoding="utf-8") as f:
    path.write_text(f.read(20_000), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def trained(env, text, tmp_path_factory):
  """One finished tiny run (checkpoints 2 and 4, heads exported) that the cases copy."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  proc = _train(env, workdir, text=text)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  return workdir


def _copy(trained, tmp_path, drop=()):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  for rel in drop:
    shutil.rmtree(workdir / rel)
  return workdir


# --- train.py ---------------------------------------------------------------------------------


def test_train_missing_config_file(env, tmp_path):
  proc = _run(env, TRAIN, "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w"))
  _assert_fails(proc, f"config file {tmp_path / 'nope.py'} does not exist")
  assert not os.path.exists(tmp_path / "w")


def test_train_missing_workdir_flag(env):
  _assert_fails(_run(env, TRAIN, "--config", TINY_CONFIG), "pass --workdir DIR")


@pytest.mark.parametrize("override,phrase", [
    ("--config.no_such_field=1", "unknown config field 'no_such_field'"),
    ("--config.optimizer.lrr=1", "'optimizer.lrr' (--config.optimizer.lrr) (did you mean "
                                 "optimizer.lr?)"),
    ("--config.optimzer.lr=1", "(did you mean optimizer.lr?)"),
    ("--config.seq_len=1.5", "--config.seq_len=1.5: invalid literal for int()"),
])
def test_train_bad_override(env, tmp_path, override, phrase):
  with _unchanged(TINY_CONFIG):
    _assert_fails(_run(env, TRAIN, "--config", TINY_CONFIG, "--workdir", str(tmp_path / "w"),
                       override), phrase)


def test_train_workdir_is_a_file(env, text, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with _unchanged(blocker, text):
    _assert_fails(_train(env, blocker, text=text), "is a file, not a directory")


def _read_only_dir(tmp_path):
  if os.geteuid() != 0:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ro / "w"
  # root ignores permission bits: a directory on a read-only file system instead
  for candidate in ("/sys/hydra_jax_test", "/proc/sys/hydra_jax_test"):
    try:
      os.makedirs(candidate)
    except OSError:
      return candidate
    os.rmdir(candidate)
  pytest.skip("no read-only directory available to root")


def test_train_read_only_workdir(env, text, tmp_path):
  _assert_fails(_train(env, _read_only_dir(tmp_path), text=text), "is not writable")


def test_train_empty_data_file(env, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with _unchanged(empty):
    _assert_fails(_train(env, tmp_path / "w", text=str(empty)),
                  "fewer than one seq_len=16 window; add text or lower seq_len")


def test_train_data_file_not_utf8(env, tmp_path):
  bad = tmp_path / "latin1.txt"
  bad.write_bytes(("First Citizen:\nspeak, speak.\n" * 40 + "caf\xe9\n").encode("latin-1"))
  with _unchanged(bad):
    _assert_fails(_train(env, tmp_path / "w", text=str(bad)), "latin1.txt:81: not UTF-8")


def test_train_rerun_of_a_finished_run_says_so(env, text, trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  with _unchanged(workdir, text):
    proc = _train(env, workdir, text=text)
  _assert_clean(proc)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "training is already complete: checkpoint 4 of 4 steps" in proc.stderr
  assert json.loads(proc.stdout[proc.stdout.index("{"):])["already_complete"] is True


def test_train_disk_full_during_a_checkpoint(env, text, trained, tmp_path):
  """ENOSPC while orbax writes checkpoint 4 (resumed from 2): one line, tmp dir removed."""
  workdir = _copy(trained, tmp_path, drop=("checkpoints/4", "heads"))
  ckpt_dir = workdir / "checkpoints"
  with _unchanged(ckpt_dir / "2", text, TINY_CONFIG):
    proc = _train(env, workdir, text=text, fault_step=4)
  line = _assert_fails(proc, f"checkpoint write failed: no space left in {workdir}; the last "
                             f"good checkpoint is step 2 in {ckpt_dir}")
  assert "removed the partial checkpoint 4" in line and "rerun the same command" in line
  assert sorted(os.listdir(ckpt_dir)) == ["2"]  # the partial save is gone
  assert not os.path.exists(workdir / "heads")


@pytest.mark.slow  # a training continuation; test_trainer checks the same in-process
def test_train_unreadable_checkpoint_falls_back(env, text, trained, tmp_path):
  """A truncated array file in the latest checkpoint: a warning, and training resumes."""
  workdir = _copy(trained, tmp_path, drop=("heads",))
  ckpt_dir = workdir / "checkpoints"
  _corrupt_largest_file(ckpt_dir / "4" / "state", "truncate")
  with _unchanged(ckpt_dir / "2", text):
    proc = _train(env, workdir, text=text)
  _assert_clean(proc)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"warning: checkpoint 4 in {ckpt_dir} cannot be read (OUT_OF_RANGE" in proc.stderr
  assert "resuming from checkpoint 2" in proc.stderr
  assert os.path.isdir(workdir / "corrupt_checkpoints" / "4")
  assert json.loads(proc.stdout[proc.stdout.index("{"):])["resumed_from"] == 2


def test_train_no_readable_checkpoint(env, text, trained, tmp_path):
  workdir = _copy(trained, tmp_path, drop=("heads",))
  ckpt_dir = workdir / "checkpoints"
  for step in ("2", "4"):
    _corrupt_largest_file(ckpt_dir / step / "state", "truncate")
  with _unchanged(workdir, text):
    proc = _train(env, workdir, text=text)
  _assert_fails(proc, f"no checkpoint in {ckpt_dir} can be read")
  assert f"delete {ckpt_dir} to start over" in proc.stderr


# --- decode.py --------------------------------------------------------------------------------


def test_decode_prompts_file_not_utf8(env, tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
  with _unchanged(path):
    _assert_fails(_decode(env, "--prompts-file", str(path)), f"{path}:2: not UTF-8",
                  tool="decode.py")


@pytest.mark.parametrize("flag,value,phrase", [
    ("--temperature", "nan", "argument --temperature: 'nan': must be a finite number >= 0"),
    ("--stop-ids", "-1", "argument --stop-ids: '-1': must be a token id >= 0"),
    ("--top-p", "0", "argument --top-p: '0': must be in (0, 1]"),
])
def test_decode_bad_numbers(env, flag, value, phrase):
  _assert_fails(_decode(env, "--prompt", "ROMEO:", flag, value), phrase, tool="decode.py")


@pytest.mark.parametrize("how", ["random_bytes", "truncate"])
def test_decode_corrupt_heads(env, tmp_path, how):
  heads = tmp_path / "heads"
  shutil.copytree(SHIPPED_HEADS, heads)
  target = _corrupt_largest_file(heads / "params", how)
  with _unchanged(heads):
    line = _assert_fails(_decode(env, "--prompt", "ROMEO:", "--heads", str(heads)),
                         f"the heads in {heads} are corrupt: {target} has changed",
                         tool="decode.py")
  assert "re-export the heads" in line and "download them again" in line


def test_decode_truncated_heads_without_checksums(env, tmp_path):
  """Heads saved before the checksums: orbax's error, shown alone (no asyncio noise)."""
  heads = tmp_path / "heads"
  shutil.copytree(SHIPPED_HEADS, heads)
  meta_path = heads / "heads_config.json"
  meta = json.loads(meta_path.read_text())
  del meta["params_sha256"]
  meta_path.write_text(json.dumps(meta))
  _corrupt_largest_file(heads / "params", "truncate")
  _assert_fails(_decode(env, "--prompt", "ROMEO:", "--heads", str(heads)),
                "the checkpoint is corrupt or partial", tool="decode.py")


def test_decode_with_heads_logs_each_line_once(env):
  proc = _decode(env, "--prompt", "ROMEO:", "--heads", SHIPPED_HEADS)
  _assert_clean(proc)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "INFO:hydra_jax" not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines and len(lines) == len(set(lines)), proc.stderr


@pytest.fixture(scope="module")
def twin_model(tmp_path_factory):
  """The embedded model with other embedding / LM head weights: same config, same shapes."""
  from safetensors.numpy import load_file, save_file
  path = tmp_path_factory.mktemp("twin") / "model"
  shutil.copytree(MODEL, path, ignore=shutil.ignore_patterns("heads"))
  tensors = load_file(str(path / "model.safetensors"))
  rng = np.random.default_rng(0)
  for name in ("model.embed_tokens.weight", "lm_head.weight"):
    tensors[name] = tensors[name][rng.permutation(tensors[name].shape[0])]
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  return str(path)


def test_decode_refuses_heads_for_other_weights(env, twin_model):
  args = ["--model", twin_model, "--max-new-tokens", "4", "--prompt", "ROMEO:", "--heads",
          SHIPPED_HEADS]
  with _unchanged(twin_model, SHIPPED_HEADS):
    line = _assert_fails(_run(env, DECODE, *args), "trained on other base weights",
                         tool="decode.py")
  assert "--allow-heads-mismatch" in line
  proc = _run(env, DECODE, *args, "--allow-heads-mismatch")
  _assert_clean(proc)
  assert proc.returncode == 0 and "loading them anyway" in proc.stderr, proc.stderr[-3000:]


def test_decode_tree_rank_beyond_the_vocabulary(env, tmp_path):
  tree = tmp_path / "tree.json"
  tree.write_text(json.dumps([[0], [2048]]))  # the embedded vocabulary has 2048 tokens
  _assert_fails(_decode(env, "--prompt", "ROMEO:", "--heads", SHIPPED_HEADS, "--tree",
                        str(tree)), "2048", tool="decode.py")


# --- the library: generate() raises DecodeInputError ----------------------------------------


@pytest.fixture(scope="module")
def model():
  import hydra_jax
  return hydra_jax.load_model(MODEL)


def _heads_tuple():
  from hydra_jax.checkpoint.heads_io import load_heads
  cfg, params = load_heads(SHIPPED_HEADS)
  return cfg, params


@pytest.mark.parametrize("case", ["none_prompt", "float_token", "float_max_new", "nan_temperature",
                                  "negative_stop_id", "heads_tuple_of_three", "heads_not_a_pair"])
def test_generate_rejects_bad_arguments(model, case):
  import hydra_jax
  kw = {"max_new_tokens": 1}
  prompts = [[1, 2, 3]]
  if case == "none_prompt":
    prompts = [None]
  elif case == "float_token":
    prompts = [[1, 2.5]]
  elif case == "float_max_new":
    kw["max_new_tokens"] = 4.5
  elif case == "nan_temperature":
    kw["temperature"] = float("nan")
  elif case == "negative_stop_id":
    kw["stop_ids"] = [-1]
  elif case == "heads_tuple_of_three":
    kw["heads"] = (*_heads_tuple(), "extra")
  else:
    kw["heads"] = ("not a HeadsConfig", {})
  with pytest.raises(hydra_jax.DecodeInputError):
    hydra_jax.generate(model, prompts, **kw)
