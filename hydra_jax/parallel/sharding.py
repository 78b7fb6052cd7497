"""Meshes, logical-axis rules and shardings for training.

Sharding is declared once: every parameter carries logical axis names (the Llama model and
the draft heads declare them with `nn.with_logical_partitioning`), and LOGICAL_RULES maps
those names to the mesh axes ("data", "fsdp", "tensor"). Base params, head params and the
optimizer state all get their NamedShardings from that one table; the batch is split over
("data", "fsdp").

A dimension whose size is not divisible by the mesh axes its rule names (e.g. 8 kv heads on
a 16-way "tensor" axis) is REPLICATED along those axes instead, with a warning that names
the parameter: the run still works, it just stores more on each device. A mesh axis named
twice in one array's spec is a rules bug and raises.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or tuple of them, or None = replicated). First match wins.
LOGICAL_RULES: Tuple[Tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    # The fused projections' part axes (q/k/v, gate/up, W/W_res): never split, so each
    # device holds whole groups of the axis beside them.
    ("qkv", None),
    ("gate_up", None),
    ("fused", None),
    # The (k+2)*D input of a Hydra head's first block ([head_in, mlp] kernels): split like
    # "embed", the other side being on "tensor".
    ("head_in", "fsdp"),
    ("length", None),
)


def make_mesh(mesh_shape: Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry may be -1 = "all the remaining devices"."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(s) for s in mesh_shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh_shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh_shape {shape}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if len(devices) % known:
    raise ValueError(
        f"mesh_shape {shape} needs a multiple of {known} devices but there are "
        f"{len(devices)}; change mesh_shape (e.g. use -1 for one axis)")
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"mesh_shape {shape} uses {math.prod(shape)} devices but there are {len(devices)}; "
        f"make the product equal the device count or put -1 on one axis")
  # Auto axes: jit propagates shardings from in/out_shardings (the classic GSPMD mode).
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def _as_tuple(mesh_axes) -> Tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_mesh_spec(logical_axes: Optional[Sequence[Optional[str]]],
                         rules: Sequence[Tuple[str, Any]] = LOGICAL_RULES,
                         shape: Optional[Sequence[int]] = None,
                         mesh: Optional[Mesh] = None, name: str = "array") -> P:
  """PartitionSpec for one array from its logical axis names.

  Unknown logical names are replicated. Raises when one mesh axis would shard two dims.
  With `shape` and `mesh`, a dim that the mesh axes do not divide is replicated (warning).
  """
  if logical_axes is None:
    return P()
  table = {}
  for logical, mesh_axes in rules:
    table.setdefault(logical, mesh_axes)
  out, used = [], {}
  for dim, logical in enumerate(logical_axes):
    axes = _as_tuple(table.get(logical)) if logical is not None else ()
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)  # size-1 axes shard nothing
    if axes and shape is not None and mesh is not None:
      ways = math.prod(mesh.shape[a] for a in axes)
      if shape[dim] % ways:
        warnings.warn(
            f"{name}: dim {dim} ({logical}, size {shape[dim]}) is not divisible by mesh axes "
            f"{axes} ({ways} ways); replicating it along them", stacklevel=2)
        axes = ()
    for a in axes:
      if a in used:
        raise ValueError(
            f"{name}: mesh axis {a!r} would shard both {used[a]!r} and {logical!r} (logical "
            f"axes {tuple(logical_axes)}); fix the logical rules so each mesh axis appears "
            f"once per array")
      used[a] = logical
    out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def logical_to_sharding(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree of nn.LogicallyPartitioned (boxed) leaves or their abstract
  eval_shape values. Unboxed leaves are replicated. Returns an unboxed-structure tree."""
  def one(path, leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      shape = getattr(leaf.value, "shape", None)
      shape = np.shape(leaf.value) if shape is None else shape
      spec = logical_to_mesh_spec(leaf.names, rules, shape, mesh, _path_name(path))
    else:
      spec = P()
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(
      one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def base_param_shardings(model_cfg, mesh: Mesh, rules=LOGICAL_RULES, param_dtype=jnp.float32):
  """Shardings for the base model's params, from their declared logical axes (no allocation)."""
  from hydra_jax.model.llama import init_params
  boxed = jax.eval_shape(
      lambda: init_params(model_cfg, jax.random.PRNGKey(0), param_dtype, boxed=True))
  return logical_to_sharding(boxed, mesh, rules)


def shard_base_params(base_params, mesh: Mesh, rules=LOGICAL_RULES, model_cfg=None):
  """Places (already loaded, unboxed) base params on the mesh by the rules; returns them.

  Their shardings are `base_param_shardings(model_cfg, mesh, rules)` (also readable as
  `jax.tree.map(lambda x: x.sharding, params)`). Without `model_cfg` the sizes are read off
  the params. Multi-process, every process must hold the same full host copy (each loads the
  same checkpoint); each device then takes its slice.
  """
  if model_cfg is None:
    model_cfg = _infer_model_cfg(base_params)
  shardings = base_param_shardings(model_cfg, mesh, rules)
  _check_same_structure(base_params, shardings, "base params")
  if jax.process_count() > 1:
    def place(x, s):
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
    return jax.tree.map(place, base_params, shardings)
  return jax.device_put(base_params, shardings)


def _infer_model_cfg(base_params):
  """A ModelConfig with the params' sizes: enough to know every leaf's logical axes."""
  from hydra_jax.model.config import ModelConfig
  vocab, d = base_params["embed_tokens"]["embedding"].shape
  num_layers = sum(1 for k in base_params if k.startswith("layers_"))
  attn = base_params["layers_0"]["self_attn"]
  _, kv_heads, group_plus_kv, head_dim = attn["qkv_proj"]["kernel"].shape  # [D, K, G + 2, H]
  return ModelConfig(
      vocab_size=vocab, hidden_size=d, num_layers=num_layers,
      num_heads=kv_heads * (group_plus_kv - 2), num_kv_heads=kv_heads, head_dim=head_dim,
      intermediate_size=base_params["layers_0"]["mlp"]["gate_up_proj"]["kernel"].shape[2],
      tie_word_embeddings="lm_head" not in base_params,
      attention_bias="bias" in attn["qkv_proj"])


def _check_same_structure(tree, shardings, what: str):
  got_paths = {_path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}
  want_paths = {_path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(shardings)}
  if got_paths != want_paths:
    raise ValueError(
        f"{what} do not match the model config: missing {sorted(want_paths - got_paths)[:5]}, "
        f"unexpected {sorted(got_paths - want_paths)[:5]}")


def opt_state_shardings(opt: optax.GradientTransformation, abstract_opt_state, param_shardings,
                        mesh: Mesh):
  """Optimizer-state shardings: every params-shaped subtree (Adam moments, accumulated
  grads) mirrors the param shardings; counters and hyperparameters are replicated."""
  return optax.tree_map_params(
      opt, lambda _, s: s, abstract_opt_state, param_shardings,
      transform_non_params=lambda _: replicated(mesh),
      is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim over ("data", "fsdp"), any further dims replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Global jax.Arrays from each process's local rows, split over ("data", "fsdp").

  Process p holds rows [p * B_local, (p + 1) * B_local) of the global batch (the data
  pipeline's slice); single-process this is just a sharded device_put.
  """
  ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    global_rows = value.shape[0] * jax.process_count()
    if global_rows % ways:
      raise ValueError(
          f"global batch size {global_rows} is not divisible by the data x fsdp mesh axes "
          f"({ways}); pick global_batch_size as a multiple of {ways}")
    sharding = batch_sharding(mesh)
    out[key] = jax.make_array_from_process_local_data(
        sharding, value, (global_rows,) + value.shape[1:])
  return out
