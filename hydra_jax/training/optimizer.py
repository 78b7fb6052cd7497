"""The head optimizer: AdamW with warmup then cosine decay, masked weight decay, clipping.

Only the draft heads are trained and their master weights stay in f32, so the optimizer
sees f32 params whatever dtype the base model or the head compute runs in.

`opt_cfg` is an ml_collections ConfigDict or a plain dict with the fields

  lr                   peak learning rate
  b1, b2, eps          Adam moments (0.9, 0.999, 1e-8)
  weight_decay         decoupled decay, applied to matrices only (not biases, norm scales)
  warmup_steps         linear warmup length, in optimizer updates
  final_lr_multiplier  the cosine ends at final_lr_multiplier * lr (Hydra++: 0.33)
  clip_norm            global-norm gradient clipping; <= 0 disables it
  grad_accum_steps     micro-batches per optimizer update (optax.MultiSteps); 1 = none

`total_steps` counts calls of the train step (micro-batches); the schedule runs over
total_steps // grad_accum_steps optimizer updates.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

DEFAULTS = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
                final_lr_multiplier=1.0, clip_norm=1.0, grad_accum_steps=1)

# Leaf names that never get weight decay, whatever their rank.
_NO_DECAY_NAMES = ("bias", "scale")


def cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
  """Reads a field from a ConfigDict, a dict or an object, falling back to `default`."""
  if cfg is None:
    return default
  if isinstance(cfg, dict):
    return cfg.get(name, default)
  try:
    return cfg[name] if name in cfg else default  # ConfigDict
  except TypeError:
    return getattr(cfg, name, default)


def _opt_field(opt_cfg, name):
  return cfg_get(opt_cfg, name, DEFAULTS[name])


def make_lr_schedule(opt_cfg, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """lr(update) = linear warmup to `lr`, then a cosine down to final_lr_multiplier * lr.

  The warmup starts at lr / warmup_steps rather than 0, so the very first update already
  moves the params (a zero first step wastes a batch and hides a broken optimizer).
  """
  peak = float(_opt_field(opt_cfg, "lr"))
  warmup = int(_opt_field(opt_cfg, "warmup_steps"))
  final = peak * float(_opt_field(opt_cfg, "final_lr_multiplier"))
  accum = max(1, int(_opt_field(opt_cfg, "grad_accum_steps")))
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
  clip = float(_opt_field(opt_cfg, "clip_norm"))
  accum = int(_opt_field(opt_cfg, "grad_accum_steps"))
  if accum < 1:
    raise ValueError(f"optimizer.grad_accum_steps must be >= 1, got {accum}")
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=make_lr_schedule(opt_cfg, total_steps),
      b1=float(_opt_field(opt_cfg, "b1")),
      b2=float(_opt_field(opt_cfg, "b2")),
      eps=float(_opt_field(opt_cfg, "eps")),
      weight_decay=float(_opt_field(opt_cfg, "weight_decay")),
      mask=decay_mask)
  parts = ([optax.clip_by_global_norm(clip)] if clip > 0 else []) + [adamw]
  opt = optax.chain(*parts)
  if accum > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=accum)
  return opt


def current_lr(opt_state) -> jax.Array:
  """The learning rate of the last optimizer update (the schedule at 0 before the first)."""
  found = [x.hyperparams["learning_rate"] for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
           if hasattr(x, "hyperparams") and "learning_rate" in x.hyperparams]
  if len(found) != 1:
    raise ValueError("optimizer state has no (single) injected learning_rate; build the "
                     "optimizer with make_optimizer")
  return found[0]
