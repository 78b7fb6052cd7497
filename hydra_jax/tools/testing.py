"""Tiny random models and locally trained tokenizers, for tests, benchmarks and the demo.

Nothing here downloads: models are random transformers PyTorch models saved with
`save_pretrained`, tokenizers are BPE models trained in a second on TinyShakespeare text
(or a built-in fallback text when the data file is not there).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

FALLBACK_TEXT = """First Citizen:
Before we proceed any further, hear me speak.
All:
Speak, speak.
First Citizen:
You are all resolved rather to die than to famish?
All:
Resolved. resolved.
First Citizen:
First, you know Caius Marcius is chief enemy to the people.
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def perturb_params(params, seed: int, scale: float):
  """`params` plus `scale` x standard normal noise on every leaf, same dtypes.

  Test heads are zero-initialised in places (they would draft the same thing for every path
  and hide a wrong formula): perturbing every leaf makes them compute something. The noise is
  drawn in numpy: `jax.random.normal` run eagerly compiles one XLA program per leaf shape,
  seconds per head set on a 2-core CPU.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(np.asarray(x, np.float32) + scale * rng.standard_normal(x.shape),
                            dtype=x.dtype), params)


def _corpus_text(max_chars: int = 200_000) -> str:
  from hydra_jax.registry.embedded import EmbeddedAssetError, corpus_path
  try:
    with open(corpus_path(), encoding="utf-8") as f:
      return f.read(max_chars)
  except EmbeddedAssetError:
    return FALLBACK_TEXT * 50


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  text = _corpus_text()
  tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
  return tok.to_str()


def make_tokenizer(vocab_size: int = 512, chat_template: Optional[str] = None):
  """A transformers fast tokenizer with a byte-level BPE of at most `vocab_size` tokens."""
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast
  tok = PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
      unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  if chat_template is not None:
    tok.chat_template = chat_template
  return tok


# A minimal chat template in the Vicuna v1.1 shape, for tests of --chat.
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}</s>"
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def make_hf_model(path: str, model_type: str = "llama", vocab_size: int = 512,
                  hidden_size: int = 64, intermediate_size: int = 128, num_layers: int = 2,
                  num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 512,
                  tie_word_embeddings: bool = False, seed: int = 0, weight_std: float = 0.1,
                  tokenizer: bool = True, chat_template: Optional[str] = None,
                  torch_dtype: str = "float32", **extra):
  """Saves a random transformers model (and a tokenizer) to `path`; returns the torch model.

  `weight_std` above HF's default 0.02 makes the random model's logits peaked enough that
  greedy decoding is not dominated by near-ties (parity tests compare argmaxes).
  """
  import torch
  import transformers
  cls_cfg, cls_model = {
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
  }[model_type]
  kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2,
            pad_token_id=3)
  if model_type == "mistral":
    kw["sliding_window"] = None
  kw.update(extra)
  torch.manual_seed(seed)
  model = cls_model(cls_cfg(**kw))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.8, 1.2)
      else:
        p.normal_(0.0, weight_std)
  model.eval()
  if torch_dtype != "float32":
    model = model.to(getattr(torch, torch_dtype))
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path)
  if tokenizer:
    make_tokenizer(vocab_size, chat_template).save_pretrained(path)
  return model
