"""Medusa-1 heads for SmolLM2-135M-Instruct (`python -m hydra_jax.models path smollm2`).

Sequentially independent heads (one ResBlock on the base hidden state
each), 4 heads x 1 block, hard labels.
The heads share the base's LM head over a 4,096-token draft vocabulary.
Shared recipe (data, batch, steps, optimizer): hydra_jax.training.recipes.smollm2.

Data: Magpie self-distillation, no dataset: the model writes user questions from its chat
template's pre-query prefix and answers them greedily; MT-Bench is never used. Run from the
repository root (one CPU core: ~30 min for Hydra++; runs resume), then ship the heads (bf16):
  python -m hydra_jax.training.magpie --model smollm2 --num-queries 480 \
      --out ~/.cache/hydra_jax/smollm2_magpie_v1.jsonl      # once, for all three kinds
  python train.py --config configs/smollm2_medusa.py --workdir /work/smollm2_heads/medusa
  python -m hydra_jax.models ship-heads smollm2 /work/smollm2_heads/medusa/heads medusa
Results: hydra_jax/assets/smollm2/heads/README.md.
"""

from hydra_jax.training import recipes


def get_config():
  return recipes.smollm2("medusa")
