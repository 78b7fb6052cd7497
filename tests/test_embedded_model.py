"""The shipped base model (hydra_jax/assets/tiny_shakespeare) against transformers, and the
pretraining pipeline that made it (hydra_jax/pretrain.py).

The model must load in both stacks and agree: f32 logits (half-precision weights upcast),
greedy continuations from our jitted decoder and from transformers' `generate`, a tokenizer
that round-trips Shakespeare, a directory small enough to ship, and a model that actually
learned (held-out loss far below a numpy unigram baseline). Those tests are skipped, with
the command that builds it, when the directory is absent. The pipeline tests run a tiny
model: the split, the tokenizer, and a run that resumes from its checkpoint bit-exactly.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hydra_jax  # noqa: E402
from hydra_jax.checkpoint.hf import load_hf_model  # noqa: E402
from hydra_jax.model.llama import LlamaModel  # noqa: E402
from hydra_jax.registry import embedded  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(os.path.dirname(os.path.abspath(hydra_jax.__file__)), "assets",
                      "tiny_shakespeare")
DATA = embedded.corpus_path()
MAX_BYTES = 30 * 1024 * 1024
LINE = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun."

needs_assets = pytest.mark.skipif(
    not os.path.isfile(os.path.join(ASSETS, "config.json")),
    reason=f"the embedded model is not built ({ASSETS} has no config.json); build it with "
           f"`python scripts/pretrain_base.py --workdir /tmp/pretrain_run "
           f"--export_dir hydra_jax/assets/tiny_shakespeare`")


@pytest.fixture(scope="module")
def ours():
  return load_hf_model(ASSETS)  # f32 params, f32 compute


@pytest.fixture(scope="module")
def theirs():
  model = transformers.AutoModelForCausalLM.from_pretrained(ASSETS, dtype=torch.float32)
  return model.eval()


@needs_assets
def test_size_and_precision():
  total = sum(os.path.getsize(os.path.join(ASSETS, f)) for f in os.listdir(ASSETS))
  assert total < MAX_BYTES, f"{ASSETS} is {total / 1e6:.1f} MB; it must stay under 30 MB"
  with open(os.path.join(ASSETS, "model.safetensors"), "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
  assert dtypes <= {"BF16", "F16"}, f"shipped weights should be half precision, got {dtypes}"
  assert os.path.isfile(os.path.join(ASSETS, "README.md")), "the model card is missing"


@needs_assets
def test_tokenizer_round_trips(ours):
  tok = ours.tokenizer
  ids = tok(LINE)["input_ids"]
  assert tok.decode(ids) == LINE
  assert len(ids) < len(LINE) / 2, "BPE should compress Shakespeare well below 2 chars/token"
  assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
  assert len(tok) == ours.config.vocab_size
  hf_tok = transformers.AutoTokenizer.from_pretrained(ASSETS)
  assert hf_tok(LINE)["input_ids"] == ids


@needs_assets
def test_logits_match_transformers(ours, theirs):
  ids = np.asarray([ours.tokenizer(LINE)["input_ids"]], np.int32)
  t = ids.shape[1]
  positions = np.arange(t, dtype=np.int32)[None, :]
  logits, _, _ = LlamaModel(ours.config).apply({"params": ours.params}, jnp.asarray(ids),
                                               jnp.asarray(positions))
  with torch.no_grad():
    ref = theirs(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  logits = np.asarray(logits)
  scale = np.abs(ref).max()
  assert np.abs(logits - ref).max() <= 1e-4 * scale, np.abs(logits - ref).max()
  np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))


@needs_assets
def test_greedy_matches_transformers(ours, theirs):
  prompt = ours.tokenizer("ROMEO:\n")["input_ids"]
  got = hydra_jax.generate(ours, [prompt], max_new_tokens=20)[0]
  with torch.no_grad():
    ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False, pad_token_id=3)[0, len(prompt):].tolist()
  assert got.output_ids == ref, (ours.tokenizer.decode(got.output_ids),
                                 ours.tokenizer.decode(ref))


@needs_assets
def test_learned_beyond_unigram(ours):
  """Held-out loss against the closed-form baseline: add-one unigram counts of the train
  split. The split is recomputed from the text; the model card states the same one."""
  if not os.path.isfile(DATA):
    pytest.skip(f"{DATA} is missing")
  from hydra_jax.registry.embedded import split_text
  with open(DATA, encoding="utf-8") as f:
    train_text, val_text = split_text(f.read(), 0.1)
  enc = ours.tokenizer.backend_tokenizer
  train_ids = np.asarray(enc.encode(train_text).ids)
  val_ids = np.asarray(enc.encode(val_text[:20_000]).ids)
  counts = np.bincount(train_ids, minlength=ours.config.vocab_size) + 1.0
  unigram = -np.mean(np.log(counts / counts.sum())[val_ids[1:]])
  windows = val_ids[:4 * 129].reshape(4, 129)
  inputs = jnp.asarray(windows[:, :-1], jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(128, dtype=jnp.int32)[None, :], (4, 128))
  logits, _, _ = LlamaModel(ours.config).apply({"params": ours.params}, inputs, positions)
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.mean(np.take_along_axis(logp, windows[:, 1:, None], axis=-1))
  # A model that only learned token frequencies would sit at the unigram loss.
  assert nll < unigram - 1.0, (nll, unigram)


# --- the pipeline, on a tiny model -----------------------------------------------------------

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, seq_len=32, batch_size=4, warmup_steps=2, eval_every=3,
            eval_windows=4, checkpoint_every=2, max_position_embeddings=64)


def _tiny_data(tmp_path):
  """The first 60k characters of the corpus (or the testing fallback text)."""
  from hydra_jax.tools.testing import _corpus_text
  path = tmp_path / "text.txt"
  path.write_text(_corpus_text(60_000))
  return str(path)


def test_split_and_tokenizer(tmp_path):
  from hydra_jax.recipes.pretrain import encode, train_tokenizer
  from hydra_jax.registry.embedded import split_text
  text = "A:\nhello there\n\nB:\ngood day\n\nC:\nfarewell\n\nD:\nadieu\n"
  train, val = split_text(text, 0.3)
  assert train + val == text and val.startswith("D:"), "val must start at a speech"
  with pytest.raises(ValueError, match="val_fraction"):
    split_text(text, 0.0)
  with open(_tiny_data(tmp_path)) as f:
    train, val = split_text(f.read(), 0.1)
  tok = train_tokenizer(train, 300)
  assert len(tok) == 300
  assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
  ids = encode(tok, val[:500])
  assert ids.dtype == np.int32 and tok.decode(ids.tolist()) == val[:500]
  assert 1 not in ids and 2 not in ids, "the training stream has no BOS/EOS"
  tok.save_pretrained(tmp_path / "tok")
  again = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
  assert again(val[:500])["input_ids"] == ids.tolist()
  rendered = again.apply_chat_template([{"role": "user", "content": "Speak."}], tokenize=False,
                                       add_generation_prompt=True)
  assert rendered == "First Citizen:\nSpeak.\n\nMENENIUS:\n"


@pytest.mark.slow
def test_pretrain_resumes_exactly(tmp_path):
  """A run stopped after 2 steps and resumed ends where an uninterrupted run ends, and its
  export loads in transformers with the same logits."""
  from hydra_jax.recipes.pretrain import PretrainConfig, pretrain
  data = _tiny_data(tmp_path)
  full = pretrain(PretrainConfig(data=data, workdir=str(tmp_path / "a"), steps=6, **TINY))
  # A 1e-9 minute budget is spent by the first timed step (the 2nd; the 1st is compile).
  part = pretrain(PretrainConfig(data=data, workdir=str(tmp_path / "b"), steps=6,
                                 minutes=1e-9, **TINY))
  assert part["stopped_early"] and part["steps_done"] == 2
  resumed = pretrain(PretrainConfig(data=data, workdir=str(tmp_path / "b"), steps=6, **TINY))
  assert resumed["steps_done"] == 6
  assert resumed["final_val_loss"] == full["final_val_loss"]
  assert resumed["final_train_loss"] == full["final_train_loss"]
  assert full["final_val_loss"] < full["evals"][0]["val_loss"], "the loss did not go down"
  export = tmp_path / "a" / "export"
  assert (export / "README.md").read_text().count(f"{full['final_val_loss']:.4f}") >= 1
  ours = load_hf_model(str(export))
  theirs = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
  ids = np.asarray([ours.tokenizer("First Citizen:\nSpeak.")["input_ids"]], np.int32)
  t = ids.shape[1]
  logits, _, _ = LlamaModel(ours.config).apply(
      {"params": ours.params}, jnp.asarray(ids), jnp.arange(t, dtype=jnp.int32)[None, :])
  with torch.no_grad():
    ref = theirs(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4 * np.abs(ref).max())
