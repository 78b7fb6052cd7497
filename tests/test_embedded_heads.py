"""The shipped draft heads of the embedded model, and the data they were trained on.

- The head-training configs read the TRAINING split only: its text is exactly the part of the
  corpus before the model card's cut, and no held-out speech is in it.
- The held-out benchmark prompts come from the held-out tail and never from the training text.
- Every shipped heads directory loads for the embedded model (bf16 on disk, f32 on load), and
  speculative decoding with it reproduces plain greedy decoding while accepting drafts: a
  check that the shipped heads are trained, not random (random heads accept almost nothing).
"""

import json
import os

import jax
import numpy as np
import pytest

from hydra_jax.registry import embedded

needs_model = pytest.mark.skipif(
    not os.path.isfile(os.path.join(embedded.MODEL_DIR, "config.json")),
    reason="the embedded model is not built (see hydra_jax/assets/tiny_shakespeare/README.md)")
needs_heads = pytest.mark.skipif(
    len(embedded.heads_dirs()) < len(embedded.HEAD_KINDS),
    reason="the embedded heads are not shipped yet (see configs/embedded_*.py)")


def _corpus():
  with open(embedded.corpus_path(), encoding="utf-8") as f:
    return f.read()


@needs_model
def test_training_split_excludes_the_held_out_text():
  text = _corpus()
  with open(embedded.train_split_file(), encoding="utf-8") as f:
    train = f.read()
  cut = len(train)
  assert text[:cut] == train and cut < len(text)
  heldout = text[cut:]
  # The model card's numbers, written by the pretraining run, not by this module.
  with open(os.path.join(embedded.MODEL_DIR, "README.md"), encoding="utf-8") as f:
    card = f.read()
  assert f"{cut:,}" in card and f"{len(heldout):,}" in card
  assert heldout.startswith(card.split("starting at the speech beginning `")[1].split("`")[0])
  # Long held-out lines never occur in the training text.
  long_lines = [x for x in heldout.split("\n") if len(x) > 45][:200]
  assert long_lines and not [x for x in long_lines if x in train]


def test_configs_train_on_self_distilled_training_split(tmp_path, monkeypatch):
  """The three configs share one recipe on the base's greedy replies to TRAINING speeches."""
  from hydra_jax.registry.paths import REPO_ROOT
  import importlib.util
  monkeypatch.setenv("HYDRA_CACHE", str(tmp_path))

  def load(kind):
    spec = importlib.util.spec_from_file_location(
        kind, os.path.join(REPO_ROOT, "configs", f"embedded_{kind}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()

  # Loading a config needs no data (a fresh machine has none); training it says how to make it.
  from hydra_jax.training.data import build_datasets
  from hydra_jax.training.errors import DataFileNotFoundError
  cfgs = {kind: load(kind) for kind in embedded.HEAD_KINDS}
  assert not os.path.exists(embedded.self_distill_file())
  with pytest.raises(DataFileNotFoundError,
                     match=r"does not exist: write the heads' training data first with "
                           r"`python -m hydra_jax\.recipes\.embedded --self-distill`"):
    build_datasets(cfgs["hydra"].data, None, seq_len=cfgs["hydra"].seq_len,
                   global_batch_size=8, seed=0, process_index=0, process_count=1)
  for kind, cfg in cfgs.items():
    assert cfg.data.source == "sharegpt" and cfg.data.template == "plain"
    assert cfg.heads.lm_head == "own" and cfg.heads.draft_vocab_size == 1024
    assert cfg.data.path == embedded.self_distill_file()
    assert cfg.model_path == embedded.MODEL_DIR and cfg.heads.num_heads == 4
    assert cfg.train.loss == ("teacher" if kind == "hydra_pp" else "hard")
  shared = lambda c: (c.num_steps, c.global_batch_size, c.seq_len, c.optimizer.to_dict())
  assert len({repr(shared(c)) for c in cfgs.values()}) == 1
  train, heldout = embedded.split_corpus()
  prompts = embedded.self_distill_prompts(300)
  assert len(set(prompts)) == 300 and all(p in train for p in prompts)
  assert prompts == embedded.self_distill_prompts(300)  # deterministic


@needs_model
def test_heldout_prompts_come_from_the_held_out_split():
  train, heldout = embedded.split_corpus()
  with open(embedded.PROMPTS_FILE, encoding="utf-8") as f:
    prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
  assert 24 <= len(prompts) <= 32
  for p in prompts:
    assert p in heldout
    assert p not in train


@needs_model
@needs_heads
def test_shipped_heads_load_and_decode_losslessly():
  from hydra_jax.checkpoint.heads_io import read_heads_meta
  from hydra_jax.decoding import api
  model = api.load_model(embedded.MODEL_DIR)
  prompt = "PETRUCHIO:\nI pray you, sir, let me be so bold\n"
  [ar] = api.generate(model, prompt, 24, mode="ar")
  total = 0
  for kind, path in embedded.heads_dirs().items():
    meta = read_heads_meta(path)
    assert meta["param_dtype"] == "bfloat16"
    assert meta["extra"]["trained_steps"] > 0 and "eval" in meta["extra"]
    cfg, params = api.load_draft_heads(model, path)
    assert cfg.num_heads == 4 and cfg.arch == {"medusa": "medusa", "hydra": "hydra",
                                               "hydra_pp": "hydra++"}[kind]
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]
    assert all(x.dtype == np.float32 for x in leaves)
    total += sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    [sp] = api.generate(model, prompt, 24, heads=(cfg, params), tree="greedy_15")
    assert sp.output_ids == ar.output_ids, kind
    assert sp.extra["accept_length"] > 1.3, (kind, sp.extra["accept_length"])
  assert total < 32e6, f"the shipped heads take {total / 1e6:.1f} MB"
