"""The jitted, sharded head-distillation step (and the eval step).

One jit does everything for a batch: the frozen base forward (no cache, causal, in
train.base_dtype, under stop_gradient; skipped when the batch carries the hidden states from
a feature cache, feature_cache.py) -> final hidden states, the token embeddings from the
base's frozen table, the heads' teacher-forced features, the per-head losses chunked over T
(base logits for the teacher computed chunk by chunk inside the loss, never [B, T, V] at
once), gradients w.r.t. the head params only, and the optax update. The base params are an
argument, not part of the state: the optimizer, checkpoints and gradients see the heads only.

`train_cfg` is the config's `train` section (a ConfigDict, or a dict with some of its
fields: the others come from config_base.base_config(), where each one is described):
loss, head_weights, base_dtype, compute_dtype, logits_chunk.
Dropout (Hydra++) draws from the step's rng folded with the step number, so a resumed run
repeats the same masks.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import DraftHeads, HeadsConfig, init_heads, shared_lm_kernel
from hydra_jax.model.llama import LlamaModel, init_params
from hydra_jax.training import config_base, losses
from hydra_jax.training.optimizer import current_lr
from hydra_jax.parallel.sharding import (BATCH_AXES, LOGICAL_RULES, base_param_shardings, batch_sharding,
                                         logical_to_sharding, opt_state_shardings, replicated)

_DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32,
           "f32": jnp.float32, "float16": jnp.float16, "fp16": jnp.float16}


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: train-step calls so far (micro-batches when accumulating)
  params: Any      # head params only, f32
  opt_state: Any


def parse_dtype(name) -> Any:
  if not isinstance(name, str):
    return jnp.dtype(name)
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def create_train_state(model_cfg: ModelConfig, heads_cfg: HeadsConfig, base_params,
                       opt: optax.GradientTransformation, mesh: Mesh, rules=LOGICAL_RULES,
                       rng: Optional[jax.Array] = None):
  """Fresh heads (LM heads copied from the base) and optimizer state, created sharded.

  Returns (state, state_shardings); the shardings come from the heads' logical axes, the
  optimizer state mirroring the params (scalars replicated).
  """
  heads_cfg.check_compatible(model_cfg)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  state_shardings = train_state_shardings(model_cfg, heads_cfg, opt, mesh, rules)

  def init(base, key):
    params = init_heads(heads_cfg, model_cfg, base, key, param_dtype=jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))

  state = jax.jit(init, out_shardings=state_shardings)(base_params, rng)
  return state, state_shardings


def train_state_shardings(model_cfg: ModelConfig, heads_cfg: HeadsConfig,
                          opt: optax.GradientTransformation, mesh: Mesh, rules=LOGICAL_RULES):
  """TrainState of NamedShardings (no allocation); also what a checkpoint restore needs."""
  base_abstract = jax.eval_shape(lambda: init_params(model_cfg, jax.random.PRNGKey(0)))
  boxed = jax.eval_shape(
      lambda b: init_heads(heads_cfg, model_cfg, b, jax.random.PRNGKey(0), boxed=True),
      base_abstract)
  param_sh = logical_to_sharding(boxed, mesh, rules)
  abstract_opt = jax.eval_shape(opt.init, nn.unbox(boxed))
  return TrainState(step=replicated(mesh), params=param_sh,
                    opt_state=opt_state_shardings(opt, abstract_opt, param_sh, mesh))


def _models(model_cfg, heads_cfg, train: Dict[str, Any]):
  base = LlamaModel(model_cfg, dtype=parse_dtype(train["base_dtype"]))
  heads = DraftHeads(heads_cfg, model_cfg, dtype=parse_dtype(train["compute_dtype"]),
                     param_dtype=jnp.float32)
  return base, heads


def base_hidden(base_model: LlamaModel, base_params, tokens_BxT, positions_BxT):
  """The frozen base's last hidden state [B, T, D] (f32, after the final norm): what the
  heads read, and what feature_cache.py stores so that a step can skip this forward."""
  _, hidden, _ = base_model.apply({"params": base_params}, tokens_BxT, positions_BxT,
                                  return_logits=False)
  return jax.lax.stop_gradient(hidden)


def _forward_sums(base_model, heads_model, heads_params, base_params, batch, *, num_heads: int,
                  chunk: int, teacher: bool, evaluation: bool, dropout_rng=None,
                  deterministic: bool = True, mesh: Optional[Mesh] = None):
  """Frozen base -> teacher-forced head features -> chunked per-head sums.

  A batch with "hidden" (cached base features) skips the base forward; the teacher is still
  the base's LM head over that hidden state, computed chunk by chunk in the loss.
  """
  base_params = jax.lax.stop_gradient(base_params)
  tokens, positions = batch["tokens"], batch["positions"]
  if "hidden" in batch:  # read from a feature cache (feature_cache.py): no base forward
    hidden = jax.lax.stop_gradient(batch["hidden"].astype(jnp.float32))
  else:
    hidden = base_hidden(base_model, base_params, tokens, positions)
  embeds = jnp.take(base_params["embed_tokens"]["embedding"], tokens, axis=0)
  embeds = embeds.astype(heads_model.dtype)
  rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
  feats = heads_model.apply({"params": heads_params}, hidden, embeds, positions,
                            deterministic=deterministic, rngs=rngs,
                            method=DraftHeads.training_features)
  targets, weights = losses.shift_targets(tokens, batch["loss_mask"], num_heads)

  hcfg = heads_model.cfg
  base_lm = shared_lm_kernel(hcfg, base_model.cfg, base_params)  # lm_head "base": frozen

  def head_logits(k, feats_BxCxD):
    return heads_model.apply({"params": heads_params}, k, feats_BxCxD, base_lm,
                             method=DraftHeads.lm_logits)

  def base_logits(hidden_BxSxD, columns=None):
    return base_model.apply({"params": base_params}, hidden_BxSxD, columns,
                            method=LlamaModel.logits)

  draft_ids = hcfg.draft_ids if hcfg.draft_vocab else None
  base_draft_logits = None if draft_ids is None else functools.partial(
      base_logits, columns=jnp.asarray(draft_ids, jnp.int32))

  constrain = None if mesh is None else functools.partial(_pin_batch, mesh)
  return losses.head_sums(head_logits, feats, targets, weights, base_hidden_BxTxD=hidden,
                          base_logits_fn=base_logits, chunk=chunk, teacher=teacher,
                          evaluation=evaluation, constrain=constrain,
                          draft_ids=draft_ids, vocab_size=base_model.cfg.vocab_size,
                          base_draft_logits_fn=base_draft_logits)


def _pin_batch(mesh, x, batch_dim):
  """Batch dim over the data axes, the rest replicated.

  Not only a layout hint: without these constraints on the T-chunked features, jax 0.10's
  Shardy propagation gave WRONG gradients for the heads' first layers on a mesh with all
  three axes > 1 (e.g. (2, 2, 2); fine on (2, 4, 1), (8, 1, 1), ...), while the loss itself
  was right. Minimal pattern: f = x + silu(x @ W) with x batch-sharded over (data, fsdp)
  and W over (fsdp, tensor), then f.reshape(B, n, C, D) chunks feeding a loss; grad W is off
  by O(1). GSPMD (jax_use_shardy_partitioner=False) is correct. test_train_step's
  sharded-vs-unsharded test fails without this.
  """
  spec = [None] * x.ndim
  spec[batch_dim] = BATCH_AXES
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def build_train_step(model_cfg: ModelConfig, heads_cfg: HeadsConfig, train_cfg,
                     opt: optax.GradientTransformation, mesh: Mesh, state_shardings: TrainState,
                     base_shardings=None):
  """-> jitted train_step(state, base_params, batch, rng) -> (state, metrics).

  batch: global arrays from make_global_batch (tokens, positions int32 [B, T]; loss_mask
  f32 [B, T]; optionally hidden [B, T, D], the base's cached features in any float dtype,
  and then the base forward is skipped). The state is donated. Metrics are scalars: loss,
  loss_head_k, acc_head_k (top-1 vs the data on the masked targets), grad_norm (before
  clipping), lr, tokens (B*T), targets (head 0's masked target count).
  """
  train = config_base.section("train", train_cfg)
  loss_kind = train["loss"]
  head_w = losses.head_loss_weights(train["head_weights"], heads_cfg.num_heads)
  if loss_kind not in losses.LOSS_KINDS:
    raise ValueError(f"train.loss must be one of {losses.LOSS_KINDS}, got {loss_kind!r}")
  chunk = int(train["logits_chunk"])
  base_model, heads_model = _models(model_cfg, heads_cfg, train)
  if base_shardings is None:
    base_shardings = base_param_shardings(model_cfg, mesh)
  deterministic = heads_cfg.dropout == 0.0
  num_heads = heads_cfg.num_heads

  def train_step(state: TrainState, base_params, batch, rng):
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      sums = _forward_sums(base_model, heads_model, params, base_params, batch,
                           num_heads=num_heads, chunk=chunk, teacher=loss_kind != "hard",
                           evaluation=False, dropout_rng=dropout_rng,
                           deterministic=deterministic, mesh=mesh)
      total, per_head = losses.combine_losses(sums, loss_kind, head_w)
      return total, (sums, per_head)

    (loss, (sums, per_head)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    weight = jnp.where(sums["weight"] > 0, sums["weight"], 1.0)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "lr": jnp.asarray(current_lr(opt_state), jnp.float32),
               "tokens": jnp.asarray(batch["tokens"].size, jnp.float32),
               "targets": sums["weight"][0]}
    for k in range(num_heads):
      metrics[f"loss_head_{k}"] = per_head[k]
      metrics[f"acc_head_{k}"] = sums["top1"][k] / weight[k]
    return new_state, metrics

  return jax.jit(train_step,
                 in_shardings=(state_shardings, base_shardings, batch_sharding(mesh),
                               replicated(mesh)),
                 out_shardings=(state_shardings, replicated(mesh)),
                 donate_argnums=(0,))


def build_eval_step(model_cfg: ModelConfig, heads_cfg: HeadsConfig, train_cfg, mesh: Mesh,
                    param_shardings, base_shardings=None):
  """-> jitted eval_step(head_params, base_params, batch) -> dict of scalar SUMS.

  Per head k: count_head_k (masked targets), top1_data_head_k / top5_data_head_k (correct
  vs the data), top1_base_head_k / top5_base_head_k (vs the base model's own argmax for the
  same token, what acceptance measures), rank_counts_base_head_k ([EVAL_RANKS]: how often
  the base's token is head k's rank-r candidate), hard_sum_head_k, soft_sum_head_k (CE sums).
  Sum them over batches and divide by the counts. Deterministic (no dropout). The batch may
  carry cached "hidden" features as in build_train_step.
  `param_shardings` may be a TrainState of shardings (its .params is used).
  """
  if isinstance(param_shardings, TrainState):
    param_shardings = param_shardings.params
  train = config_base.section("train", train_cfg)
  chunk = int(train["logits_chunk"])
  base_model, heads_model = _models(model_cfg, heads_cfg, train)
  if base_shardings is None:
    base_shardings = base_param_shardings(model_cfg, mesh)
  num_heads = heads_cfg.num_heads

  def eval_step(params, base_params, batch) -> Dict[str, jax.Array]:
    sums = _forward_sums(base_model, heads_model, params, base_params, batch,
                         num_heads=num_heads, chunk=chunk, teacher=True, evaluation=True,
                         mesh=mesh)
    names = {"weight": "count", "top1": "top1_data", "top5": "top5_data",
             "base_top1": "top1_base", "base_top5": "top5_base", "hard": "hard_sum",
             "soft": "soft_sum", "base_rank_counts": "rank_counts_base",
             "base_weight": "count_base"}
    return {f"{names[key]}_head_{k}": sums[key][k] for key in names for k in range(num_heads)}

  return jax.jit(eval_step, in_shardings=(param_shardings, base_shardings, batch_sharding(mesh)),
                 out_shardings=replicated(mesh))
