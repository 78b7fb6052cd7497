"""Medusa-1 heads for the embedded TinyShakespeare model (hydra_jax/assets/tiny_shakespeare).

Sequentially independent heads (one ResBlock on the base hidden state
each), 4 heads x 1 block, hard labels.
Shared recipe (data, batch, steps, optimizer): hydra_jax.recipes.shipped_heads.embedded.

Data: the base model's own greedy continuations of speeches from the TRAINING split of
TinyShakespeare (self-distillation); the held-out tail, where the benchmark prompts come
from, is never read. Run from the repository root, then ship the heads (bf16):
  python -m hydra_jax.recipes.embedded --self-distill      # once, for all three kinds (~7 min)
  python train.py --config configs/embedded_medusa.py --workdir /work/embedded_heads/medusa
  python -m hydra_jax.recipes.embedded --ship-heads /work/embedded_heads/medusa/heads medusa
All fields and their meaning: hydra_jax/training/config_base.py. Results:
hydra_jax/assets/tiny_shakespeare/heads/README.md.
"""

from hydra_jax.recipes import shipped_heads


def get_config():
  return shipped_heads.embedded("medusa")
