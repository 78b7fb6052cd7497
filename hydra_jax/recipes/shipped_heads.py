"""How the shipped draft heads were trained: one recipe per base model, shared by its kinds.

The three kinds of one base (Medusa, Hydra, Hydra++) see the same data, batch, steps and
optimizer, so they compare like with like; only the head architecture differs (and Hydra++'s
teacher loss, as in the paper). Both bases are distilled on their OWN output (the text their
heads will draft for):

  tiny_shakespeare  greedy continuations of training-split speeches (`embedded`
                    --self-distill); 4 heads, own LM heads over the 1,024 most frequent
                    training tokens (of 2,048).
  smollm2           Magpie conversations (`training.magpie`: the model writes the questions
                    and answers them); 4 heads sharing the base's LM head over a 4,096-token
                    draft vocabulary (of 49,152), which keeps all three kinds small enough to
                    ship in the package.

configs/{embedded,smollm2}_{medusa,hydra,hydra_pp}.py are one-line wrappers of these.
"""

from __future__ import annotations

import os

from hydra_jax.registry.paths import REPO_ROOT
from hydra_jax.training.config_base import base_config

# The Magpie data set of the SmolLM2 heads (a clone's data/, not in a wheel).
SMOLLM2_DATA = os.path.join(REPO_ROOT, "data", "smollm2_magpie")

KINDS = {
    # kind: (arch, blocks per head, dropout, loss)
    "medusa": ("medusa", 1, 0.0, "hard"),
    "hydra": ("hydra", 1, 0.0, "hard"),
    "hydra_pp": ("hydra++", 4, 0.2, "teacher"),
}


def _heads(c, kind: str) -> None:
  arch, layers, dropout, loss = KINDS[kind]
  c.heads.arch = arch
  c.heads.num_heads = 4  # as the paper: head k predicts token t+k+2
  c.heads.num_layers = layers
  c.heads.shared_inner = True  # inner blocks as one module, like the released checkpoints
  c.heads.dropout = dropout
  c.train.loss = loss  # hard labels are the base's own greedy tokens here; Hydra++: soft CE


def embedded(kind: str, num_steps: int = 300):
  """Heads for the embedded TinyShakespeare model (hydra_jax/assets/tiny_shakespeare)."""
  from hydra_jax.registry import embedded as emb
  c = base_config()
  c.model_path = emb.MODEL_DIR  # the shipped base (f16 safetensors, loaded as f32)
  c.base_name = "tiny_shakespeare"  # informational: not a BASE_MODELS entry
  _heads(c, kind)
  c.heads.lm_head = "own"  # an LM head per head, initialised from the base's (the paper)
  c.heads.draft_vocab_size = 1024  # half the vocabulary: same predicted tau, half the LM heads
  c.data.source = "sharegpt"  # the base's own greedy replies (self-distillation)
  c.data.path = emb.self_distill_file()  # checked when training starts, not here
  c.data.missing_hint = f"write the heads' training data first with `{emb.SELF_DISTILL_COMMAND}`"
  c.data.template = "plain"  # prompt + newline + reply, as the prompts were rendered
  c.data.eval_fraction = 0.05  # the trainer's eval conversations, held out of training
  c.seq_len = 256  # the base was pretrained on 256-token windows
  c.global_batch_size = 8
  # 300 steps x 8 x 256 tokens = 614k tokens, 1.2 epochs of the self-distilled data; the
  # warmup was fixed at 50 steps when the shipped heads were trained.
  _f32_single_device(c, lr=2e-3, warmup_steps=50)
  c.num_steps = num_steps
  c.checkpoint_every = 25  # ~10 min of CPU between checkpoints (runs resume)
  c.eval_every = 0  # evaluate at the end only (saves CPU time)
  return c


