"""Hydra++ heads on Llama-3-8B-Instruct: the paper's recipe.

Hydra++ heads: prefix attention layer, 4 blocks per head, dropout 0.2,
teacher (soft-label) distillation from the base model.
Data: ShareGPT conversations rendered with the tokenizer's chat template, loss on assistant tokens only,
95/5 train/held-out split; 32 sequences x 2048 tokens per step, 10 epochs; base frozen in bf16.

Run (one host, or every host of a pod slice with the same command):
  python train.py --config configs/hydra_pp_llama3_8b.py --workdir runs/hydra_pp_llama3_8b \
      --config.model_path=/path/to/llama-3-8b-instruct \
      --config.data.path=/path/to/ShareGPT_V4.3_unfiltered_cleaned_split.json
Any field can be overridden the same way, e.g. --config.optimizer.lr=1e-3.
All fields and their meaning: hydra_jax/training/config_base.py.
"""

from hydra_jax.training.config_base import recipe


def get_config():
  # arch 'hydra++' on the base described by BASE_MODELS['llama3_8b']; recipe() sets heads, loss,
  # optimizer (AdamW 5e-4, wd 0.1, 100 warmup, cosine to 0.33x), data and batch.
  return recipe('hydra++', 'llama3_8b')
