"""The training config: every field, its default and what it means; recipe builders.

`base_config()` is the one place a field is declared (with a comment) and given its default.
The files in configs/ start from it and override what their recipe changes, so
`python train.py --config configs/NAME.py --config.optimizer.lr=1e-3` can override any field.
Library code that accepts a partial section (a dict with a few optimizer fields, say) fills
the rest from here with `section(name, given)`, so a default is never declared twice.

`BASE_MODELS` holds the architectures of the big presets' base models written out by hand
(from their published config.json), so tests and scripts can check shapes and parameter
counts with `jax.eval_shape` without having the weights.
"""

from __future__ import annotations

import difflib
from typing import Any, Dict, List, Mapping, Optional

import ml_collections

from hydra_jax.model.config import ModelConfig
from hydra_jax.training.errors import ConfigError


# Published architectures (config.json of each checkpoint). Vicuna v1.3 is Llama-1 based.
BASE_MODELS = {
    # lmsys/vicuna-7b-v1.3: 6.74B parameters.
    "vicuna_7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                             rms_norm_eps=1e-6, max_position_embeddings=2048,
                             bos_token_id=1, eos_token_ids=(2,), pad_token_id=0),
    # lmsys/vicuna-13b-v1.3: 13.0B parameters.
    "vicuna_13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                              num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                              rms_norm_eps=1e-6, max_position_embeddings=2048,
                              bos_token_id=1, eos_token_ids=(2,), pad_token_id=0),
    # lmsys/vicuna-33b-v1.3: 32.5B parameters.
    "vicuna_33b": ModelConfig(vocab_size=32000, hidden_size=6656, intermediate_size=17920,
                              num_layers=60, num_heads=52, num_kv_heads=52, head_dim=128,
                              rms_norm_eps=1e-6, max_position_embeddings=2048,
                              bos_token_id=1, eos_token_ids=(2,), pad_token_id=0),
    # meta-llama/Meta-Llama-3-8B-Instruct: 8.03B parameters, GQA (8 KV heads), 128k vocab.
    "llama3_8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                             rms_norm_eps=1e-5, rope_theta=500000.0,
                             max_position_embeddings=8192, bos_token_id=128000,
                             eos_token_ids=(128001, 128009)),
}

