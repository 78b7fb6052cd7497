"""Tiny CPU run: Hydra++ heads for the embedded TinyShakespeare model, a few dozen steps.

Runs from a fresh clone with nothing built or downloaded first: the base is the model the
package ships (hydra_jax/assets/tiny_shakespeare) and the data is the TRAINING split of the
repository's data/tinyshakespeare.txt (hydra_jax.registry.embedded.train_split_file; the held-out
tail, where the benchmark prompts come from, is never read). About a minute on 2 CPU cores:
  python train.py --config configs/tiny_cpu.py --workdir /tmp/hydra_tiny_run
Rerunning the same command resumes from the last checkpoint (or says the run is complete).
Override any field, e.g. --config.num_steps=100 --config.heads.arch=hydra.
Real recipes: configs/embedded_*.py (the shipped heads) and configs/*_vicuna_*.py.
All fields and their meaning: hydra_jax/training/config_base.py.
"""

from hydra_jax.registry import embedded
from hydra_jax.training.config_base import base_config


def get_config():
  c = base_config()
  c.model_path = embedded.MODEL_DIR  # the shipped 8.9M-parameter base (no download)
  c.base_name = "tiny_shakespeare"  # informational: not a BASE_MODELS entry
  c.heads.arch = "hydra++"  # the full method: prefix layer + teacher loss
  c.heads.num_heads = 3  # three heads keep the compile small
  c.heads.num_layers = 2  # first block + one shared inner block
  c.heads.dropout = 0.1  # exercises the dropout rng path
  c.data.source = "text"  # plain text: every token is a target
  c.data.path = embedded.train_split_file()  # the training split only, cached as a file
  c.data.eval_fraction = 0.05  # the trainer's eval windows, carved from the training split
  c.data.max_records = 0  # all windows
  c.seq_len = 64  # short rows: fast steps on 2 CPU cores
  c.global_batch_size = 8  # divisible by 8 fake devices in the tests
  c.train.loss = "teacher"  # Hydra++ distils the base distribution
  c.train.base_dtype = "float32"  # CPU: bf16 matmuls are slower here
  c.train.logits_chunk = 32  # two chunks per row: exercises the chunked loss
  c.optimizer.lr = 3e-3  # higher than the paper: the loss must fall within a few dozen steps
  c.optimizer.warmup_steps = 5  # short warmup for a short run
  c.num_steps = 40  # a few dozen steps
  c.mesh_shape = (-1, 1, 1)  # pure data parallel over whatever devices there are
  c.checkpoint_every = 10  # several checkpoints in one short run
  c.keep_checkpoints = 2  # shows the rotation
  c.eval_every = 20  # one mid-run evaluation and one at the end
  c.eval_batches = 4  # small held-out pass
  c.log_every = 5  # frequent metrics lines
  return c
