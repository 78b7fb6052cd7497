"""Hydra++ heads for SmolLM2-135M-Instruct (`python -m hydra_jax.models path smollm2`).

Prefix attention layer, 4 heads x 4 blocks, dropout 0.2, teacher (soft-label)
distillation from the base.
The heads share the base's LM head over a 4,096-token draft vocabulary.
Shared recipe (data, batch, steps, optimizer): hydra_jax.training.recipes.smollm2.

Data: Magpie self-distillation, no dataset: the model writes user questions from its chat
template's pre-query prefix and answers them greedily; MT-Bench is never used. Run from the
repository root (one CPU core: ~30 min for Hydra++; runs resume), then ship the heads (bf16):
  python -m hydra_jax.training.magpie --model smollm2 --num-queries 480 \
      --out ~/.cache/hydra_jax/smollm2_magpie_v1.jsonl      # once, for all three kinds
  python train.py --config configs/smollm2_hydra_pp.py --workdir /work/smollm2_heads/hydra_pp
  python -m hydra_jax.models ship-heads smollm2 /work/smollm2_heads/hydra_pp/heads hydra_pp
Results: hydra_jax/assets/smollm2/heads/README.md.
"""

from hydra_jax.training import recipes


def get_config():
  return recipes.smollm2("hydra_pp")
