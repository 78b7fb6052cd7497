"""Hydra++ heads for SmolLM2-135M-Instruct (`python -m hydra_jax.registry.models path smollm2`).

Prefix attention layer, 4 heads x 4 blocks, dropout 0.2, teacher (soft-label)
distillation from the base.
The heads share the base's LM head over a 4,096-token draft vocabulary.

Data, budget and the run: hydra_jax.recipes.shipped_heads.smollm2 (shared by the three kinds):
  python train.py --config configs/smollm2_hydra_pp.py --workdir /work/smollm2_heads/hydra_pp \
      --config.data.feature_cache=~/.cache/hydra_jax/features/smollm2_magpie
"""

from hydra_jax.recipes import shipped_heads


def get_config():
  return shipped_heads.smollm2("hydra_pp")
