"""Hugging Face checkpoints: loading (f32/fp16/bf16, sharded), export back, tokenizer, and
every kind of bad input, each refused with an error that names the key, the file or the fix.

References are transformers' own `save_pretrained` / `from_pretrained` on tiny random models.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from hydra_jax.checkpoint.hf import (CheckpointError, expected_hf_keys, export_hf,  # noqa: E402
                                     load_hf_model)
from hydra_jax.model.config import ModelConfig, UnsupportedModelError, to_hf_config  # noqa: E402
from hydra_jax.model.llama import LlamaModel, init_params  # noqa: E402
from hydra_jax.tools.testing import SIMPLE_CHAT_TEMPLATE, make_hf_model, make_tokenizer  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, vocab_size=256)
WEIGHTS = "model.safetensors"


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()


def _our_logits(loaded, tokens: np.ndarray) -> np.ndarray:
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  model = LlamaModel(loaded.config)
  return np.asarray(jax.jit(lambda p: model.apply({"params": p}, tokens, positions)[0])(
      loaded.params))


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                  err_msg=jax.tree_util.keystr(path))


TOKENS = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def llama(root):
  """A random tiny Llama (f32) with a tokenizer that has a chat template."""
  path = str(root / "llama")
  model = make_hf_model(path, chat_template=SIMPLE_CHAT_TEMPLATE, **TINY)
  return path, model


@pytest.fixture(scope="module")
def qwen2(root):
  """Tied embeddings and q/k/v biases: the layouts that differ from plain Llama."""
  path = str(root / "qwen2")
  model = make_hf_model(path, model_type="qwen2", tie_word_embeddings=True, tokenizer=False,
                        seed=4, **TINY)
  return path, model


@pytest.fixture(scope="module")
def llama3_rope(root):
  """Llama-3 rope scaling: the exported config must carry it in a form transformers reads."""
  path = str(root / "llama3")
  rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
  model = make_hf_model(path, tokenizer=False, rope_scaling=rope, rope_theta=500000.0, seed=6,
                        **TINY)
  return path, model


@pytest.fixture(scope="module")
def mistral(root):
  path = str(root / "mistral")
  return path, make_hf_model(path, model_type="mistral", tokenizer=False, seed=7, **TINY)


def _copy(src: str, dst) -> str:
  dst = str(dst)
  shutil.copytree(src, dst)
  return dst


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama", "qwen2", "llama3_rope", "mistral"])
def test_export_then_transformers_reload_gives_same_logits(request, tmp_path, which):
  path, torch_model = request.getfixturevalue(which)
  loaded = load_hf_model(path)
  out = str(tmp_path / "exported")
  export_hf(loaded.params, loaded.config, out, tokenizer=loaded.tokenizer)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(torch_model)
  # f32 export is lossless: identical weights, identical logits.
  ref_sd, got_sd = torch_model.state_dict(), reloaded.state_dict()
  assert set(ref_sd) == set(got_sd)
  for key in ref_sd:
    assert torch.equal(ref_sd[key], got_sd[key]), key
  assert reloaded.config.rope_parameters == torch_model.config.rope_parameters
  # 16 tokens: beyond the llama3 case's original context of 8.
  tokens = np.concatenate([TOKENS, TOKENS[:, :4]], axis=1)
  np.testing.assert_array_equal(_torch_logits(reloaded, tokens), _torch_logits(torch_model, tokens))
  # And our loader reads our own export back to the same params.
  _leaves_equal(load_hf_model(out, tokenizer=False).params, loaded.params)


def test_export_of_our_own_params_runs_the_same_in_transformers(tmp_path):
  """Params that never came from HF (as the demo builds them): export, run in torch, compare."""
  cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
                    bos_token_id=1, eos_token_ids=(2,), pad_token_id=3)
  rng = np.random.RandomState(0)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.randn(*s.shape) * 0.1 + (s.ndim == 1), jnp.float32), shapes)
  export_hf(params, cfg, str(tmp_path), tokenizer=make_tokenizer(cfg.vocab_size))
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  tokens = TOKENS % cfg.vocab_size
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  model = LlamaModel(cfg)
  ours = np.asarray(jax.jit(lambda p: model.apply({"params": p}, tokens, positions)[0])(params))
  ref = _torch_logits(torch_model, tokens)
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert tok.eos_token_id == 2 and tok.pad_token_id == 3


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_export_loads_in_transformers_and_back(llama, tmp_path, dtype):
  path, _ = llama
  loaded = load_hf_model(path, tokenizer=False)
  export_hf(loaded.params, loaded.config, str(tmp_path), dtype=dtype)
  torch_dtype = getattr(torch, dtype)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch_dtype)
  np_dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
  w_ours = np.asarray(loaded.params["layers_1"]["mlp"]["gate_up_proj"]["kernel"])[:, 1].T
  w_torch = reloaded.model.layers[1].mlp.up_proj.weight
  assert w_torch.dtype == torch_dtype
  np.testing.assert_array_equal(w_torch.detach().float().numpy(),
                                w_ours.astype(np_dtype).astype(np.float32))
  assert np.all(np.isfinite(_torch_logits(reloaded, TOKENS)))
  # Our loader reads the half-precision file back to exactly the rounded values.
  back = load_hf_model(str(tmp_path), tokenizer=False).params
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(np_dtype).astype(np.float32),
                         loaded.params)
  _leaves_equal(back, rounded)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_load_half_precision_checkpoint(tmp_path, dtype):
  torch_model = make_hf_model(str(tmp_path), tokenizer=False, torch_dtype=dtype, seed=5, **TINY)
  assert torch_model.dtype == getattr(torch, dtype)
  # Upcast on load: exactly the stored values.
  loaded = load_hf_model(str(tmp_path), tokenizer=False)
  w = loaded.params["layers_0"]["self_attn"]["o_proj"]["kernel"]
  assert w.dtype == jnp.float32
  ref = torch_model.model.layers[0].self_attn.o_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(w).reshape(-1, ref.shape[0]).T, ref)
  # Reference: transformers' f32 model on the stored weights, loaded fresh (casting the half
  # model with .float() would keep its RoPE inv_freq buffer rounded to half precision).
  f32_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                                dtype=torch.float32).eval()
  ref_logits = _torch_logits(f32_model, TOKENS)
  ours = _our_logits(loaded, TOKENS)
  assert np.abs(ours - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
  # Keeping the stored precision: bf16 params.
  half = load_hf_model(str(tmp_path), param_dtype=jnp.bfloat16, tokenizer=False)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half.params))


def test_sharded_checkpoint_equals_single_file(llama, tmp_path):
  path, torch_model = llama
  sharded = str(tmp_path / "sharded")
  torch_model.save_pretrained(sharded, max_shard_size="20KB")
  files = os.listdir(sharded)
  assert "model.safetensors.index.json" in files and WEIGHTS not in files
  assert sum(f.endswith(".safetensors") for f in files) > 2
  _leaves_equal(load_hf_model(sharded, tokenizer=False).params,
                load_hf_model(path, tokenizer=False).params)


def test_tokenizer_with_chat_template_is_loaded(llama, qwen2):
  path, _ = llama
  tok = load_hf_model(path).tokenizer
  assert tok is not None and tok.eos_token_id == 2
  assert tok.chat_template == SIMPLE_CHAT_TEMPLATE
  text = tok.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                 add_generation_prompt=True, tokenize=False)
  assert text == "USER: Hello there ASSISTANT:"
  ids = tok("First Citizen:")["input_ids"]
  assert tok.decode(ids) == "First Citizen:"
  # A directory without tokenizer files: no tokenizer, not an error.
  assert load_hf_model(qwen2[0]).tokenizer is None
  assert load_hf_model(path, tokenizer=False).tokenizer is None


def test_expected_keys_match_transformers(llama, qwen2):
  for path, torch_model in (llama, qwen2):
    cfg = load_hf_model(path, tokenizer=False).config
    hf_keys = set(torch_model.state_dict())
    if cfg.tie_word_embeddings:
      hf_keys.discard("lm_head.weight")  # tied: not saved
    assert set(expected_hf_keys(cfg)) == hf_keys


# --- bad input -------------------------------------------------------------------------------


def _edit_weights(path: str, edit) -> str:
  fname = os.path.join(path, WEIGHTS)
  tensors = load_file(fname)
  edit(tensors)
  save_file(tensors, fname, metadata={"format": "pt"})
  return fname


def _edit_config(path: str, **changes) -> None:
  fname = os.path.join(path, "config.json")
  with open(fname) as f:
    hf = json.load(f)
  for k, v in changes.items():
    if v is _DELETE:
      hf.pop(k, None)
    else:
      hf[k] = v
  with open(fname, "w") as f:
    json.dump(hf, f)


_DELETE = object()


def test_missing_directory(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(CheckpointError, match=r"nope.*does not exist.*config\.json"):
    load_hf_model(missing)


def test_missing_config(llama, tmp_path):
  path = _copy(llama[0], tmp_path / "m")
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(CheckpointError, match=r"config\.json is missing"):
    load_hf_model(path)


def test_invalid_config_json(llama, tmp_path):
  path = _copy(llama[0], tmp_path / "m")
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
    load_hf_model(path)


def test_missing_weights(llama, tmp_path):
  path = _copy(llama[0], tmp_path / "m")
  os.remove(os.path.join(path, WEIGHTS))
  with pytest.raises(CheckpointError, match=r"no weights in .*model\.safetensors"):
    load_hf_model(path)
  # PyTorch pickles are not read, but the error says how to convert them.
  open(os.path.join(path, "pytorch_model.bin"), "wb").close()
  with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*save_pretrained"):
    load_hf_model(path)


def test_missing_tensor(llama, tmp_path):
  path = _copy(llama[0], tmp_path / "m")
  _edit_weights(path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
  with pytest.raises(CheckpointError,
                     match=r"missing tensor.*model\.safetensors.*model\.layers\.1\.mlp\.down_proj"):
    load_hf_model(path)


def test_extra_tensor(llama, tmp_path):
  path = _copy(llama[0], tmp_path / "m")

  def add(t):
    t["model.layers.0.self_attn.rotary_extra.weight"] = np.zeros((4,), np.float32)
  _edit_weights(path, add)
  with pytest.raises(CheckpointError,
                     match=r"unexpected tensor model\.layers\.0\.self_attn\.rotary_extra\.weight "
                           r"in .*model\.safetensors"):
    load_hf_model(path)


def test_extra_layer_and_untied_head(llama, qwen2, tmp_path):
  """Known names that this config does not have: a third layer, an lm_head when tied."""
  path = _copy(llama[0], tmp_path / "layers")

  def add_layer(t):
    t["model.layers.2.input_layernorm.weight"] = t["model.layers.0.input_layernorm.weight"]
  _edit_weights(path, add_layer)
  with pytest.raises(CheckpointError, match=r"model\.layers\.2\..*only 2 layers"):
    load_hf_model(path)
  path = _copy(qwen2[0], tmp_path / "tied")

  def add_head(t):
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
  _edit_weights(path, add_head)
  with pytest.raises(CheckpointError, match=r"lm_head\.weight.*ties the embeddings"):
    load_hf_model(path)


def test_wrong_shape(llama, tmp_path):
  path = _copy(llama[0], tmp_path / "m")

  def shrink(t):
    key = "model.layers.0.self_attn.k_proj.weight"
    t[key] = t[key][:8].copy()  # one kv head instead of two
  _edit_weights(path, shrink)
  with pytest.raises(CheckpointError,
                     match=r"model\.layers\.0\.self_attn\.k_proj\.weight in .*model\.safetensors "
                           r"has shape \(8, 32\).*\(16, 32\)"):
    load_hf_model(path)


def test_unsupported_model_type(llama, tmp_path):
  path = _copy(llama[0], tmp_path / "m")
  _edit_config(path, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=32)
  with pytest.raises(UnsupportedModelError, match=r"config\.json.*model_type 'gpt2'.*llama"):
    load_hf_model(path)


def test_llama_attention_bias_is_refused(llama, tmp_path):
  """HF's llama attention_bias also biases o_proj, which this model does not have."""
  path = _copy(llama[0], tmp_path / "m")
  _edit_config(path, attention_bias=True)
  with pytest.raises(UnsupportedModelError, match=r"config\.json.*attention_bias.*o_proj"):
    load_hf_model(path)
  # Nor can a llama config.json express the q/k/v-only biases our config means.
  cfg = load_hf_model(llama[0], tokenizer=False).config
  with pytest.raises(UnsupportedModelError, match=r"export as qwen2"):
    to_hf_config(cfg.replace(attention_bias=True))


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_unsupported_rope_type(llama, tmp_path, spelling):
  path = _copy(llama[0], tmp_path / "m")
  yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
  if spelling == "rope_parameters":  # transformers 5
    _edit_config(path, rope_parameters=dict(yarn, rope_theta=10000.0), rope_scaling=_DELETE)
  else:  # transformers 4 configs on the Hub
    _edit_config(path, rope_parameters=_DELETE, rope_scaling=yarn, rope_theta=10000.0)
  with pytest.raises(UnsupportedModelError, match=r"config\.json.*rope type 'yarn'"):
    load_hf_model(path)


