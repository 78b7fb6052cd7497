"""GGUF loading against transformers' own GGUF loading, on synthetic and on a real model.

Synthetic files are written the way llama.cpp's convert_hf_to_gguf writes them: gguf's own
tensor-name map, the q/k row permutation for llama, norms in F32, 2-D weights in F32 / F16 /
BF16 / Q8_0 / Q4_0 / Q4_1 (gguf's quantize) or K-quants (random blocks: gguf cannot quantize
to them), the tokenizer as `tokenizer.ggml.*` metadata. The reference is
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` and the original torch model.
The real model is SmolLM2-135M-Instruct from `hydra_jax.registry.models` (skipped when the registry is
unreachable).

The writer helpers here need no torch (tests/test_models_registry.py reuses them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from hydra_jax.checkpoint.gguf import (convert_gguf_to_hf, expected_gguf_tensors,  # noqa: E402
                                       load_gguf_model, open_gguf, read_gguf_tokenizer)
from hydra_jax.checkpoint.hf import CheckpointError, load_hf_model, load_tokenizer  # noqa: E402
from hydra_jax.model.config import UnsupportedModelError  # noqa: E402
from hydra_jax.model.llama import LlamaModel  # noqa: E402
from hydra_jax.tools.testing import SIMPLE_CHAT_TEMPLATE, make_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
REL_TOL = 1e-5  # f32 parity: max |ours - ref| <= REL_TOL * max |ref|
TOKENS = np.random.RandomState(0).randint(4, 512, (2, 24)).astype(np.int32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- writing GGUFs the llama.cpp way (numpy only) -----------------------------------------------


def hf_config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, tie=False, rope_theta=10000.0, **extra) -> dict:
  return dict(vocab_size=vocab_size, hidden_size=hidden_size,
              intermediate_size=intermediate_size, num_hidden_layers=num_layers,
              num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
              tie_word_embeddings=tie, rope_theta=rope_theta, rms_norm_eps=1e-5,
              max_position_embeddings=256, **extra)


def random_state(cfg: dict, seed: int = 0, bias: bool = False) -> dict:
  """A random HF-named state dict (torch layout [out, in]) for a Llama of `cfg`."""
  rng = np.random.RandomState(seed)
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  hd = d // cfg["num_attention_heads"]
  nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
  w = lambda *s: (rng.randn(*s) * 0.1).astype(np.float32)  # noqa: E731
  norm = lambda: rng.uniform(0.8, 1.2, (d,)).astype(np.float32)  # noqa: E731
  out = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": norm()}
  if not cfg["tie_word_embeddings"]:
    out["lm_head.weight"] = w(v, d)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out.update({p + "self_attn.q_proj.weight": w(nq, d), p + "self_attn.k_proj.weight": w(nkv, d),
                p + "self_attn.v_proj.weight": w(nkv, d), p + "self_attn.o_proj.weight": w(d, nq),
                p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                p + "mlp.down_proj.weight": w(d, f), p + "input_layernorm.weight": norm(),
                p + "post_attention_layernorm.weight": norm()})
    if bias:
      out.update({p + "self_attn.q_proj.bias": w(nq), p + "self_attn.k_proj.bias": w(nkv),
                  p + "self_attn.v_proj.bias": w(nkv)})
  return out


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf.LlamaModel.permute, verbatim in numpy."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _random_kquant(shape, qtype, rng) -> np.ndarray:
  """Random but valid K-quant blocks (small finite f16 scales) for a [rows, cols] tensor."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  rows, cols = shape
  raw = rng.randint(0, 256, (rows, cols // block, size)).astype(np.uint8)
  scales = rng.uniform(1e-3, 4e-3, (rows, cols // block, 2)).astype(np.float16).view(np.uint8)
  if qtype == Q.Q4_K:  # d, dmin lead the block
    raw[..., 0:2], raw[..., 2:4] = scales[..., 0:2], scales[..., 2:4]
  elif qtype == Q.Q6_K:  # d ends the block
    raw[..., -2:] = scales[..., 0:2]
  else:
    raise ValueError(qtype)
  return raw.reshape(rows, -1)


def _encode(arr: np.ndarray, qtype, rng):
  if qtype == Q.F32:
    return arr.astype(np.float32), None
  if qtype == Q.F16:
    return arr.astype(np.float16), None
  if qtype in (Q.Q4_K, Q.Q6_K):
    return _random_kquant(arr.shape, qtype, rng), qtype
  return gguf.quantize(arr.astype(np.float32), qtype), qtype


def tokenizer_meta(vocab_size: int = 512, chat_template: str = SIMPLE_CHAT_TEMPLATE) -> dict:
  """The tokenizer.ggml.* fields llama.cpp writes for a byte-level BPE vocabulary."""
  tok = make_tokenizer(vocab_size)
  tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
  merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
  special = {tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
  types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
           for i in range(len(tokens))]
  for i in range(len(tokens), vocab_size):  # llama.cpp pads a short vocabulary like this
    tokens.append(f"[PAD{i}]")
    types.append(int(gguf.TokenType.UNUSED))
  return dict(tokens=tokens, merges=merges, types=types, bos=tok.bos_token_id,
              eos=tok.eos_token_id, unk=tok.unk_token_id, pad=tok.pad_token_id,
              chat_template=chat_template)


def write_gguf(path: str, cfg: dict, state: dict, arch: str = "llama", qtype_of=None,
               tok: dict = None, edit=None, meta=None, rope_freqs=None, seed: int = 0) -> str:
  """Writes `state` as llama.cpp does. `qtype_of(gguf_name, array)` picks each tensor's type
  (default F32); `edit(list of (name, data, raw_dtype))` can add / drop / change tensors;
  `meta(writer)` can add metadata."""
  rng = np.random.RandomState(seed)
  model_arch = gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA
  names = gguf.get_tensor_name_map(model_arch, cfg["num_hidden_layers"])
  w = gguf.GGUFWriter(path, arch)
  w.add_name("synthetic")
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_rope_freq_base(cfg["rope_theta"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
  w.add_vocab_size(cfg["vocab_size"])
  if meta is not None:
    meta(w)
  if tok is not None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_unk_token_id(tok["unk"])
    w.add_pad_token_id(tok["pad"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok["chat_template"])
  items = []
  if rope_freqs is not None:
    items.append(("rope_freqs.weight", np.asarray(rope_freqs, np.float32), None))
  for key, arr in state.items():
    if key == "lm_head.weight" and cfg["tie_word_embeddings"]:
      continue  # llama.cpp writes no output tensor for tied embeddings
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
      heads = cfg["num_attention_heads"] if "q_proj" in key else cfg["num_key_value_heads"]
      arr = llama_cpp_permute(arr, heads)
    qtype = Q.F32 if arr.ndim == 1 or qtype_of is None else qtype_of(name, arr)
    items.append((name, *_encode(arr, qtype, rng)))
  if edit is not None:
    items = edit(items)
  for name, data, raw in items:
    w.add_tensor(name, data, raw_dtype=raw)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


# --- references ------------------------------------------------------------------------------


def our_logits(m, tokens: np.ndarray) -> np.ndarray:
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  model = LlamaModel(m.config)
  return np.asarray(jax.jit(lambda p: model.apply({"params": p}, tokens, positions)[0])(m.params))


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()


def transformers_gguf(path: str):
  torch = pytest.importorskip("torch")
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def transformers_original(cfg: dict, state: dict, model_type: str = "llama"):
  """The torch model the GGUF was converted from (weights before quantisation)."""
  torch = pytest.importorskip("torch")
  import transformers
  cls_cfg, cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                  "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
  model = cls(cls_cfg(**cfg, bos_token_id=1, eos_token_id=2, pad_token_id=3)).eval()
  sd = {k: torch.from_numpy(v) for k, v in state.items()}
  if cfg["tie_word_embeddings"]:
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
  model.load_state_dict(sd, strict=True)
  return model


def assert_close(ours: np.ndarray, ref: np.ndarray, tol: float = REL_TOL) -> float:
  rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
  assert rel <= tol, f"max relative logits error {rel:.2e} > {tol:.0e}"
  return rel


def greedy_ref(model, prompt_ids, n: int, eos: int = 2, pad: int = 3):
  import torch
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad)
  return out[0, len(prompt_ids):].tolist()


# --- synthetic cases -------------------------------------------------------------------------

CASES = {
    # multi-head attention, untied head, every tensor F32: must equal the torch original too.
    "llama_f32": dict(cfg=dict(num_kv_heads=4), qtype_of=None),
    # GQA (4 q heads on 2 kv heads), tied embeddings, F16 embedding, Q8_0 / BF16 / Q4_0 / Q4_1.
    "llama_gqa_quant": dict(cfg=dict(tie=True), qtype_of=lambda n, a: (
        Q.F16 if n == "token_embd.weight" else Q.Q8_0 if "attn" in n else
        Q.BF16 if "ffn_down" in n else Q.Q4_1 if "ffn_up" in n else Q.Q4_0)),
    # K-quants need 256-wide rows: Q4_K for most weights and Q6_K for the output, as llama.cpp's
    # Q4_K_M does; multi-query attention (one kv head).
    "llama_kquant": dict(cfg=dict(hidden_size=256, intermediate_size=512, num_kv_heads=1),
                         qtype_of=lambda n, a: Q.Q6_K if n == "output.weight" else Q.Q4_K),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  root = tmp_path_factory.mktemp("gguf")
  built = {}

  def get(name):
    if name not in built:
      spec = CASES[name]
      cfg = hf_config(**spec["cfg"])
      state = random_state(cfg, seed=len(built))
      path = write_gguf(str(root / f"{name}.gguf"), cfg, state, qtype_of=spec["qtype_of"],
                        tok=tokenizer_meta(cfg["vocab_size"]))
      built[name] = (path, cfg, state)
    return built[name]
  return get


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_gguf_loading(zoo, name):
  path, cfg, state = zoo(name)
  ours = load_gguf_model(path)
  assert ours.config.num_kv_heads == cfg["num_key_value_heads"]
  assert ours.config.tie_word_embeddings == cfg["tie_word_embeddings"]
  assert_close(our_logits(ours, TOKENS), torch_logits(transformers_gguf(path), TOKENS))
  if CASES[name]["qtype_of"] is None:  # lossless file: the original model itself
    assert_close(our_logits(ours, TOKENS), torch_logits(transformers_original(cfg, state), TOKENS))


@pytest.mark.parametrize("name", ["llama_f32", "llama_gqa_quant"])
def test_greedy_tokens_match_transformers_generate(zoo, name):
  from hydra_jax.decoding.api import generate
  path, _, _ = zoo(name)
  ours, ref = load_gguf_model(path), transformers_gguf(path)
  prompts = [TOKENS[0, :7].tolist(), TOKENS[1, :12].tolist()]
  results = generate(ours, prompts, max_new_tokens=16, batch_size=2)
  for prompt, res in zip(prompts, results):
    assert res.output_ids == greedy_ref(ref, prompt, 16)


def test_tokenizer_matches_transformers_gguf_tokenizer(zoo):
  pytest.importorskip("torch")  # transformers' own GGUF reader needs torch
  from transformers import AutoTokenizer
  path, _, _ = zoo("llama_gqa_quant")
  ours = load_gguf_model(path).tokenizer
  ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  chat = ours.apply_chat_template([{"role": "user", "content": "Speak, speak."}], tokenize=False,
                                  add_generation_prompt=True)
  assert chat == ref.apply_chat_template([{"role": "user", "content": "Speak, speak."}],
                                         tokenize=False, add_generation_prompt=True)
  for text in ["First Citizen: hear me speak.", "  leading spaces\nand lines", "héllo 日本 🙂",
               chat, "</s><s> specials"]:
    ids = ours(text)["input_ids"]
    assert ids == ref(text)["input_ids"], text
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
  assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (2, 1, 3)
  assert ours.eos_token_id == ref.eos_token_id


def test_qwen2_biases_and_no_permutation(tmp_path):
  cfg = hf_config(tie=True, rope_theta=1e6)
  state = random_state(cfg, seed=5, bias=True)
  path = write_gguf(str(tmp_path / "qwen2.gguf"), cfg, state, arch="qwen2",
                    tok=tokenizer_meta(cfg["vocab_size"]))
  ours = load_gguf_model(path)
  assert ours.config.model_type == "qwen2" and ours.config.attention_bias
  ref = transformers_original(cfg, state, "qwen2")
  assert_close(our_logits(ours, TOKENS), torch_logits(ref, TOKENS))


def _llama3_factors(head_dim, theta, factor, low, high, orig):
  """convert_hf_to_gguf's rope_freqs for Llama-3 scaling, transcribed."""
  import math
  freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  out = []
  for f in freqs:
    wavelen = 2 * math.pi / f
    if wavelen < orig / high:
      out.append(1.0)
    elif wavelen > orig / low:
      out.append(factor)
    else:
      smooth = (orig / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


def test_llama3_rope_freqs_become_llama3_scaling(tmp_path):
  rope = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # short, so test sequences are "long"
  cfg = hf_config(rope_theta=50000.0)
  state = random_state(cfg, seed=6)
  factors = _llama3_factors(16, 50000.0, 4.0, 1.0, 4.0, 16)
  path = write_gguf(str(tmp_path / "l3.gguf"), cfg, state, rope_freqs=factors,
                    meta=lambda w: w.add_rope_scaling_orig_ctx_len(16))
  ours = load_gguf_model(path, tokenizer=False)
  assert ours.config.rope_scaling_dict["rope_type"] == "llama3"
  ref = transformers_original(dict(cfg, rope_scaling=rope), state)
  assert_close(our_logits(ours, TOKENS), torch_logits(ref, TOKENS))
  bad = write_gguf(str(tmp_path / "bad.gguf"), cfg, state, rope_freqs=np.linspace(1, 3, 8))
  with pytest.raises(UnsupportedModelError, match="rope_freqs.weight"):
    load_gguf_model(bad, tokenizer=False)


# --- conversion to a Hugging Face directory ---------------------------------------------------


def test_convert_cli_loads_back_in_ours_and_transformers(zoo, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers
  path, _, _ = zoo("llama_gqa_quant")
  out = tmp_path / "hf"
  proc = subprocess.run([sys.executable, "-m", "hydra_jax.checkpoint.gguf", path, str(out)],
                        capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1] == str(out)
  with open(out / "generation_config.json") as f:
    assert json.load(f)["eos_token_id"] == 2
  direct, back = load_gguf_model(path), load_hf_model(str(out))
  assert back.config == direct.config
  jax.tree.map(np.testing.assert_array_equal, direct.params, back.params)
  text = "hear me speak"
  assert back.tokenizer(text)["input_ids"] == direct.tokenizer(text)["input_ids"]
  assert back.tokenizer.chat_template == direct.tokenizer.chat_template
  ref = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  assert_close(our_logits(direct, TOKENS), torch_logits(ref, TOKENS))


def test_convert_bf16(zoo, tmp_path):
  path, _, _ = zoo("llama_f32")
  convert_gguf_to_hf(path, str(tmp_path / "bf16"), dtype="bfloat16")
  back = load_hf_model(str(tmp_path / "bf16"))
  direct = load_gguf_model(path, tokenizer=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b, np.float32),
                                                      rtol=1e-2, atol=1e-3),
               direct.params, back.params)
  with pytest.raises(CheckpointError, match="--overwrite"):
    convert_gguf_to_hf(path, str(tmp_path / "bf16"))


def test_loader_and_converter_need_no_torch(zoo, tmp_path):
  path, _, _ = zoo("llama_gqa_quant")
  script = (
      "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
      "from hydra_jax.checkpoint.gguf import load_gguf_model, main\n"
      f"m = load_gguf_model({path!r})\n"
      "print(m.tokenizer('hear me')['input_ids'], m.config.num_layers)\n"
      f"assert main([{path!r}, {str(tmp_path / 'out')!r}]) == 0\n")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.isfile(tmp_path / "out" / "model.safetensors")


# --- strictness ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  cfg = hf_config()
  return str(tmp_path_factory.mktemp("strict")), cfg, random_state(cfg, seed=7)


def _variant(small, name, **kw):
  root, cfg, state = small
  return write_gguf(os.path.join(root, name + ".gguf"), cfg, state, **kw)


def test_expected_tensors_are_what_llama_cpp_writes(small):
  path = _variant(small, "ok")
  m = load_gguf_model(path, tokenizer=False)
  assert m.tokenizer is None and m.config.vocab_size == 512  # from llama.vocab_size
  written = {t.name for t in gguf.GGUFReader(path).tensors}
  assert set(expected_gguf_tensors(m.config)) == written


def test_extra_tensor(small):
  path = _variant(small, "extra", edit=lambda items: items + [
      ("blk.0.attn_q_norm.weight", np.ones(16, np.float32), None)])
  with pytest.raises(CheckpointError,
                     match=r"unexpected tensor blk\.0\.attn_q_norm\.weight.*extra"):
    load_gguf_model(path, tokenizer=False)


def test_extra_layer(small):
  path = _variant(small, "layer", edit=lambda items: items + [
      ("blk.2.attn_norm.weight", np.ones(64, np.float32), None)])
  with pytest.raises(CheckpointError, match=r"blk\.2\.attn_norm\.weight.*block_count = 2"):
    load_gguf_model(path, tokenizer=False)


def test_missing_tensor(small):
  path = _variant(small, "missing", edit=lambda items: [
      it for it in items if it[0] != "blk.1.ffn_up.weight"])
  with pytest.raises(CheckpointError, match=r"missing tensor\(s\) in .*missing\.gguf: "
                                            r"blk\.1\.ffn_up\.weight"):
    load_gguf_model(path, tokenizer=False)


def test_wrong_shape(small):
  def shrink(items):
    return [(n, d[:-1] if n == "blk.0.ffn_gate.weight" else d, r) for n, d, r in items]
  path = _variant(small, "shape", edit=shrink)
  with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_gate\.weight .* has shape \(127, 64\)"
                                            r".*implies \(128, 64\)"):
    load_gguf_model(path, tokenizer=False)


def test_duplicate_tensor(small):
  # The writer refuses duplicates, so write a twin under another name of the same length and
  # rename it in the header bytes.
  def twin(items):
    norm = next(it for it in items if it[0] == "blk.0.attn_norm.weight")
    return items + [("blk.0.attn_norm.weighX", *norm[1:])]
  path = _variant(small, "dup", edit=twin)
  with open(path, "rb") as f:
    blob = f.read()
  with open(path, "wb") as f:
    f.write(blob.replace(b"blk.0.attn_norm.weighX", b"blk.0.attn_norm.weight"))
  with pytest.raises(CheckpointError, match=r"blk\.0\.attn_norm\.weight appears twice"):
    load_gguf_model(path, tokenizer=False)


def test_unsupported_models(small):
  root, cfg, state = small
  cases = {
      "arch": (dict(arch="gemma"), "architecture 'gemma'"),
      "moe": (dict(meta=lambda w: w.add_expert_count(8)), "mixture-of-experts"),
      "yarn": (dict(meta=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
                                    w.add_rope_scaling_factor(4.0))), "rope scaling 'yarn'"),
  }
  for name, (kw, message) in cases.items():
    path = write_gguf(os.path.join(root, f"unsupported_{name}.gguf"), cfg, state, **kw)
    with pytest.raises(UnsupportedModelError, match=message):
      load_gguf_model(path, tokenizer=False)


def test_linear_rope_scaling_is_read(small):
  root, cfg, state = small
  path = write_gguf(os.path.join(root, "linear.gguf"), cfg, state, meta=lambda w: (
      w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), w.add_rope_scaling_factor(2.0)))
  assert load_gguf_model(path, tokenizer=False).config.rope_scaling_dict == {
      "factor": 2.0, "rope_type": "linear"}


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "hydra_jax.checkpoint.gguf", *args],
                        capture_output=True, text=True, cwd=REPO)


def test_cli_bad_files_exit_2_with_one_line(small, tmp_path):
  good = _variant(small, "cli_ok")
  not_gguf = tmp_path / "notes.gguf"
  not_gguf.write_text("hello, not a model")
  truncated = tmp_path / "cut.gguf"
  with open(good, "rb") as f:
    truncated.write_bytes(f.read()[: os.path.getsize(good) // 2])
  header_cut = tmp_path / "header_cut.gguf"
  with open(good, "rb") as f:
    header_cut.write_bytes(f.read(200))
  for path, message in [(tmp_path / "absent.gguf", "does not exist"),
                        (not_gguf, "not a GGUF file"),
                        (truncated, "truncated"), (header_cut, "truncated")]:
    proc = _cli(str(path), str(tmp_path / "out"))
    assert proc.returncode == 2, (path, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


# --- the real model: SmolLM2-135M-Instruct (Q4_1), via the registry ----------------------------

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "List three primary colors."]


@pytest.fixture(scope="module")
def smollm2():
  from hydra_jax.registry import models
  try:
    path = models.model_path("smollm2")
  except models.RegistryError as e:
    pytest.skip(f"SmolLM2 is not available (package registry unreachable?): {e}")
  return path, models.gguf_path("smollm2")


@pytest.fixture(scope="module")
def smollm2_ref(smollm2):
  return transformers_gguf(smollm2[1])


def test_smollm2_tokenizer_matches_transformers(smollm2):
  pytest.importorskip("torch")
  from transformers import AutoTokenizer
  _, gguf_file = smollm2
  ours = read_gguf_tokenizer(open_gguf(gguf_file), gguf_file)  # no weights needed
  ref = AutoTokenizer.from_pretrained(os.path.dirname(gguf_file),
                                      gguf_file=os.path.basename(gguf_file))
  msgs = [{"role": "user", "content": CHAT_PROMPTS[0]}]
  chat = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert chat == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
  for text in [chat, "Hello world!", "  two spaces, tabs\tand\nnewlines", "héllo wörld",
               "日本語のテキスト 🙂👍", "def f(x):\n    return x ** 2",
               "<|im_end|> inline"]:
    assert ours(text)["input_ids"] == ref(text)["input_ids"], text
  assert ours.eos_token_id == 2 and ours.convert_ids_to_tokens(2) == "<|im_end|>"
  # the converted directory's tokenizer is the same tokenizer
  back = load_tokenizer(smollm2[0])
  assert back(chat)["input_ids"] == ours(chat)["input_ids"]


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, smollm2_ref):
  _, gguf_file = smollm2
  ours = load_gguf_model(gguf_file)
  tok = ours.tokenizer
  text = tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPTS[0]}], tokenize=False,
                                 add_generation_prompt=True)
  ids = np.array([tok(text, add_special_tokens=False)["input_ids"]], np.int32)
  rel = assert_close(our_logits(ours, ids), torch_logits(smollm2_ref, ids), tol=1e-4)
  print(f"SmolLM2 max relative logits error vs transformers: {rel:.2e}")
  # the converted HF directory gives the same logits
  converted = load_hf_model(smollm2[0], tokenizer=False)
  assert_close(our_logits(converted, ids), torch_logits(smollm2_ref, ids), tol=1e-4)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_generate(smollm2, smollm2_ref):
  from hydra_jax.decoding.api import encode_prompts, generate
  model = load_gguf_model(smollm2[1])
  results = generate(model, CHAT_PROMPTS, max_new_tokens=32, chat=True, batch_size=1)
  prompt_ids = encode_prompts(model, CHAT_PROMPTS, chat=True)
  for ids, res in zip(prompt_ids, results):
    assert res.output_ids == greedy_ref(smollm2_ref, ids, 32, eos=2, pad=2), res.text
  assert results[0].text.startswith("The capital of France is Paris")
