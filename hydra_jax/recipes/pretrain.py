"""Pretraining the embedded base model: a small Llama on TinyShakespeare, from scratch.

This is what made `hydra_jax/assets/tiny_shakespeare/` (see its README.md for the command
and the numbers). The pieces, in order:

  split_text       (registry.embedded) the last `val_fraction` of the text, cut at a speech boundary, is held out
  train_tokenizer  byte-level BPE (tokenizers) trained on the TRAINING split only
  pretrain         AdamW (warmup + cosine) on random seq_len+1 windows of the token stream,
                   our own Flax forward (no cache, causal mask), periodic validation and
                   checkpoints (resumed from when the work dir has one)
  export           hydra_jax.checkpoint.hf.export_hf in fp16/bf16 + the tokenizer

Reproducible: init comes from `seed`, and the windows of step s from
np.random.default_rng((seed, s)), so a resumed run sees the batches an uninterrupted one
would have seen. XLA's CPU reductions are deterministic for a fixed thread count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.checkpoint.hf import export_hf
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.llama import LlamaModel, init_params
from hydra_jax.registry.embedded import split_text
from hydra_jax.training import optimizer as optim

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, in this order
CHECKPOINT_FILE = "pretrain_state.npz"

# Speeches in the corpus are "NAME:\nline\nline\n\n"; this template renders a conversation as
# a scene between two speakers, so --chat decoding and chat-format head training have
# something the model has seen. Each turn ends with the blank line that ends a speech.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}First Citizen:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}MENENIUS:\n{{ m['content'] }}\n\n"
    "{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}MENENIUS:\n{% endif %}")


def _corpus() -> str:
  from hydra_jax.registry.embedded import corpus_path
  return corpus_path()


@dataclasses.dataclass
class PretrainConfig:
  data: str = ""  # "" = the repository's TinyShakespeare (embedded.corpus_path())
  workdir: str = "/tmp/pretrain_run"  # tokenizer, checkpoint, metrics; export goes to export_dir
  export_dir: Optional[str] = None  # None = <workdir>/export
  export_dtype: str = "float16"  # "float16" | "bfloat16" | "float32"
  val_fraction: float = 0.1  # the last 10% of the text (cut at a blank line) is validation
  # Model.
  vocab_size: int = 2048
  hidden_size: int = 320
  intermediate_size: int = 896
  num_layers: int = 6
  num_heads: int = 5
  num_kv_heads: int = 5
  max_position_embeddings: int = 512
  tie_word_embeddings: bool = False
  rope_theta: float = 10000.0
  # Optimization.
  seq_len: int = 256
  batch_size: int = 8
  steps: int = 650  # the cosine schedule runs over this many steps
  minutes: float = 0.0  # > 0: stop (and export) after this much training time, even if early
  lr: float = 1e-3
  final_lr_multiplier: float = 0.1
  warmup_steps: int = 30
  weight_decay: float = 0.1
  b2: float = 0.99
  clip_norm: float = 1.0
  seed: int = 0
  # Bookkeeping.
  eval_every: int = 100  # steps between validation passes (a pass = all of the val split)
  eval_windows: int = 48  # periodic evals use this many windows (0 = all); the final uses all
  checkpoint_every: int = 25  # steps between checkpoints of params + optimizer state

  def model_config(self) -> ModelConfig:
    if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
      raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads "
                       f"{self.num_heads}, and num_heads by num_kv_heads {self.num_kv_heads}")
    return ModelConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_layers=self.num_layers,
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
        head_dim=self.hidden_size // self.num_heads, rms_norm_eps=1e-5,
        rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings, model_type="llama",
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=3)


# --- data ----------------------------------------------------------------------------------


def train_tokenizer(train_text: str, vocab_size: int, chat_template: Optional[str] = CHAT_TEMPLATE):
  """A transformers fast tokenizer: byte-level BPE of `vocab_size` tokens, ids 0-3 special."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  # Speeches as training units: merges never span two speakers.
  tok.train_from_iterator(train_text.split("\n\n"), trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>", pad_token="<pad>",
                                 model_max_length=1 << 30, clean_up_tokenization_spaces=False)
  if chat_template:
    fast.chat_template = chat_template
  got = [fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
  if got != list(range(len(SPECIAL_TOKENS))):
    raise AssertionError(f"special tokens got ids {got}, expected 0..3")
  return fast


def encode(tokenizer, text: str) -> np.ndarray:
  """The whole text as one int32 token stream (no BOS/EOS: the corpus is one document)."""
  return np.asarray(tokenizer.backend_tokenizer.encode(text).ids, dtype=np.int32)


def train_windows(tokens: np.ndarray, seed: int, step: int, batch: int, length: int) -> np.ndarray:
  """[batch, length] random windows; a function of (seed, step) alone, so resume is exact."""
  rng = np.random.default_rng((seed, step))
  starts = rng.integers(0, len(tokens) - length + 1, size=batch)
  return np.stack([tokens[s:s + length] for s in starts])


def val_windows(tokens: np.ndarray, length: int, limit: int = 0) -> np.ndarray:
  """Non-overlapping [N, length] windows covering the val stream (the ragged tail dropped)."""
  n = len(tokens) // length
  if limit > 0:
    n = min(n, limit)
  return tokens[:n * length].reshape(n, length)


# --- model and steps -----------------------------------------------------------------------


def init_model(cfg: ModelConfig, seed: int) -> Dict[str, Any]:
  """N(0, 0.02) everywhere, residual-branch outputs scaled by 1/sqrt(2 L) (GPT-2), so the
  residual stream does not grow with depth at init."""
  params = init_params(cfg, jax.random.key(seed))
  scale = 1.0 / math.sqrt(2 * cfg.num_layers)
  for i in range(cfg.num_layers):
    layer = params[f"layers_{i}"]
    layer["self_attn"]["o_proj"]["kernel"] = layer["self_attn"]["o_proj"]["kernel"] * scale
    layer["mlp"]["down_proj"]["kernel"] = layer["mlp"]["down_proj"]["kernel"] * scale
  return params


def _window_losses(model: LlamaModel, params, windows_BxL):
  """Per-window mean next-token cross-entropy (nats) over the L-1 predicted positions: [B]."""
  inputs, targets = windows_BxL[:, :-1], windows_BxL[:, 1:]
  b, t = inputs.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
  logits, _, _ = model.apply({"params": params}, inputs, positions)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.mean(nll, axis=-1)


def make_steps(cfg: ModelConfig, opt):
  """(train_step, eval_step), jitted; train_step donates params and optimizer state."""
  model = LlamaModel(cfg)

  def train_step(params, opt_state, windows_BxL):
    loss_fn = lambda p: jnp.mean(_window_losses(model, p, windows_BxL))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params, opt_state, loss, optim.current_lr(opt_state)

  def eval_step(params, windows_BxL):
    return _window_losses(model, params, windows_BxL)

  return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(eval_step)


def evaluate(eval_step, params, windows_NxL: np.ndarray, batch: int) -> float:
  """Mean loss over all windows (equal lengths, so = the mean over all predicted tokens).
  The last batch is padded by repeating a row (one compiled shape) and the pad is dropped."""
  losses = []
  for i in range(0, len(windows_NxL), batch):
    chunk = windows_NxL[i:i + batch]
    real = len(chunk)
    if real < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
    losses.append(np.asarray(eval_step(params, chunk))[:real])
  return float(np.mean(np.concatenate(losses))) if losses else float("nan")


# --- checkpoints ---------------------------------------------------------------------------


def _flat(tree) -> Dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(jax.device_get(x)) for path, x in leaves}