# Where each big preset expects its base model and data; override with --config.model_path /
# --config.data.path. Vicuna was fine-tuned on ShareGPT, so its heads train on ShareGPT.
_MODEL_DIRS = {
    "vicuna_7b": "models/vicuna-7b-v1.3",
    "vicuna_13b": "models/vicuna-13b-v1.3",
    "vicuna_33b": "models/vicuna-33b-v1.3",
    "llama3_8b": "models/Meta-Llama-3-8B-Instruct",
}
_SHAREGPT = "data/ShareGPT_V4.3_unfiltered_cleaned_split.json"


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with a small-but-valid default."""
  c = ml_collections.ConfigDict()
  c.model_path = ""  # Hugging Face model directory of the frozen base (config.json + safetensors)
  c.base_name = ""  # informational: which BASE_MODELS entry this recipe was written for

  c.heads = ml_collections.ConfigDict()
  c.heads.arch = "hydra++"  # "medusa" | "hydra" | "hydra++" (prefix layer + teacher loss)
  c.heads.num_heads = 4  # draft heads; head k predicts token t+k+2
  c.heads.num_layers = 1  # blocks per head (Hydra++ recipe: 4)
  c.heads.shared_inner = True  # the L-1 inner blocks are ONE module (as the released checkpoints)
  c.heads.dropout = 0.0  # dropout before every block and the LM head (Hydra++ recipe: 0.2)
  c.heads.lm_head = "own"  # "own": an LM head per head (the paper); "base": reuse the base's
  c.heads.draft_vocab_size = 0  # >0: heads rank only the N most frequent training tokens
  c.heads.init_from = ""  # optional dir of heads (save_heads format) to start from instead of random

  c.data = ml_collections.ConfigDict()
  c.data.source = "sharegpt"  # "sharegpt" (JSON / JSONL conversations) | "text" | "tfds"
  c.data.path = ""  # "sharegpt" / "text": a file, a glob, or a comma-separated list of them
  c.data.missing_hint = ""  # how to make data.path when it is missing (generated data's recipes)
  c.data.template = "chat_template"  # "chat_template" (the tokenizer's) | "vicuna_v1.1" | "plain"
  c.data.tfds_name = ""  # TFDS dataset name, e.g. "tiny_shakespeare" (source "tfds")
  c.data.tfds_data_dir = ""  # local TFDS data_dir (nothing is downloaded)
  c.data.tfds_split = "train"  # TFDS split to read; the held-out part is cut from it
  c.data.tfds_text_key = "text"  # feature holding the text
  c.data.eval_fraction = 0.05  # held-out share of the records (the 95/5 split)
  c.data.max_records = 0  # 0 = all; else the first N records / TFDS documents / text windows
  c.data.system_prompt = ""  # system prompt for chat templates ("" = the template's default)
  # The frozen base's hidden states for the training rows, built once by `python -m
  # hydra_jax.training.feature_cache --config ... --out DIR`: train steps then skip the base
  # forward (the teacher is still the base's LM head over them); evaluation stays online.
  c.data.feature_cache = ""  # that DIR; "" = off (the base runs in every train step)

  c.seq_len = 2048  # tokens per training row; must be <= the base's max_position_embeddings
  c.global_batch_size = 32  # rows per optimizer step over all processes

  c.train = ml_collections.ConfigDict()
  c.train.loss = "teacher"  # "hard" (labels) | "teacher" (soft CE vs the base) | "both"
  c.train.head_weights = "equal"  # "equal" | "decay" (0.8**k per head)
  c.train.base_dtype = "bfloat16"  # dtype the frozen base is stored and run in
  c.train.compute_dtype = "float32"  # activation dtype of the heads (params stay f32)
  c.train.logits_chunk = 512  # T-chunk for the per-head LM head + loss (bounds [B,T,V] memory)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 5e-4  # peak learning rate (after warmup)
  c.optimizer.b1 = 0.9  # AdamW beta1
  c.optimizer.b2 = 0.999  # AdamW beta2
  c.optimizer.eps = 1e-8  # AdamW epsilon
  c.optimizer.weight_decay = 0.1  # decoupled weight decay (not on biases or norms)
  c.optimizer.warmup_steps = 100  # linear warmup from 0 to lr
  c.optimizer.final_lr_multiplier = 0.33  # cosine decays to this x lr at the last step
  c.optimizer.clip_norm = 1.0  # global gradient-norm clip (0 = off)
  c.optimizer.grad_accum_steps = 1  # micro-batches accumulated per update (1 = off)

  c.num_epochs = 10  # passes over the training split (used when num_steps == 0)
  c.num_steps = 0  # total optimizer steps; 0 = num_epochs x steps per epoch
  c.mesh_shape = (1, -1, 1)  # (data, fsdp, tensor) device mesh; -1 = all remaining devices
  c.seed = 0  # seeds head init, dropout and data shuffling

  c.checkpoint_every = 1000  # save an orbax checkpoint every N steps (and always at the end)
  c.keep_checkpoints = 3  # keep the last K checkpoints
  c.async_checkpoints = True  # write checkpoints in the background while training continues
  c.eval_every = 1000  # evaluate on the held-out split every N steps (and at the end; 0 = end only)
  c.eval_batches = 20  # batches per evaluation (0 = the whole held-out split)
  c.eval_tree = "mc_sim_7b_63"  # tree (reference_trees.json name or file) for predicted accept length
  c.log_every = 10  # write train metrics (averaged) to metrics.jsonl every N steps
  c.export_dir = ""  # where the final heads go (save_heads format); "" = WORKDIR/heads
  c.progress_bar = True  # tqdm progress bar on stderr (process 0 only)
  c.step_delay_s = 0.0  # sleep after each step; only for kill-and-resume tests and demos

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"  # "auto" (when launched as several processes) | "always" | "never"
  c.distributed.coordinator_address = ""  # host:port of process 0 ("" = from env / cluster)
  c.distributed.num_processes = 0  # 0 = from env / cluster
  c.distributed.process_id = -1  # -1 = from env / cluster
  return c


def recipe(arch: str, base_name: str) -> ml_collections.ConfigDict:
  """The paper's recipe for `arch` on one of BASE_MODELS (ShareGPT, 32 x 2048, 10 epochs).

  Hydra++: teacher loss, prefix layer, 4 heads x 4 layers, dropout 0.2, AdamW 5e-4
  (0.9, 0.999, 1e-8), wd 0.1, 100 warmup steps, cosine to 0.33 x lr. Medusa and Hydra use
  hard labels and one block per head, with the same data and schedule so the three compare
  like with like.
  """
  if arch not in ("medusa", "hydra", "hydra++"):
    raise ValueError(f"unknown heads arch {arch!r}: use 'medusa', 'hydra' or 'hydra++'")
  if base_name not in BASE_MODELS:
    raise ValueError(f"unknown base {base_name!r}: one of {', '.join(BASE_MODELS)}")
  c = base_config()
  c.model_path = _MODEL_DIRS[base_name]
  c.base_name = base_name
  c.heads.arch = arch
  c.heads.num_heads = 4
  c.heads.num_layers = 4 if arch == "hydra++" else 1
  c.heads.dropout = 0.2 if arch == "hydra++" else 0.0
  c.train.loss = "teacher" if arch == "hydra++" else "hard"
  c.data.source = "sharegpt"
  c.data.path = _SHAREGPT
  # Vicuna was trained on the v1.1 template; Llama-3 Instruct has its own chat template.
  c.data.template = "chat_template" if base_name.startswith("llama3") else "vicuna_v1.1"
  c.data.eval_fraction = 0.05
  c.seq_len = 2048
  c.global_batch_size = 32
  c.num_epochs = 10
  # FSDP over every device (the 33B base does not fit one chip). The batch splits over
  # data x fsdp, so with more than 32 devices put the rest on tensor, e.g. (1, 32, 2).
  c.mesh_shape = (1, -1, 1)
  c.checkpoint_every = 500
  c.eval_every = 1000
  return c


# --- reading sections and field names --------------------------------------------------------


def _plain(cfg: Any) -> Dict[str, Any]:
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  if isinstance(cfg, Mapping):
    return dict(cfg)
  raise TypeError(f"expected a ConfigDict or a dict, got {type(cfg).__name__}")


def section(name: str, given: Any = None) -> Dict[str, Any]:
  """Section `name` of base_config() as a dict, with the fields of `given` (partial) over it.

  A field the base config does not declare is an error that suggests the close names, so a
  typo never silently falls back to a default.
  """
  defaults = base_config()[name].to_dict()
  given = _plain(given)
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ConfigError(f"unknown {name} field{'s' if len(unknown) > 1 else ''} "
                   f"{', '.join(repr(u) for u in unknown)}"
                   f"{suggestion(unknown[0], list(defaults))}; the {name} fields are "
                   f"{', '.join(sorted(defaults))} (hydra_jax/training/config_base.py)")
  defaults.update(given)
  return defaults


def field_paths(cfg: Optional[ml_collections.ConfigDict] = None, prefix: str = "") -> List[str]:
  """Dotted names of every leaf field ("optimizer.lr", ...) of `cfg` (default: base_config())."""
  cfg = base_config() if cfg is None else cfg
  out: List[str] = []
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(field_paths(value, f"{prefix}{key}."))
    else:
      out.append(prefix + key)
  return out


def suggestion(name: str, known: List[str]) -> str:
  """' (did you mean a or b?)' for the known dotted names close to `name`, else ''.

  Matched part by part (section, then field), so "optimizer.lrr" suggests optimizer.lr
  rather than every field that shares the "optimizer." prefix.
  """
  parts = name.split(".")
  prefixes = [""]
  for i, part in enumerate(parts):
    options = sorted({k.split(".")[i] for k in known for p in prefixes
                      if k.startswith(p) and len(k.split(".")) > i})
    matched = [part] if part in options else difflib.get_close_matches(part, options, n=3,
                                                                       cutoff=0.6)
    prefixes = [p + m + ("." if i < len(parts) - 1 else "") for p in prefixes for m in matched]
    if not prefixes:
      return ""
  close = [p for p in prefixes if p in known and p != name][:3]
  return f" (did you mean {' or '.join(close)}?)" if close else ""
