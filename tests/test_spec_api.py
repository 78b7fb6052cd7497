"""generate(heads=...) and decode.py --heads: speculative output equals autoregressive output.

The reference is our autoregressive greedy decoding (itself checked against transformers in
test_autoregressive.py); the CLI runs in a subprocess like a user would run it.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hydra_jax.checkpoint.heads_io import save_heads
from hydra_jax.decoding import api
from hydra_jax.model.heads import HeadsConfig, init_heads
from hydra_jax.tools.testing import make_hf_model, perturb_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("spec_api")
  model_dir = str(root / "model")
  make_hf_model(model_dir, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                weight_std=0.15)
  model = api.load_model(model_dir)
  cfg = HeadsConfig.for_base(model.config, "hydra++", num_heads=4, num_layers=2)
  params = perturb_params(init_heads(cfg, model.config, model.params, jax.random.PRNGKey(0)), 1, 0.05)
  heads_dir = str(root / "heads")
  save_heads(heads_dir, params, cfg, base_cfg=model.config)
  other_dir = str(root / "other_model")
  make_hf_model(other_dir, vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=1,
                tokenizer=False)
  other = api.load_model(other_dir, tokenizer=False)
  ocfg = HeadsConfig.for_base(other.config, "hydra", num_heads=4, num_layers=1)
  other_heads = str(root / "other_heads")
  save_heads(other_heads, init_heads(ocfg, other.config, other.params, jax.random.PRNGKey(0)),
             ocfg, base_cfg=other.config)
  return dict(root=root, model_dir=model_dir, model=model, heads_dir=heads_dir,
              other_heads=other_heads)


PROMPTS = ["ROMEO: What light", [5, 9, 11], "To be, or not to be: that is the question"]


def test_generate_spec_equals_autoregressive_and_compiles_once(setup):
  model = setup["model"]
  ar = api.generate(model, PROMPTS, 20, batch_size=2)
  sp = api.generate(model, PROMPTS, 20, batch_size=2, heads=setup["heads_dir"])
  assert [r.output_ids for r in sp] == [r.output_ids for r in ar]
  assert [r.finish_reason for r in sp] == [r.finish_reason for r in ar]
  for r in sp:
    steps = r.extra["accepted_per_step"]
    assert len(steps) == r.steps and all(1 <= a <= 5 for a in steps)
    assert r.extra["accept_length"] == pytest.approx(np.mean(steps))
    # prefill gives one token, then every step emits its accepted tokens (capped at the end)
    assert r.new_tokens <= 1 + sum(steps)
  # Another max_new_tokens (same cache bucket): the compiled loop is reused.
  again = api.generate(model, PROMPTS, 13, batch_size=2, heads=setup["heads_dir"])
  assert all(r.compile_s == 0 for r in again)
  assert [r.output_ids for r in again] == [r.output_ids[:13] for r in ar]


def test_generate_spec_with_chain_tree(setup):
  model = setup["model"]
  ar = api.generate(model, PROMPTS[:1], 12)
  sp = api.generate(model, PROMPTS[:1], 12, heads=setup["heads_dir"], tree="chain_4")
  assert sp[0].output_ids == ar[0].output_ids


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, os.path.join(ROOT, "decode.py"), *args],
                        capture_output=True, text=True, env=env, timeout=600)


def test_decode_cli_spec_json(setup):
  common = ["--model", setup["model_dir"], "--prompt", "ROMEO: What light", "--max-new-tokens",
            "16", "--json"]
  spec = _cli(*common, "--heads", setup["heads_dir"], "--tree", "greedy_15")
  assert spec.returncode == 0, spec.stderr
  out = json.loads(spec.stdout.strip().splitlines()[0])
  assert {"output_ids", "text", "new_tokens", "steps", "tokens_per_s", "accept_length",
          "accepted_per_step"} <= set(out)
  ar = api.generate(setup["model"], ["ROMEO: What light"], 16)[0]
  assert out["output_ids"] == ar.output_ids


@pytest.mark.parametrize("case", ["other_base", "bad_tree", "deep_tree", "no_heads_format"])
def test_decode_cli_bad_spec_input(setup, case, tmp_path):
  args = ["--model", setup["model_dir"], "--prompt", "hi", "--max-new-tokens", "4"]
  if case == "other_base":
    args += ["--heads", setup["other_heads"]]
    expect = "hidden size"
  elif case == "bad_tree":
    bad = tmp_path / "tree.json"
    bad.write_text(json.dumps([[0], [0, 1, 2]]))
    args += ["--heads", setup["heads_dir"], "--tree", str(bad)]
    expect = "prefix"
  elif case == "deep_tree":
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps([[0] * d for d in range(1, 6)]))
    args += ["--heads", setup["heads_dir"], "--tree", str(deep)]
    expect = "heads"
  else:
    empty = tmp_path / "empty_heads"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    args += ["--heads", str(empty)]
    expect = "heads"
  res = _cli(*args)
  assert res.returncode == 2, res.stderr
  assert "Traceback" not in res.stderr
  assert expect in res.stderr