def save_state(path: str, params, opt_state, step: int, history) -> None:
  """params + optimizer state + step as one npz, written to a tmp file then renamed."""
  arrays = {f"params{k}": v for k, v in _flat(params).items()}
  arrays.update({f"opt{k}": v for k, v in _flat(opt_state).items()})
  arrays["__step__"] = np.asarray(step)
  arrays["__history__"] = np.frombuffer(json.dumps(history).encode(), dtype=np.uint8)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_state(path: str, params, opt_state):
  """Restores into the structure of (params, opt_state); returns (params, opt, step, history)."""
  with np.load(path) as z:
    def fill(prefix, tree):
      leaves = jax.tree_util.tree_leaves_with_path(tree)
      vals = []
      for p, like in leaves:
        key = prefix + jax.tree_util.keystr(p)
        if key not in z.files or z[key].shape != like.shape:
          raise ValueError(f"{path} does not match this run's model/optimizer (leaf {key}); "
                           f"use another --workdir or delete the file to start over")
        vals.append(jnp.asarray(z[key], dtype=like.dtype))
      return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), vals)
    return (fill("params", params), fill("opt", opt_state), int(z["__step__"]),
            json.loads(bytes(z["__history__"]).decode()))


# --- the run -------------------------------------------------------------------------------


def prepare_data(cfg: PretrainConfig):
  """(tokenizer, train ids, val ids, split facts); the tokenizer is reused from the workdir."""
  from transformers import PreTrainedTokenizerFast
  with open(cfg.data or _corpus(), encoding="utf-8") as f:
    text = f.read()
  train_text, val_text = split_text(text, cfg.val_fraction)
  tok_dir = os.path.join(cfg.workdir, "tokenizer")
  if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
  else:
    tokenizer = train_tokenizer(train_text, cfg.vocab_size)
    tokenizer.save_pretrained(tok_dir)
  if len(tokenizer) != cfg.vocab_size:
    raise ValueError(f"the tokenizer in {tok_dir} has {len(tokenizer)} tokens but vocab_size is "
                     f"{cfg.vocab_size}; use another --workdir")
  train_ids, val_ids = encode(tokenizer, train_text), encode(tokenizer, val_text)
  counts = np.bincount(train_ids, minlength=cfg.vocab_size).astype(np.float64) + 1.0
  logp = np.log(counts / counts.sum())
  split = dict(chars_total=len(text), chars_train=len(train_text), chars_val=len(val_text),
               train_tokens=int(len(train_ids)), val_tokens=int(len(val_ids)),
               val_first_line=val_text.split("\n", 1)[0],
               # The baseline to beat: val cross-entropy of add-one-smoothed train unigrams.
               unigram_val_loss=float(-np.mean(logp[val_ids])))
  return tokenizer, train_ids, val_ids, split


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def pretrain(cfg: PretrainConfig, command: str = "") -> Dict[str, Any]:
  """Trains (or resumes) in cfg.workdir, exports to cfg.export_dir; returns the summary."""
  from tqdm import tqdm
  os.makedirs(cfg.workdir, exist_ok=True)
  export_dir = cfg.export_dir or os.path.join(cfg.workdir, "export")
  tokenizer, train_ids, val_ids, split = prepare_data(cfg)
  mcfg = cfg.model_config()
  length = cfg.seq_len + 1
  if len(train_ids) < length or len(val_ids) < length:
    raise ValueError(f"seq_len {cfg.seq_len} is longer than the data ({len(train_ids)} train, "
                     f"{len(val_ids)} val tokens)")
  _log(f"data: {split['train_tokens']} train / {split['val_tokens']} val tokens; unigram val "
       f"loss {split['unigram_val_loss']:.3f}; model {mcfg.num_params / 1e6:.2f}M params")

  opt = optim.make_optimizer(dict(
      lr=cfg.lr, b1=0.9, b2=cfg.b2, eps=1e-8, weight_decay=cfg.weight_decay,
      warmup_steps=cfg.warmup_steps, final_lr_multiplier=cfg.final_lr_multiplier,
      clip_norm=cfg.clip_norm, grad_accum_steps=1), cfg.steps)
  params = init_model(mcfg, cfg.seed)
  opt_state = opt.init(params)
  ckpt = os.path.join(cfg.workdir, CHECKPOINT_FILE)
  step, history = 0, {"evals": [], "train_seconds": 0.0}
  if os.path.isfile(ckpt):
    params, opt_state, step, history = load_state(ckpt, params, opt_state)
    _log(f"resumed from {ckpt} at step {step}")
  train_step, eval_step = make_steps(mcfg, opt)
  val_all = val_windows(val_ids, length)
  # A fixed sample of train windows, as many as val ones, for a like-for-like train loss.
  # (step 2**40 is never a training step, so these are not the windows of any one batch.)
  train_all = train_windows(train_ids, cfg.seed, 1 << 40, len(val_all), length)
  some = cfg.eval_windows if cfg.eval_windows > 0 else len(val_all)

  def run_eval(label_step, full=False):
    t0 = time.perf_counter()
    val_w, train_w = (val_all, train_all) if full else (val_all[:some], train_all[:some])
    rec = dict(step=label_step, val_loss=evaluate(eval_step, params, val_w, cfg.batch_size),
               train_loss=evaluate(eval_step, params, train_w, cfg.batch_size),
               windows=len(val_w), train_seconds=round(history["train_seconds"], 1))
    history["evals"].append(rec)
    _log(f"step {label_step}: train loss {rec['train_loss']:.4f}  val loss "
         f"{rec['val_loss']:.4f}  ({time.perf_counter() - t0:.1f}s eval)")
    return rec

  budget_s = cfg.minutes * 60.0 if cfg.minutes > 0 else float("inf")
  tokens_per_step = cfg.batch_size * cfg.seq_len
  bar = tqdm(total=cfg.steps, initial=step, file=sys.stderr, dynamic_ncols=True,
             mininterval=5.0, smoothing=0.05, unit="step")
  ema, stopped_early, last_save, first = None, False, step, True
  try:
    while step < cfg.steps:
      if history["train_seconds"] >= budget_s:
        stopped_early = True
        _log(f"time budget of {cfg.minutes} min reached at step {step}/{cfg.steps}")
        break
      t0 = time.perf_counter()
      windows = train_windows(train_ids, cfg.seed, step, cfg.batch_size, length)
      params, opt_state, loss, lr = train_step(params, opt_state, windows)
      loss = float(loss)
      if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr or raise "
                                 f"--warmup_steps (the last checkpoint is {ckpt})")
      dt = time.perf_counter() - t0
      step += 1
      if not first:  # a process's first step includes compiling
        history["train_seconds"] += dt
        history["timed_steps"] = history.get("timed_steps", 0) + 1
      first = False
      ema = loss if ema is None else 0.95 * ema + 0.05 * loss
      bar.set_postfix(loss=f"{ema:.3f}", lr=f"{float(lr):.2e}",
                      tok_s=f"{tokens_per_step / dt:.0f}", refresh=False)
      bar.update(1)
      if step % cfg.eval_every == 0 and step < cfg.steps:
        run_eval(step)
      if step - last_save >= cfg.checkpoint_every:
        save_state(ckpt, params, opt_state, step, history)
        last_save = step
  except KeyboardInterrupt:
    save_state(ckpt, params, opt_state, step, history)  # ^C between steps loses nothing
    raise
  finally:
    bar.close()  # (a NaN loss keeps the last good checkpoint: nothing is saved over it)

  save_state(ckpt, params, opt_state, step, history)
  final = run_eval(step, full=True)
  export_hf(params, mcfg, export_dir, dtype=cfg.export_dtype, tokenizer=tokenizer)
  summary = dict(
      command=command, config=dataclasses.asdict(cfg), split=split, steps_done=step,
      stopped_early=stopped_early, num_params=mcfg.num_params,
      tokens_seen=step * tokens_per_step,
      epochs=step * tokens_per_step / split["train_tokens"],
      train_seconds=round(history["train_seconds"], 1),
      seconds_per_step=round(history["train_seconds"] / max(history.get("timed_steps", 0), 1), 3),
      final_train_loss=final["train_loss"], final_val_loss=final["val_loss"],
      evals=history["evals"])
  summary.update(check_export(export_dir, val_all, cfg.batch_size))
  with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  write_model_card(export_dir, summary)
  return summary


