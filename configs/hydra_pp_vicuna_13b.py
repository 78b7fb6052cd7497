"""Hydra++ heads on Vicuna-13B v1.3: the paper's recipe.

Hydra++ heads: prefix attention layer, 4 blocks per head, dropout 0.2,
teacher (soft-label) distillation from the base model.
Data: ShareGPT conversations in the Vicuna v1.1 template, loss on assistant tokens only,
95/5 train/held-out split; 32 sequences x 2048 tokens per step, 10 epochs; base frozen in bf16.

Run (one host, or every host of a pod slice with the same command):
  python train.py --config configs/hydra_pp_vicuna_13b.py --workdir runs/hydra_pp_vicuna_13b \
      --config.model_path=/path/to/vicuna-13b-v1.3 \
      --config.data.path=/path/to/ShareGPT_V4.3_unfiltered_cleaned_split.json
Any field can be overridden the same way, e.g. --config.optimizer.lr=1e-3.
All fields and their meaning: hydra_jax/training/config_base.py.
"""

from hydra_jax.training.config_base import recipe


def get_config():
  # arch 'hydra++' on the base described by BASE_MODELS['vicuna_13b']; recipe() sets heads, loss,
  # optimizer (AdamW 5e-4, wd 0.1, 100 warmup, cosine to 0.33x), data and batch.
  return recipe('hydra++', 'vicuna_13b')
