"""The head optimizer: AdamW with warmup then cosine decay, masked weight decay, clipping.

Only the draft heads are trained and their master weights stay in f32, so the optimizer
sees f32 params whatever dtype the base model or the head compute runs in.

`opt_cfg` is the config's `optimizer` section (a ConfigDict, or a dict with some of its
fields: the others come from config_base.base_config(), where each one is described):
lr, b1, b2, eps, weight_decay (matrices only, not biases or norm scales), warmup_steps,
final_lr_multiplier, clip_norm (<= 0 disables it), grad_accum_steps (optax.MultiSteps).

`total_steps` counts calls of the train step (micro-batches); the schedule runs over
total_steps // grad_accum_steps optimizer updates.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from hydra_jax.training import config_base

# Leaf names that never get weight decay, whatever their rank.
_NO_DECAY_NAMES = ("bias", "scale")


def make_lr_schedule(opt_cfg, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """lr(update) = linear warmup to `lr`, then a cosine down to final_lr_multiplier * lr.

  The warmup starts at lr / warmup_steps rather than 0, so the very first update already
  moves the params (a zero first step wastes a batch and hides a broken optimizer).
  """
  opt = config_base.section("optimizer", opt_cfg)
  peak = float(opt["lr"])
  warmup = int(opt["warmup_steps"])
  final = peak * float(opt["final_lr_multiplier"])
  accum = max(1, int(opt["grad_accum_steps"]))
  updates = max(1, int(total_steps) // accum)
  if warmup < 0 or peak < 0:
    raise ValueError(f"optimizer: lr ({peak}) and warmup_steps ({warmup}) must be >= 0")
  decay = max(1, updates - warmup)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = peak * jnp.minimum(1.0, (count + 1.0) / max(warmup, 1))
    frac = jnp.clip((count - warmup) / decay, 0.0, 1.0)
    cosine = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(count < warmup, warm, cosine)

  return schedule


def decay_mask(params) -> Any:
  """True for the leaves that get weight decay: matrices, not biases / norm scales / 1-D."""
  def keep(path, p):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return bool(jnp.ndim(p) > 1 and name not in _NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  """clip -> AdamW(schedule, masked decay), wrapped in MultiSteps when accumulating.

  The learning rate is an injected hyperparameter, so `current_lr(opt_state)` can report it.
  """
  opt = config_base.section("optimizer", opt_cfg)
  clip = float(opt["clip_norm"])
  accum = int(opt["grad_accum_steps"])
  if accum < 1:
    raise ValueError(f"optimizer.grad_accum_steps must be >= 1, got {accum}")
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=make_lr_schedule(opt, total_steps),
      b1=float(opt["b1"]),
      b2=float(opt["b2"]),
      eps=float(opt["eps"]),
      weight_decay=float(opt["weight_decay"]),
      mask=decay_mask)
  parts = ([optax.clip_by_global_norm(clip)] if clip > 0 else []) + [adamw]
  chained = optax.chain(*parts)
  if accum > 1:
    chained = optax.MultiSteps(chained, every_k_schedule=accum)
  return chained


def current_lr(opt_state) -> jax.Array:
  """The learning rate of the last optimizer update (the schedule at 0 before the first)."""
  found = [x.hyperparams["learning_rate"] for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
           if hasattr(x, "hyperparams") and "learning_rate" in x.hyperparams]
  if len(found) != 1:
    raise ValueError("optimizer state has no (single) injected learning_rate; build the "
                     "optimizer with make_optimizer")
  return found[0]
