"""Full-size models by shape only: `jax.eval_shape` of init_params, never allocating weights.

The configs are the `config.json` files of public checkpoints, written out by hand. The
parameter counts are the published ones, and transformers' own model built on the meta
device (no memory) is a second, independent count.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax.model.config import UnsupportedModelError, from_hf_config
from hydra_jax.model.llama import init_params

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
    "vocab_size": 32000,
}

# lmsys/vicuna-13b-v1.3: a Llama-1 era config, without num_key_value_heads or rope_theta.
VICUNA_13B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 13824, "max_position_embeddings": 2048, "model_type": "llama",
    "num_attention_heads": 40, "num_hidden_layers": 40, "pad_token_id": 0,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "float16",
    "use_cache": True, "vocab_size": 32000,
}

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}

# Llama-3.1-8B-Instruct: same shapes as Llama-3-8B, Llama-3 rope scaling, three EOS ids.
LLAMA31_8B = dict(
    LLAMA3_8B, eos_token_id=[128001, 128008, 128009], max_position_embeddings=131072,
    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"})

MISTRAL_7B_V02 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 32000,
}

QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064,
}

# name: (config.json, published parameter count)
PRESETS = {
    "llama2_7b": (LLAMA2_7B, 6_738_415_616),
    "vicuna_13b": (VICUNA_13B, 13_015_864_320),
    "llama3_8b": (LLAMA3_8B, 8_030_261_248),
    "llama31_8b": (LLAMA31_8B, 8_030_261_248),
    "mistral_7b_v02": (MISTRAL_7B_V02, 7_241_732_096),
    "qwen2_7b": (QWEN2_7B, 7_615_616_512),
}

AXES = {"vocab", "embed", "heads", "kv_heads", "qkv", "head_dim", "gate_up", "mlp"}


@functools.lru_cache(maxsize=None)
def _shapes(cfg, param_dtype=jnp.float32, boxed=False):
  # Cached: tracing 32-40 layers takes seconds on a busy CPU.
  return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), param_dtype, boxed))


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_matches_published(name):
  hf, published = PRESETS[name]
  cfg = from_hf_config(hf)
  assert cfg.num_params == published
  assert _count(_shapes(cfg)) == published


@pytest.mark.parametrize("name", ["llama3_8b", "qwen2_7b"])
def test_param_count_matches_transformers_meta_model(name):
  """transformers builds the same architecture on the meta device: no weights allocated."""
  torch = pytest.importorskip("torch")
  import transformers
  hf, _ = PRESETS[name]
  hf_cfg = transformers.AutoConfig.for_model(**hf)
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
  assert sum(p.numel() for p in model.parameters()) == _count(_shapes(from_hf_config(hf)))


def test_shapes_and_config_fields_llama3_8b():
  cfg = from_hf_config(LLAMA31_8B)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 8, 128)
  assert cfg.rope_theta == 500000.0 and cfg.rope_scaling_dict["factor"] == 8.0
  assert cfg.eos_token_ids == (128001, 128008, 128009)
  shapes = _shapes(cfg, param_dtype=jnp.bfloat16)
  layer = shapes["layers_31"]
  # q/k/v fused per kv head: 8 groups of 4 query heads + k + v.
  assert layer["self_attn"]["qkv_proj"]["kernel"].shape == (4096, 8, 6, 128)
  assert layer["mlp"]["gate_up_proj"]["kernel"].shape == (4096, 2, 14336)
  assert layer["self_attn"]["o_proj"]["kernel"].shape == (32, 128, 4096)
  assert layer["mlp"]["down_proj"]["kernel"].shape == (14336, 4096)
  assert shapes["embed_tokens"]["embedding"].shape == (128256, 4096)
  assert shapes["lm_head"]["kernel"].shape == (4096, 128256)
  assert "layers_32" not in shapes
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


def test_vicuna_defaults_to_multi_head_attention():
  cfg = from_hf_config(VICUNA_13B)
  assert cfg.num_kv_heads == cfg.num_heads == 40 and cfg.head_dim == 128
  assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
  assert cfg.pad_token_id == 0 and cfg.eos_token_ids == (2,)


def test_qwen2_has_biases_and_ignores_unused_window():
  cfg = from_hf_config(QWEN2_7B)
  assert cfg.attention_bias and cfg.sliding_window is None
  shapes = _shapes(cfg)
  assert shapes["layers_0"]["self_attn"]["qkv_proj"]["bias"].shape == (4, 9, 128)  # 28 q heads
  assert "bias" not in shapes["layers_0"]["self_attn"]["o_proj"]


def test_every_param_has_logical_axes():
  """Training shards by rules over these names; every leaf must carry one per dimension."""
  boxed = _shapes(from_hf_config(LLAMA3_8B), boxed=True)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape), leaf
    assert set(leaf.names) <= AXES, leaf.names
  attn = boxed["layers_0"]["self_attn"]
  assert attn["qkv_proj"]["kernel"].names == ("embed", "kv_heads", "qkv", "head_dim")
  assert boxed["embed_tokens"]["embedding"].names == ("vocab", "embed")
  assert boxed["lm_head"]["kernel"].names == ("embed", "vocab")
  assert boxed["layers_0"]["mlp"]["gate_up_proj"]["kernel"].names == ("embed", "gate_up", "mlp")
  # unboxing gives exactly the plain tree
  plain = _shapes(from_hf_config(LLAMA3_8B))
  assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(plain)
  np.testing.assert_equal(_count(nn.unbox(boxed)), 8_030_261_248)


def test_mistral_v01_sliding_window_is_refused():
  """Mistral-7B-v0.1 really uses a 4096 window over 32768 positions: refuse, don't run wrong."""
  v01 = dict(MISTRAL_7B_V02, sliding_window=4096, rope_theta=10000.0)
  with pytest.raises(UnsupportedModelError, match=r"sliding-window.*4096.*32768"):
    from_hf_config(v01)
