"""Tiny CPU run: Hydra++ heads on a tiny random Llama, TinyShakespeare, a few dozen steps.

Used by the tests and as the demo. It needs a model directory; build a tiny random one
(a transformers model + a locally trained BPE tokenizer, nothing downloaded) with:
  python -c "from hydra_jax.testing import make_hf_model; make_hf_model('/tmp/hydra_tiny_model')"
then:
  python train.py --config configs/tiny_cpu.py --workdir /tmp/hydra_tiny_run
Override any field, e.g. --config.model_path=DIR --config.num_steps=100 --config.heads.arch=hydra.
Rerunning the same command resumes from the last checkpoint in the workdir.
All fields and their meaning: hydra_jax/training/config_base.py.
"""

import os

from hydra_jax.training.config_base import SHARED_DATA, base_config


def get_config():
  c = base_config()
  c.model_path = "/tmp/hydra_tiny_model"  # built by make_hf_model (see the docstring)
  c.base_name = "tiny"  # no BASE_MODELS entry: a random test model
  c.heads.arch = "hydra++"  # the full method: prefix layer + teacher loss
  c.heads.num_heads = 3  # three heads keep the compile small
  c.heads.num_layers = 2  # first block + one shared inner block
  c.heads.dropout = 0.1  # exercises the dropout rng path
  c.data.source = "text"  # plain text: every token is a target
  c.data.path = os.path.join(SHARED_DATA, "tinyshakespeare.txt")  # ../shared/data from the repo
  c.data.eval_fraction = 0.05  # held-out tail of the text
  c.data.max_records = 0  # all of it (the text source cuts one long stream into windows)
  c.seq_len = 64  # short rows: fast steps on 2 CPU cores
  c.global_batch_size = 8  # divisible by 8 fake devices in the tests
  c.train.loss = "teacher"  # Hydra++ distils the base distribution
  c.train.base_dtype = "float32"  # CPU: bf16 matmuls are slow and add noise to parity tests
  c.train.logits_chunk = 32  # two chunks per row: exercises the chunked loss
  c.optimizer.lr = 3e-3  # higher than the paper: the loss must fall within a few dozen steps
  c.optimizer.warmup_steps = 5  # short warmup for a short run
  c.optimizer.final_lr_multiplier = 0.33  # as the recipe
  c.num_epochs = 1  # unused while num_steps > 0
  c.num_steps = 40  # a few dozen steps
  c.mesh_shape = (-1, 1, 1)  # pure data parallel over whatever devices there are
  c.checkpoint_every = 10  # several checkpoints in one short run
  c.keep_checkpoints = 2  # shows the rotation
  c.eval_every = 20  # one mid-run evaluation and one at the end
  c.eval_batches = 4  # small held-out pass
  c.log_every = 5  # frequent metrics lines
  return c
