"""GGUF checkpoints (llama.cpp's format): load a Llama-family GGUF, or convert it to HF.

    m = load_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf")     # an HFModel, like load_hf_model
    python -m hydra_jax.checkpoint.gguf IN.gguf OUT_DIR [--dtype float32|bfloat16]

The `gguf` package reads the file and dequantises every tensor to f32 (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, the K-quants, ...: whatever gguf's own `dequantize` knows). Each llama.cpp tensor
name is mapped to the Hugging Face name that `hf._RULES` already knows, so the layout
transforms and shape checks are shared with the safetensors loader. Loading is as strict: an
unknown, missing or duplicate tensor, or a wrong shape, raises `CheckpointError` naming the
tensor and the file. The config comes from the GGUF metadata, the tokenizer (with its chat
template) from the vocabulary the file carries. No torch is needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.checkpoint.hf import (CheckpointError, HFModel, _match, expected_hf_keys, export_hf,
                                     params_from_hf_tensors)
from hydra_jax.model.config import ModelConfig, UnsupportedModelError

log = logging.getLogger("hydra_jax.checkpoint")

SUPPORTED_ARCHS = ("llama", "qwen2")

# llama.cpp tensor names <-> Hugging Face names; {i} is a layer index, {x} a projection.
_NAME_TABLE = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_{x}.weight", "model.layers.{i}.self_attn.{x}_proj.weight"),
    ("blk.{i}.attn_{x}.bias", "model.layers.{i}.self_attn.{x}_proj.bias"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.ffn_{f}.weight", "model.layers.{i}.mlp.{f}_proj.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
]
_SLOTS = {"i": r"\d+", "x": "[qkv]", "f": "gate|up|down"}
# Llama-3.1-style rope scaling: llama.cpp stores the per-frequency factors, not the parameters.
ROPE_FREQS = "rope_freqs.weight"


def _template_regex(template: str) -> "re.Pattern":
  pattern = re.escape(template)
  for slot, rx in _SLOTS.items():
    pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>{rx})")
  return re.compile(pattern)


_FORWARD = [(_template_regex(g), h) for g, h in _NAME_TABLE]
_BACKWARD = [(_template_regex(h), g) for g, h in _NAME_TABLE]


def _rename(name: str, table) -> Optional[str]:
  for rx, template in table:
    m = rx.fullmatch(name)
    if m:
      return template.format(**m.groupdict())
  return None


def hf_name(gguf_name: str) -> Optional[str]:
  """The Hugging Face tensor name for a llama.cpp one (None when nothing maps to it)."""
  return _rename(gguf_name, _FORWARD)


def gguf_name(hf_key: str) -> Optional[str]:
  return _rename(hf_key, _BACKWARD)


def expected_gguf_tensors(cfg: ModelConfig) -> List[str]:
  """Every tensor name a complete GGUF for `cfg` must hold."""
  return [gguf_name(k) for k in expected_hf_keys(cfg)]


# --- opening and metadata ------------------------------------------------------------------

_MISSING = object()


def open_gguf(path: str):
  """A `gguf.GGUFReader` over the file; a missing, foreign or truncated one is a CheckpointError."""
  from gguf import GGUFReader
  path = os.fspath(path)
  if os.path.isdir(path):
    raise CheckpointError(f"{path} is a directory: pass the .gguf file itself (a Hugging Face "
                          f"directory loads with load_hf_model)")
  if not os.path.isfile(path):
    raise CheckpointError(f"GGUF file {path!r} does not exist (pass the path of a .gguf file)")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic "
                          f"bytes); pass a llama.cpp .gguf file, or a Hugging Face directory "
                          f"to the safetensors loader")
  try:
    reader = GGUFReader(path)
  except ValueError as e:
    dup = re.search(r"duplicated tensor with name (\S+)", str(e))
    if dup:
      raise CheckpointError(f"tensor {dup.group(1)} appears twice in {path}") from None
    raise CheckpointError(f"cannot read {path}: {e} (the file is truncated or corrupt; "
                          f"download it again)") from None
  except Exception as e:  # struct / memmap errors on a header cut short
    raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e} (the file is truncated "
                          f"or corrupt; download it again)") from None
  for t in reader.tensors:
    end = int(t.data_offset) + int(t.n_bytes)
    if end > size:
      raise CheckpointError(f"{path} is truncated: tensor {t.name} ends at byte {end} but the "
                            f"file has {size} bytes (download it again)")
  return reader


def _field(reader, key: str, path: str, default=_MISSING):
  field = reader.fields.get(key)
  if field is None:
    if default is _MISSING:
      raise CheckpointError(f"{path}: metadata key {key!r} is missing (re-convert the model "
                            f"with llama.cpp's convert_hf_to_gguf.py)")
    return default
  return field.contents()


def _one(value, key: str, path: str) -> int:
  """Per-layer arrays (head counts) are accepted when every layer has the same value."""
  if isinstance(value, list):
    if len(set(value)) != 1:
      raise UnsupportedModelError(f"{path}: {key} varies per layer ({sorted(set(value))}); "
                                  f"hydra_jax runs uniform decoders only")
    value = value[0]
  return int(value)


def _rope_scaling(reader, arch: str, path: str, cfg: ModelConfig):
  """(rope_scaling tuple or None) from the metadata and the optional rope_freqs tensor."""
  kind = _field(reader, f"{arch}.rope.scaling.type", path, None)
  factor = _field(reader, f"{arch}.rope.scaling.factor", path, None)
  legacy = _field(reader, f"{arch}.rope.scale_linear", path, None)  # pre-2024 spelling
  if kind is None and legacy not in (None, 1.0):
    kind, factor = "linear", legacy
  freqs = [t for t in reader.tensors if t.name == ROPE_FREQS]
  if freqs:
    if kind not in (None, "none"):
      raise UnsupportedModelError(f"{path}: both {ROPE_FREQS} and rope.scaling.type {kind!r}")
    return _fit_llama3_rope(np.asarray(freqs[0].data, np.float32).reshape(-1), reader, arch, path,
                            cfg)
  if kind in (None, "none") or (kind == "linear" and float(factor or 1.0) == 1.0):
    return None
  if kind == "linear":
    return (("factor", float(factor)), ("rope_type", "linear"))
  raise UnsupportedModelError(f"{path}: rope scaling {kind!r} ({arch}.rope.scaling.type) is not "
                              f"supported (supported: linear, and Llama-3 {ROPE_FREQS}); running "
                              f"it as plain RoPE would give wrong logits")


def _fit_llama3_rope(factors: np.ndarray, reader, arch: str, path: str, cfg: ModelConfig):
  """Recovers Llama-3 scaling parameters from the factors llama.cpp precomputed.

  The GGUF keeps only 1 / (scaled inv_freq / inv_freq) per frequency; Meta's releases all use
  low 1, high 4, original context 8192, so those are tried and the result must reproduce the
  stored factors.
  """
  from hydra_jax.model.llama import rope_inv_freq
  if factors.shape != (cfg.head_dim // 2,):
    raise CheckpointError(f"tensor {ROPE_FREQS} in {path} has shape {factors.shape}, but head "
                          f"dim {cfg.head_dim} implies ({cfg.head_dim // 2},)")
  orig = int(_field(reader, f"{arch}.rope.scaling.original_context_length", path, 8192))
  scaling = (("factor", float(factors.max())), ("high_freq_factor", 4.0),
             ("low_freq_factor", 1.0), ("original_max_position_embeddings", orig),
             ("rope_type", "llama3"))
  plain = np.asarray(rope_inv_freq(cfg.replace(rope_scaling=None)))
  scaled = np.asarray(rope_inv_freq(cfg.replace(rope_scaling=scaling)))
  if not np.allclose(plain / scaled, factors, rtol=1e-4, atol=1e-6):
    raise UnsupportedModelError(
        f"{path}: {ROPE_FREQS} holds rope factors that are not Llama-3 scaling (factor "
        f"{factors.max():g}, low 1, high 4, original context {orig}); this rope scaling is not "
        f"supported")
  return scaling


def read_gguf_config(reader, path: str) -> ModelConfig:
  """The ModelConfig from llama.cpp's metadata keys (`llama.block_count`, ...)."""
  arch = _field(reader, "general.architecture", path)
  if arch not in SUPPORTED_ARCHS:
    raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported; hydra_jax "
                                f"runs {', '.join(SUPPORTED_ARCHS)} (Llama-family decoders)")
  get = lambda key, default=_MISSING: _field(reader, f"{arch}.{key}", path, default)  # noqa: E731
  if int(get("expert_count", 0) or 0) > 0:
    raise UnsupportedModelError(f"{path}: {arch}.expert_count = {get('expert_count')}: "
                                f"mixture-of-experts models (Mixtral) are not supported")
  hidden = int(get("embedding_length"))
  heads = _one(get("attention.head_count"), f"{arch}.attention.head_count", path)
  kv_heads = _one(get("attention.head_count_kv", heads), f"{arch}.attention.head_count_kv", path)
  head_dim = int(get("attention.key_length", hidden // heads))
  if int(get("attention.value_length", head_dim)) != head_dim:
    raise UnsupportedModelError(f"{path}: key and value head sizes differ "
                                f"({arch}.attention.key_length / value_length)")
  rope_dim = int(get("rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise UnsupportedModelError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count "
                                f"{rope_dim} < head dim {head_dim}) are not supported")
  names = {t.name for t in reader.tensors}
  tokens = _field(reader, "tokenizer.ggml.tokens", path, None)
  if tokens:
    vocab = len(tokens)
  else:
    vocab = int(get("vocab_size", 0)) or next(
        (int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"), 0)
  special = lambda key: _field(reader, f"tokenizer.ggml.{key}", path, None)  # noqa: E731
  eos_ids = []
  for key in ("eos_token_id", "eot_token_id", "eom_token_id"):  # llama.cpp stops on all three
    if special(key) is not None and int(special(key)) not in eos_ids:
      eos_ids.append(int(special(key)))
  cfg = ModelConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
      num_layers=int(get("block_count")), num_heads=heads, num_kv_heads=kv_heads,
      head_dim=head_dim, rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      max_position_embeddings=int(get("context_length", 2048)),
      tie_word_embeddings="output.weight" not in names,
      attention_bias=arch == "qwen2", model_type=arch,
      bos_token_id=None if special("bos_token_id") is None else int(special("bos_token_id")),
      eos_token_ids=tuple(eos_ids),
      pad_token_id=(None if special("padding_token_id") is None
                    else int(special("padding_token_id"))))
  return cfg.replace(rope_scaling=_rope_scaling(reader, arch, path, cfg))


# --- tensors -------------------------------------------------------------------------------


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes convert_hf_to_gguf's `permute` of llama q/k rows (interleaved-pair rope layout).

  llama.cpp reorders each head's rows from [first half | second half] to interleaved pairs;
  our rope is HF's rotate-half, so the rows go back: [N, H/2, 2, D] -> [N, 2, H/2, D].
  """
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor, path: str) -> np.ndarray:
  from gguf import dequantize
  try:
    out = dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:
    raise CheckpointError(f"tensor {tensor.name} in {path} is stored as "
                          f"{tensor.tensor_type.name}, which the installed gguf package cannot "
                          f"dequantize (re-quantize the model to Q8_0, Q4_K or F16)") from None
  return np.asarray(out, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _is_rope_freqs(name: str, cfg: ModelConfig) -> bool:
  """rope_freqs.weight is consumed by read_gguf_config (as cfg.rope_scaling), not a param."""
  return name == ROPE_FREQS and (cfg.rope_scaling_dict or {}).get("rope_type") == "llama3"


def check_gguf_tensors(reader, path: str, cfg: ModelConfig) -> None:
  """Every tensor maps to one of ours with the right shape, once, and none is missing.

  Runs on the tensor index alone (nothing is dequantised), so that errors name the GGUF
  tensor and come before any work.
  """
  seen = set()
  for t in reader.tensors:
    name = t.name
    if _is_rope_freqs(name, cfg):
      continue
    key = hf_name(name)
    rule = _match(key) if key else None
    if rule is None:
      raise CheckpointError(f"unexpected tensor {name} in {path}: no parameter of this model "
                            f"maps to it")
    if name in seen:
      raise CheckpointError(f"tensor {name} appears twice in {path}")
    seen.add(name)
    layer = re.match(r"blk\.(\d+)\.", name)
    if layer and int(layer.group(1)) >= cfg.num_layers:
      raise CheckpointError(f"unexpected tensor {name} in {path}: the metadata says "
                            f"{cfg.model_type}.block_count = {cfg.num_layers}")
    if name.endswith(".bias") and not cfg.attention_bias:
      raise CheckpointError(f"unexpected tensor {name} in {path}: {cfg.model_type} has no "
                            f"attention bias")
    # GGUF lists dimensions innermost first: reversed, they are torch's [out, in].
    got = tuple(int(d) for d in reversed(t.shape))
    want = tuple(rule[-1](cfg))  # hf._match's last field is the HF shape
    if got != want:
      raise CheckpointError(f"tensor {name} in {path} has shape {got} (GGUF order "
                            f"{[int(d) for d in t.shape]}), but the metadata implies {want}")
  missing = [n for n in expected_gguf_tensors(cfg) if n not in seen]
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise CheckpointError(f"missing tensor(s) in {path}: {', '.join(missing[:5])}{more}")


def read_gguf_params(reader, path: str, cfg: ModelConfig, param_dtype=jnp.float32) -> dict:
  """Checks, dequantises and maps every tensor; returns our params pytree of param_dtype.

  Tensors are renamed to HF names in torch layout (q/k rows un-permuted) and go through
  `hf.params_from_hf_tensors`, the one place that knows our param layout.
  """
  check_gguf_tensors(reader, path, cfg)

  def tensors():
    for t in reader.tensors:
      if _is_rope_freqs(t.name, cfg):
        continue
      w = _dequantize(t, path)
      if cfg.model_type == "llama" and re.search(r"\.attn_[qk]\.weight$", t.name):
        w = _unpermute_rope_rows(w, cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads)
      yield path, hf_name(t.name), w
  return params_from_hf_tensors(tensors(), cfg, param_dtype, where=path)


# --- tokenizer -----------------------------------------------------------------------------


def read_gguf_tokenizer(reader, path: str):
  """The transformers fast tokenizer (with its chat template) the metadata describes, or None.

  transformers' own GGUF tokenizer loading reads the file through a torch-only reader, but its
  conversion step does not need torch: we read the same fields with `gguf` and hand them over,
  so the result is the tokenizer `AutoTokenizer.from_pretrained(dir, gguf_file=...)` builds.
  """
  if "tokenizer.ggml.model" not in reader.fields:
    return None
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                      convert_gguf_tokenizer)
  groups = {group: {name: _field(reader, f"tokenizer.{key}", path)
                    for key, name in renames.items() if f"tokenizer.{key}" in reader.fields}
            for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  tok_dict, tok_config = groups["tokenizer"], groups["tokenizer_config"]
  if "tokens" not in tok_dict:
    raise CheckpointError(f"{path}: tokenizer.ggml.tokens is missing, so no tokenizer can be "
                          f"built (pass tokenizer=False and token ids)")
  if tok_dict.get("tokenizer_type") == "llama":
    tok_config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabs
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
    token_id = _field(reader, f"tokenizer.ggml.{key}", path, None)
    tok_config[name] = tok_dict["tokens"][int(token_id)] if token_id is not None else None
  arch = _field(reader, "general.architecture", path)
  try:
    backend, extra = convert_gguf_tokenizer(arch, tok_dict)
  except ValueError as e:
    raise UnsupportedModelError(f"{path}: {e}") from None
  return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)


# --- entry points --------------------------------------------------------------------------


def load_gguf_model(path: str, param_dtype=jnp.float32, dtype=jnp.float32,
                    tokenizer: bool = True) -> HFModel:
  """Loads config, params (dequantised, then cast to param_dtype) and tokenizer from a GGUF."""
  path = os.path.expanduser(os.fspath(path))
  reader = open_gguf(path)
  cfg = read_gguf_config(reader, path)
  params = read_gguf_params(reader, path, cfg, param_dtype)
  tok = read_gguf_tokenizer(reader, path) if tokenizer else None
  return HFModel(config=cfg, params=params, tokenizer=tok, path=path, dtype=dtype)


def generation_config(cfg: ModelConfig) -> dict:
  eos = list(cfg.eos_token_ids)
  return {"bos_token_id": cfg.bos_token_id,
          "eos_token_id": eos if len(eos) > 1 else (eos[0] if eos else None),
          "pad_token_id": cfg.pad_token_id}


def convert_gguf_to_hf(path: str, out_dir: str, dtype: str = "float32",
                       overwrite: bool = False) -> str:
  """Writes a Hugging Face directory (config, safetensors, tokenizer, generation config)."""
  if dtype not in ("float32", "bfloat16", "float16"):
    raise CheckpointError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
  if not overwrite and any(os.path.exists(os.path.join(out_dir, f))
                           for f in ("config.json", "model.safetensors")):
    raise CheckpointError(f"{out_dir} already holds a model: pass --overwrite or choose an "
                          f"empty output directory")
  start = time.time()
  reader = open_gguf(path)
  cfg = read_gguf_config(reader, path)
  types = sorted({t.tensor_type.name for t in reader.tensors})
  log.info("reading %s: %s, %d layers, %d tensors (%s)", path, cfg.model_type, cfg.num_layers,
           len(reader.tensors), "/".join(types))
  # Host memory, even where an accelerator is the default device: the weights only pass through.
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    params = read_gguf_params(reader, path, cfg, jnp.float32)
  tok = read_gguf_tokenizer(reader, path)
  export_hf(params, cfg, out_dir, dtype=dtype, tokenizer=tok)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(generation_config(cfg), f, indent=2)
  log.info("wrote %s (%s) in %.1fs", out_dir, dtype, time.time() - start)
  return out_dir


def main(argv: Optional[List[str]] = None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m hydra_jax.checkpoint.gguf",
      description="Convert a llama.cpp GGUF (Llama / Qwen2; any quantisation gguf can "
                  "dequantize) to a Hugging Face model directory.")
  ap.add_argument("gguf", help="input .gguf file")
  ap.add_argument("out_dir", help="output directory (config.json, model.safetensors, tokenizer)")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                  help="dtype of the written weights (the GGUF is dequantised to f32 first)")
  ap.add_argument("--overwrite", action="store_true", help="replace a model already in OUT_DIR")
  args = ap.parse_args(argv)
  handler = logging.StreamHandler(sys.stderr)  # our progress only, not every library's
  handler.setFormatter(logging.Formatter("%(message)s"))
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  try:
    convert_gguf_to_hf(args.gguf, args.out_dir, args.dtype, args.overwrite)
  except (CheckpointError, UnsupportedModelError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(args.out_dir)
  return 0


__all__ = ["ROPE_FREQS", "SUPPORTED_ARCHS", "check_gguf_tensors", "convert_gguf_to_hf",
           "expected_gguf_tensors", "generation_config", "gguf_name", "hf_name", "load_gguf_model",
           "open_gguf", "read_gguf_config", "read_gguf_params", "read_gguf_tokenizer"]

if __name__ == "__main__":
  sys.exit(main())