def check_export(export_dir: str, val_w: np.ndarray, batch: int) -> Dict[str, Any]:
  """Reloads the exported directory with our loader: val loss of the rounded weights, greedy
  and sampled continuations from our decoder, and the size on disk."""
  from hydra_jax.checkpoint.hf import load_hf_model
  from hydra_jax.decoding.api import generate
  model = load_hf_model(export_dir)
  _, eval_step = make_steps(model.config, optim.make_optimizer({}, 1))
  out = dict(exported_val_loss=evaluate(eval_step, model.params, val_w, batch))
  prompt = "ROMEO:\n"
  greedy = generate(model, [prompt], max_new_tokens=120)[0]
  sampled = generate(model, [prompt], max_new_tokens=120, temperature=0.8, top_k=50, seed=0)[0]
  out.update(sample_prompt=prompt, greedy_sample=greedy.text, sampled_sample=sampled.text,
             size_bytes=sum(os.path.getsize(os.path.join(export_dir, f))
                            for f in os.listdir(export_dir)))
  return out


def write_model_card(export_dir: str, s: Dict[str, Any]) -> None:
  c, sp = s["config"], s["split"]
  evals = "\n".join(f"| {e['step']} | {e['train_loss']:.4f} | {e['val_loss']:.4f} | "
                    f"{e['windows']} | {e['train_seconds'] / 60:.1f} |" for e in s["evals"])
  early = (f" (stopped by the {c['minutes']}-minute budget before the planned {c['steps']})"
           if s["stopped_early"] else "")
  card = f"""# tiny_shakespeare: the embedded base model of hydra_jax

A {s['num_params'] / 1e6:.2f}M-parameter Llama-architecture decoder pretrained from scratch on
TinyShakespeare (`data/tinyshakespeare.txt`, public domain), with a {c['vocab_size']}-token
byte-level BPE tokenizer. It is the default base model of the demo, the benchmark and the
tests: small enough to decode on a laptop CPU, trained enough to write Shakespeare-like text.
Weights are {c['export_dtype']} safetensors; `transformers.AutoModelForCausalLM` and
`hydra_jax.checkpoint.hf.load_hf_model` both load this directory.

## Architecture

| field | value |
|---|---|
| parameters | {s['num_params']:,} |
| hidden size / MLP (SwiGLU) | {c['hidden_size']} / {c['intermediate_size']} |
| layers / heads / kv heads | {c['num_layers']} / {c['num_heads']} / {c['num_kv_heads']} |
| vocab | {c['vocab_size']} (byte-level BPE; `<unk>`=0 `<s>`=1 `</s>`=2 `<pad>`=3) |
| tied embeddings | {c['tie_word_embeddings']} |
| RoPE theta / max positions | {c['rope_theta']:g} / {c['max_position_embeddings']} |

Trained on {c['seq_len']}-token windows: RoPE is relative, so any position works, but
attention spans longer than {c['seq_len']} tokens were never seen in training.

## Data and split

The text ({sp['chars_total']:,} characters) is split contiguously: the first
{sp['chars_train']:,} characters are training data, the last {sp['chars_val']:,}
(~{100 * c['val_fraction']:.0f}%, starting at the speech beginning `{sp['val_first_line']}`)
are held out. The tokenizer was trained on the training split only. Tokens: {sp['train_tokens']:,}
train, {sp['val_tokens']:,} validation. There is no BOS/EOS in the training stream (the
corpus is one document), so generations run until max_new_tokens.

The tokenizer carries a small chat template that renders a conversation as a scene (user =
`First Citizen:`, assistant = `MENENIUS:`, each turn ending with a blank line).

## Training

Command (from the repository root; seeded, so it reproduces this model on the same
software versions and thread count):

    {s['command']}

AdamW (b1 0.9, b2 {c['b2']}, weight decay {c['weight_decay']} on matrices), peak lr {c['lr']},
{c['warmup_steps']} warmup steps then cosine to {c['final_lr_multiplier']}x, gradient clipping
{c['clip_norm']}, batch {c['batch_size']} x {c['seq_len']} tokens, random windows drawn from
np.random.default_rng((seed, step)), seed {c['seed']}, f32 on CPU.
Steps: {s['steps_done']}{early}; tokens seen: {s['tokens_seen']:,} ({s['epochs']:.1f} epochs);
training time {s['train_seconds'] / 60:.1f} min on a shared 2-core CPU
({s['seconds_per_step']:.2f} s/step).

| step | train loss | val loss | windows | minutes |
|---|---|---|---|---|
{evals}

Final: train loss **{s['final_train_loss']:.4f}**, validation loss **{s['final_val_loss']:.4f}**
nats/token (f32 weights); {s['exported_val_loss']:.4f} with the exported {c['export_dtype']}
weights, i.e. about {s['final_val_loss'] * sp['val_tokens'] / sp['chars_val']:.2f} nats per character. Unigram baseline (train token
frequencies) on validation: {sp['unigram_val_loss']:.4f}.
Losses are measured with the params of that step on `windows` windows of {c['seq_len'] + 1}
tokens: validation windows tile the held-out text in order (the final row uses all of them);
train windows are a fixed random sample of the training split, as many.

## Sample

Greedy, our decoder (`hydra_jax.generate`), prompt `{s['sample_prompt']!r}`, 120 new tokens:

```
{s['sample_prompt']}{s['greedy_sample']}
```

Temperature 0.8, top-k 50, seed 0:

```
{s['sample_prompt']}{s['sampled_sample']}
```

Directory size: {s['size_bytes'] / 1e6:.1f} MB.
"""
  with open(os.path.join(export_dir, "README.md"), "w") as f:
    f.write(card)


__all__ = ["CHAT_TEMPLATE", "PretrainConfig", "SPECIAL_TOKENS", "encode", "evaluate",
           "init_model", "make_steps", "prepare_data", "pretrain",
           "train_tokenizer", "train_windows", "val_windows", "write_model_card"]
