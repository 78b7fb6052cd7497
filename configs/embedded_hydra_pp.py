"""Hydra++ heads for the embedded TinyShakespeare model (hydra_jax/assets/tiny_shakespeare).

The paper's Hydra++ recipe scaled to the 8.9M-parameter base: prefix attention layer, 4 heads
x 4 blocks, dropout 0.2, teacher (soft-label) distillation from the base.

Data: the TRAINING split of TinyShakespeare only (the model card's contiguous split, via
hydra_jax.embedded.train_split_file); the held-out tail, where the benchmark prompts come
from, is never read. The three embedded configs (medusa, hydra, hydra_pp) share data, batch,
steps and optimizer, so they see the same 409,600 training tokens.

Run (from the repository root; ~7 min on 2 shared CPU cores), then ship the heads (bf16):
  nice -n 5 python train.py --config configs/embedded_hydra_pp.py \
      --workdir /work/embedded_heads/hydra_pp
  python -m hydra_jax.embedded --ship-heads /work/embedded_heads/hydra_pp/heads hydra_pp
All fields and their meaning: hydra_jax/training/config_base.py. Results:
hydra_jax/assets/tiny_shakespeare/heads/README.md.
"""

from hydra_jax import embedded
from hydra_jax.training.config_base import base_config


def get_config():
  c = base_config()
  c.model_path = embedded.MODEL_DIR  # the shipped base (f16 safetensors, loaded as f32)
  c.base_name = "tiny_shakespeare"  # informational: not a BASE_MODELS entry
  c.heads.arch = "hydra++"  # prefix layer + sequentially dependent heads
  c.heads.num_heads = 4  # as the paper: head k predicts token t+k+2
  c.heads.num_layers = 4  # the Hydra++ recipe's 4 blocks per head (first + shared inner)
  c.heads.shared_inner = True  # inner blocks as one module, like the released checkpoints
  c.heads.dropout = 0.2  # the recipe's dropout before every block and the LM head
  c.heads.init_from = ""  # random init (LM heads copied from the base)
  c.data.source = "text"  # plain text: every token is a target
  c.data.path = embedded.train_split_file()  # the training split only, cached as a file
  c.data.eval_fraction = 0.05  # the trainer's eval windows, carved from the TRAINING split
  c.data.max_records = 0  # all windows
  c.seq_len = 256  # the base was pretrained on 256-token windows
  c.global_batch_size = 8  # 2048 tokens per step: more updates in a short run
  c.train.loss = "teacher"  # Hydra++: soft CE against the base's own distribution
  c.train.head_weights = "equal"  # summed per-head means, as the paper
  c.train.base_dtype = "float32"  # CPU: f32 matmuls are faster than bf16 here
  c.train.compute_dtype = "float32"  # heads' activations
  c.train.logits_chunk = 128  # two T-chunks per row for the vocab-wide buffers
  c.optimizer.lr = 2e-3  # above the recipe's 5e-4: 200 steps instead of thousands
  c.optimizer.b1 = 0.9  # AdamW betas / eps as the recipe
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1  # as the recipe
  c.optimizer.warmup_steps = 20  # 10% of the run (the recipe: 100 of thousands)
  c.optimizer.final_lr_multiplier = 0.33  # cosine to 0.33 x lr, as the recipe
  c.optimizer.clip_norm = 1.0  # global gradient-norm clip
  c.optimizer.grad_accum_steps = 1  # no accumulation
  c.num_epochs = 1  # unused: num_steps is set
  c.num_steps = 200  # 409,600 tokens (~1.2 epochs); the same for the three configs
  c.mesh_shape = (1, -1, 1)  # whatever devices there are (one CPU device)
  c.seed = 0  # head init, dropout, data order
  c.checkpoint_every = 100  # resumable if interrupted
  c.keep_checkpoints = 1  # the workdir stays small
  c.async_checkpoints = True  # save while training continues
  c.eval_every = 0  # evaluate at the end only (saves CPU time)
  c.eval_batches = 0  # the whole eval split (~68 windows)
  c.eval_tree = "mc_sim_7b_63"  # tree for the predicted accept length
  c.log_every = 10  # metrics.jsonl every 10 steps
  c.export_dir = ""  # WORKDIR/heads (f32); shipped in bf16 by --ship-heads
  c.progress_bar = True  # tqdm on stderr
  return c