def test_sliding_window_is_refused_unless_it_covers_the_context(tmp_path):
  path = str(tmp_path / "mistral")
  make_hf_model(path, model_type="mistral", tokenizer=False, max_position_embeddings=512,
                sliding_window=8, **TINY)
  with pytest.raises(UnsupportedModelError, match=r"sliding.window.*8.*512.*sliding_window"):
    load_hf_model(path)
  # A window as long as the context is full attention: loads.
  _edit_config(path, sliding_window=512)
  assert load_hf_model(path, tokenizer=False).config.sliding_window is None
  # Qwen2 spells it use_sliding_window.
  _edit_config(path, model_type="qwen2", use_sliding_window=True, sliding_window=16)
  with pytest.raises(UnsupportedModelError, match=r"sliding"):
    load_hf_model(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(llama, tmp_path, damage):
  path = _copy(llama[0], tmp_path / "m")
  fname = os.path.join(path, WEIGHTS)
  with open(fname, "rb") as f:
    blob = f.read()
  with open(fname, "wb") as f:
    f.write(blob[:len(blob) // 2] if damage == "truncated" else b"\x00garbage" * 100)
  with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt"):
    load_hf_model(path)


def test_sharded_index_problems(llama, tmp_path):
  _, torch_model = llama
  path = str(tmp_path / "sharded")
  torch_model.save_pretrained(path, max_shard_size="20KB")
  index_file = os.path.join(path, "model.safetensors.index.json")
  with open(index_file) as f:
    index = json.load(f)
  shard = index["weight_map"]["model.norm.weight"]
  # A tensor stored in two shards.
  save_file({"model.norm.weight": np.ones((TINY["hidden_size"],), np.float32)},
            os.path.join(path, "extra.safetensors"), metadata={"format": "pt"})
  with open(index_file, "w") as f:
    json.dump(dict(index, weight_map=dict(index["weight_map"], other="extra.safetensors")), f)
  with pytest.raises(CheckpointError, match=r"model\.norm\.weight appears twice.*safetensors"):
    load_hf_model(path)
  # A shard that the index names but that is not there.
  with open(index_file, "w") as f:
    json.dump(index, f)
  os.remove(os.path.join(path, shard))
  with pytest.raises(CheckpointError, match=rf"index\.json names shard {shard}.*missing"):
    load_hf_model(path)
