"""Configs: every preset loads, overrides work, and the big presets' models have the right
shapes and parameter counts (jax.eval_shape: nothing is allocated)."""

import functools
import glob
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from hydra_jax.model import llama
from hydra_jax.model.heads import HeadsConfig, init_heads
from hydra_jax.training import config_base
from hydra_jax.registry.paths import REPO_ROOT

REPO = REPO_ROOT
PRESETS = sorted(glob.glob(os.path.join(REPO, "configs", "[a-z]*.py")))
# The big presets (BASE_MODELS bases); tiny_cpu, embedded_* and smollm2_* run real small
# models (smollm2_* would download SmolLM2: test_smollm2_recipes_differ_only_in_the_heads).
BIG = [p for p in PRESETS
       if not os.path.basename(p).startswith(("tiny_cpu", "embedded_", "smollm2_"))]
SMOLLM2 = [p for p in PRESETS if os.path.basename(p).startswith("smollm2_")]

# Published parameter counts (the model cards / HF `num_parameters()`), not computed by us.
KNOWN_BASE_PARAMS = {
    "vicuna_7b": 6_738_415_616,
    "vicuna_13b": 13_015_864_320,
    "vicuna_33b": 32_528_943_616,
    "llama3_8b": 8_030_261_248,
}


def _load(path, *overrides):
  argv = ["prog", f"--config={path}", *overrides]
  fv = flags.FlagValues()  # as train.py declares it (its argv given: no global sys.argv)
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def _leaves(cfg, prefix=""):
  out = {}
  for k, v in cfg.items():
    if hasattr(v, "items"):
      out.update(_leaves(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def test_every_base_field_has_a_comment():
  src = open(config_base.__file__).read()
  body = src[src.index("def base_config"):src.index("def recipe")]
  assigns = [line for line in body.splitlines() if re.match(r"\s+c\.[\w.]+ = ", line)]
  assert len(assigns) > 40
  missing = [line.strip() for line in assigns
             if "#" not in line and "ConfigDict()" not in line]
  assert not missing, f"fields without a comment: {missing}"


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_loads_and_sets_only_known_fields(path):
  cfg = _load(path)
  base = _leaves(config_base.base_config())
  got = _leaves(cfg)
  assert set(got) == set(base), f"unknown or missing fields: {set(got) ^ set(base)}"
  doc = open(path).read().split('"""')[1]
  assert f"train.py --config configs/{os.path.basename(path)}" in doc
  assert cfg.seq_len > cfg.heads.num_heads + 1
  assert cfg.global_batch_size > 0


def test_command_line_overrides():
  cfg = _load(os.path.join(REPO, "configs", "tiny_cpu.py"), "--config.optimizer.lr=0.01",
              "--config.mesh_shape=(2,2,2)", "--config.heads.arch=hydra",
              "--config.model_path=/x/y")
  assert cfg.optimizer.lr == 0.01 and tuple(cfg.mesh_shape) == (2, 2, 2)
  assert cfg.heads.arch == "hydra" and cfg.model_path == "/x/y"
  with pytest.raises(Exception):  # a typo is an error, not a silently new field
    _load(os.path.join(REPO, "configs", "tiny_cpu.py"), "--config.optimizer.lrr=0.01")


def test_data_section_matches_the_data_pipeline():
  from hydra_jax.training.data import default_data_config
  assert set(config_base.base_config().data.keys()) == set(default_data_config().keys())


def test_hydra_pp_recipe_matches_the_paper():
  cfg = _load(os.path.join(REPO, "configs", "hydra_pp_vicuna_7b.py"))
  o = cfg.optimizer
  assert (cfg.heads.arch, cfg.heads.num_heads, cfg.heads.num_layers, cfg.heads.dropout) == (
      "hydra++", 4, 4, 0.2)
  assert cfg.train.loss == "teacher" and cfg.train.base_dtype == "bfloat16"
  assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.warmup_steps, o.final_lr_multiplier) == (
      5e-4, 0.9, 0.999, 1e-8, 0.1, 100, 0.33)
  assert (cfg.num_epochs, cfg.global_batch_size, cfg.seq_len) == (10, 32, 2048)
  assert (cfg.data.source, cfg.data.template, cfg.data.eval_fraction) == (
      "sharegpt", "vicuna_v1.1", 0.05)
  for arch in ("medusa", "hydra"):
    c = _load(os.path.join(REPO, "configs", f"{arch}_vicuna_7b.py"))
    assert c.train.loss == "hard" and c.heads.arch == arch and c.heads.dropout == 0.0


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _expected_heads_params(hc: HeadsConfig, base) -> int:
  """Closed form from the reference's description of the heads (section 2)."""
  d, v = base.hidden_size, base.vocab_size
  block = d * d + d
  total = 0
  for k in range(hc.num_heads):
    if hc.arch == "medusa":
      total += (1 if hc.shared_inner else hc.num_layers) * block + d * v
    else:
      inner = hc.num_layers - 1
      total += 2 * ((k + 2) * d * d + d) + (min(inner, 1) if hc.shared_inner else inner) * block
      total += d * v + v
  if hc.prefix_layer:
    n, kv, h, f = base.num_heads, base.num_kv_heads, base.head_dim, base.intermediate_size
    total += d * n * h * 2 + 2 * d * kv * h + 3 * d * f + 2 * d + d
  return total


@functools.lru_cache(maxsize=None)
def _base_shapes(name):
  return jax.eval_shape(lambda r: llama.init_params(config_base.BASE_MODELS[name], r,
                                                    jnp.bfloat16), jax.random.key(0))


@pytest.mark.parametrize("path", BIG, ids=os.path.basename)
def test_big_preset_shapes_via_eval_shape(path):
  from hydra_jax.training.trainer import check_config, heads_config_from
  cfg = _load(path)
  base = config_base.BASE_MODELS[cfg.base_name]
  check_config(cfg, base)  # seq_len fits, heads fit, mesh shape valid
  base_shapes = _base_shapes(cfg.base_name)
  assert _count(base_shapes) == KNOWN_BASE_PARAMS[cfg.base_name] == base.num_params
  assert base_shapes["embed_tokens"]["embedding"].dtype == jnp.bfloat16
  hc = heads_config_from(cfg, base)
  heads_shapes = jax.eval_shape(lambda bp, r: init_heads(hc, base, bp, r), base_shapes,
                                jax.random.key(0))
  assert _count(heads_shapes) == _expected_heads_params(hc, base)
  d, v = base.hidden_size, base.vocab_size
  for k in range(hc.num_heads):
    head = heads_shapes[f"heads_{k}"]
    assert head["lm_head"]["kernel"].shape == (d, v)
    assert head["lm_head"]["kernel"].dtype == jnp.float32  # f32 master weights
    if hc.sequential:
      assert head["first"]["kernel"].shape == ((k + 2) * d, 2, d)  # W and W_res, fused
  assert ("prefix_layer" in heads_shapes) == (hc.arch == "hydra++")


def test_tiny_cpu_trains_the_embedded_model_on_its_training_split():
  from hydra_jax.registry import embedded
  cfg = _load(os.path.join(REPO, "configs", "tiny_cpu.py"))
  assert cfg.model_path == embedded.MODEL_DIR
  assert cfg.data.source == "text" and cfg.data.path == embedded.train_split_file()
  train, _ = embedded.split_corpus()
  with open(cfg.data.path, encoding="utf-8") as f:
    assert f.read() == train  # the held-out tail is never read
  assert "shared/data" not in open(os.path.join(REPO, "configs", "tiny_cpu.py")).read()
  assert not hasattr(config_base, "SHARED_DATA")


# As if torch (a test-only dependency) were not installed: `import torch` raises ImportError
# and importlib.util.find_spec("torch") is None.
_BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"


def test_training_imports_no_torch():
  """train.py's whole import chain, with torch made unimportable."""
  import subprocess
  import sys
  code = _BLOCK_TORCH + (
      "import runpy; from hydra_jax.training import trainer; "
      f"cfg = runpy.run_path({os.path.join(REPO, 'configs', 'tiny_cpu.py')!r})['get_config']();"
      "print('ok', sys.modules['torch'] is not None)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["ok", "False"]


@pytest.mark.slow  # the README command itself: ~1 min of training, then the rerun
def test_readme_tiny_cpu_command_runs_from_a_clone_without_torch(tmp_path):
  import subprocess
  import sys
  workdir = str(tmp_path / "run")
  code = _BLOCK_TORCH + (
      "import runpy; sys.argv = ['train.py', '--config', 'configs/tiny_cpu.py', "
      f"'--workdir', {workdir!r}, '--config.progress_bar=False']; "
      "runpy.run_path('train.py', run_name='__main__')")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  final = json.loads(first.stdout[first.stdout.index("{"):])
  assert final["step"] == 40 and os.path.isfile(os.path.join(final["heads_dir"],
                                                               "heads_config.json"))
  again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "training is already complete: checkpoint 40 of 40 steps" in again.stderr


def test_smollm2_recipes_differ_only_in_the_heads(monkeypatch, tmp_path):
  """The three SmolLM2 configs share data, batch, steps and optimizer (the comparison is fair);
  they name the base by its registry name, so loading them downloads nothing."""
  from hydra_jax.registry import models
  monkeypatch.setattr(models, "prepare", lambda name: pytest.fail("a config load fetched " + name))
  cfgs = {os.path.basename(p): _load(p).to_dict() for p in SMOLLM2}
  assert sorted(cfgs) == ["smollm2_hydra.py", "smollm2_hydra_pp.py", "smollm2_medusa.py"]
  arches = set()
  for c in cfgs.values():
    arches.add(c["heads"]["arch"])
    assert c["heads"]["lm_head"] == "base" and c["heads"]["draft_vocab_size"] == 4096
    assert c["model_path"] == "smollm2"
  assert arches == {"medusa", "hydra", "hydra++"}
  shared = lambda c: {k: v for k, v in c.items() if k not in ("heads", "train")}
  first = shared(next(iter(cfgs.values())))
  for c in cfgs.values():
    assert shared(c) == first