def smollm2(kind: str, num_epochs: int = 10):
  """Heads for SmolLM2-135M-Instruct (python -m hydra_jax.registry.models path smollm2).

  Data: Magpie self-distillation, no dataset: the model writes user questions from its chat
  template's pre-query prefix and answers them greedily; MT-Bench is never used. The data set
  is in the repository (data/smollm2_magpie: 2,560 conversations, 510,895 answer tokens).
  From the repository root, once per base (the cache serves all three kinds), then per kind,
  then ship the heads (bf16):
    python -m hydra_jax.training.feature_cache --config configs/smollm2_hydra_pp.py \
        --out ~/.cache/hydra_jax/features/smollm2_magpie
    python train.py --config configs/smollm2_KIND.py --workdir /work/smollm2_heads/KIND \
        --config.data.feature_cache=~/.cache/hydra_jax/features/smollm2_magpie
    python -m hydra_jax.registry.models ship-heads smollm2 /work/smollm2_heads/KIND/heads KIND
  The shipped heads ran exactly this on one H200 (cache 33 s, the three kinds side by side in
  116 s); on the 2-core CPU the cache takes ~30 min and a Hydra++ epoch ~21 min (runs
  resume). Regenerate the data with `python -m hydra_jax.training.magpie --model smollm2
  --target-tokens 500000 --out data/smollm2_magpie` (resumable).
  Results: hydra_jax/assets/smollm2/heads/README.md.
  """
  c = base_config()
  c.model_path = "smollm2"  # a registry name: the trainer prepares it, loading this config does not
  c.base_name = "smollm2-135m-instruct"
  _heads(c, kind)
  c.heads.lm_head = "base"  # the base's LM head (frozen), restricted to the draft vocabulary
  # What the shipped heads were trained with. It holds 84% of the tokens SmolLM2 writes on
  # MT-Bench (8,192: 90%, 16,384: 95%; benchmarks/results/smollm2_draft_vocab/), and a
  # vocabulary extended after training gains nothing: the next run should train with more.
  c.heads.draft_vocab_size = 4096
  c.data.source = "sharegpt"
  # A directory: its shard-*.jsonl in order (data.expand_paths).
  # In the repository, not the cache: the data set is ~70 min of 2-core CPU to write and a
  # machine reset lost a cached copy once; committed shards survive any machine.
  c.data.path = os.environ.get("HYDRA_SMOLLM2_DATA") or SMOLLM2_DATA
  c.data.missing_hint = ("write the Magpie conversations first with `python -m "
                         "hydra_jax.training.magpie --model smollm2 --target-tokens 500000 "
                         f"--out {c.data.path}` (resumable: rerun it to continue)")
  c.data.template = "chat_template"  # ChatML; loss on the assistant replies only
  c.data.eval_fraction = 0.05
  c.seq_len = 384  # a question + a 256-token answer in ChatML fits: little padding
  c.global_batch_size = 4
  # 10 epochs of 608 steps (2,432 training rows of 4 x 384 tokens): the held-out top-1 and
  # predicted accept length still rose at epoch 10 for every kind (the model card's table).
  _f32_single_device(c, lr=1e-3, warmup_steps=16)
  c.num_steps = 0  # num_epochs decides
  c.num_epochs = num_epochs
  c.eval_every = 608  # every epoch of data/smollm2_magpie
  c.eval_batches = 0  # all 128 held-out conversations
  c.checkpoint_every = 100  # ~3.5 min of one CPU core on cached features
  return c


def _f32_single_device(c, lr: float, warmup_steps: int) -> None:
  """What both bases' runs share: f32, one device (or a data-parallel mesh), AdamW with a short
  warmup and a cosine to 0.33 x lr; the step / epoch budget and checkpoints are the caller's."""
  c.train.base_dtype = "float32"
  c.train.compute_dtype = "float32"
  c.train.logits_chunk = 128
  c.optimizer.lr = lr  # above the recipe's 5e-4: hundreds of steps, not thousands
  c.optimizer.warmup_steps = warmup_steps
  c.optimizer.final_lr_multiplier = 0.33
  c.optimizer.clip_norm = 1.0
  c.mesh_shape = (1, -1, 1)
  c.keep_checkpoints = 1
  c.eval_tree = "mc_sim_7b_63"  # tree for the predicted accept length
  c.log_every = 10
