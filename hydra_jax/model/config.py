"""Base-model configuration: the Llama family (llama, mistral, qwen2) and its HF mapping.

`ModelConfig` is the one description of a base model that the Flax module, the checkpoint
loader, the KV cache and the draft heads read. `from_hf_config` accepts both the classic
(`rope_theta` + `rope_scaling`) and the transformers-5 (`rope_parameters`) spellings, and
refuses, with an error that names the field, anything the model would otherwise run wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping, Optional

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
  """The checkpoint describes a model this implementation does not run (correctly)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a Llama-family decoder. Hashable, so it can be a jit static arg."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # Tuple of sorted (key, value) pairs, so the dataclass stays hashable; None = plain RoPE.
  rope_scaling: Optional[tuple] = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # q/k/v projection biases (Qwen2)
  model_type: str = "llama"
  # Attention window; None = full attention. Set only when the checkpoint really uses one.
  sliding_window: Optional[int] = None
  bos_token_id: Optional[int] = None
  eos_token_ids: tuple = ()
  pad_token_id: Optional[int] = None

  def __post_init__(self):
    if self.hidden_size <= 0 or self.num_layers <= 0 or self.vocab_size <= 0:
      raise ValueError(f"model sizes must be positive, got {self}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads}) for grouped-query attention")

  @property
  def rope_scaling_dict(self) -> Optional[dict]:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def num_params(self) -> int:
    """Parameter count, computed from the sizes (matches HF's count for the same model)."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q = d * self.num_heads * self.head_dim
    kv = 2 * d * self.num_kv_heads * self.head_dim
    o = self.num_heads * self.head_dim * d
    bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
    layer = q + kv + o + bias + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * v
    return v * d + self.num_layers * layer + d + head

  def fingerprint(self) -> str:
    """A short hash of the fields that determine the hidden states (not the token ids).

    Draft heads record it, so that loading heads onto another base model is caught.
    """
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
            "num_heads", "num_kv_heads", "head_dim", "rope_theta", "rope_scaling",
            "tie_word_embeddings", "attention_bias")
    blob = json.dumps({k: _jsonable(getattr(self, k)) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  def to_dict(self) -> dict:
    return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    d = dict(d)
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = tuple(sorted(dict(d["rope_scaling"]).items()))
    d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
    return cls(**d)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def _jsonable(v):
  if isinstance(v, tuple) and v and isinstance(v[0], tuple):
    return dict(v)
  if isinstance(v, tuple):
    return list(v)
  return v


def _rope_from_hf(hf: Mapping[str, Any], where: str):
  """Returns (rope_theta, rope_scaling tuple or None) from either HF spelling."""
  params = hf.get("rope_parameters")
  if params is not None:
    params = dict(params)
    if "rope_type" not in params and len(params) and all(isinstance(v, dict) for v in params.values()):
      raise UnsupportedModelError(f"{where}: per-layer-type rope_parameters are not supported")
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = None if rope_type == "default" else params
  else:
    theta = float(hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    scaling = None if scaling is None else dict(scaling)
    rope_type = "default" if scaling is None else scaling.get("rope_type", scaling.get("type"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise UnsupportedModelError(
        f"{where}: rope type {rope_type!r} is not supported (supported: "
        f"{', '.join(SUPPORTED_ROPE_TYPES)}); running it as plain RoPE would give wrong logits")
  if scaling is not None:
    scaling = {k: v for k, v in scaling.items() if k != "type"}
    scaling["rope_type"] = rope_type
    if rope_type == "llama3":
      for key in ("factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings"):
        if key not in scaling:
          raise UnsupportedModelError(f"{where}: llama3 rope scaling is missing {key!r}")
    if rope_type == "linear" and "factor" not in scaling:
      raise UnsupportedModelError(f"{where}: linear rope scaling is missing 'factor'")
    scaling = tuple(sorted((k, v) for k, v in scaling.items()
                           if k in ("rope_type", "factor", "low_freq_factor",
                                    "high_freq_factor", "original_max_position_embeddings")))
  return theta, scaling


def from_hf_config(hf: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
  """Maps a Hugging Face `config.json` dict to a ModelConfig, refusing what we cannot run."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UnsupportedModelError(
        f"{where}: model_type {model_type!r} is not supported; hydra_jax runs "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if key not in hf:
      raise UnsupportedModelError(f"{where}: required field {key!r} is missing")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedModelError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
  if hf.get("mlp_bias", False):
    raise UnsupportedModelError(f"{where}: mlp_bias=true is not supported")
  if model_type == "llama" and hf.get("attention_bias", False):
    # HF's llama puts this bias on o_proj too; our attention_bias is q/k/v only (Qwen2).
    raise UnsupportedModelError(
        f"{where}: attention_bias=true is not supported for model_type 'llama' (it adds an "
        f"o_proj bias); only Qwen2-style q/k/v biases are")
  if hf.get("pretraining_tp", 1) not in (1, None):
    # pretraining_tp only changes how HF splits matmuls; the math is the same.
    pass
  theta, scaling = _rope_from_hf(hf, where)

  sliding_window = None
  if model_type == "mistral" and hf.get("sliding_window") is not None:
    sliding_window = int(hf["sliding_window"])
  if model_type == "qwen2" and hf.get("use_sliding_window", False):
    sliding_window = int(hf.get("sliding_window") or 0) or None
  if sliding_window is not None:
    # A window at least as long as any sequence the model can see is full attention.
    max_pos = int(hf.get("max_position_embeddings", 2048))
    if sliding_window < max_pos:
      raise UnsupportedModelError(
          f"{where}: sliding-window attention (window {sliding_window} < "
          f"max_position_embeddings {max_pos}) is not supported; set sliding_window to null "
          f"if the model was trained with full attention")
    sliding_window = None

  num_heads = int(hf["num_attention_heads"])
  head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // num_heads
  eos = hf.get("eos_token_id")
  eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
      model_type=model_type,
      sliding_window=sliding_window,
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=eos_ids,
      pad_token_id=hf.get("pad_token_id"),
  )


def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
  """The inverse of `from_hf_config`: a config.json dict that transformers loads."""
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM"}[cfg.model_type]
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope = dict(cfg.rope_scaling_dict, rope_theta=cfg.rope_theta)
  out = {
      "architectures": [arch],
      "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None if cfg.rope_scaling is None else cfg.rope_scaling_dict,
      "rope_parameters": rope,
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": (list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1
                       else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None)),
      "pad_token_id": cfg.pad_token_id,
      "dtype": dtype,
      "torch_dtype": dtype,
  }
  if cfg.model_type == "llama":
    if cfg.attention_bias:
      raise UnsupportedModelError("a llama config.json cannot express q/k/v-only biases "
                                  "(attention_bias=true adds an o_proj bias): export as qwen2")
    out["attention_bias"] = False
    out["mlp_bias"] = False
  if cfg.model_type == "mistral":
    out["sliding_window"] = None
  if cfg.model_type == "qwen2":
    out["use_sliding_window"] = False
    out["sliding_window"] = None
  return out
