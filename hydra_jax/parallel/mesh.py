"""Device meshes and shardings for decoding: tensor parallel over "tensor", batch over "data".

A decode mesh is the training mesh with fsdp = 1: `--mesh data=D,tensor=T` builds
`sharding.make_mesh((D, 1, T))` over every device of every process, and every sharding here
comes from the one rules table, `training.sharding.LOGICAL_RULES`:

  base params and heads   their declared logical axes: heads / kv_heads / mlp / vocab over
                          "tensor" ("embed" goes to fsdp, which has size 1: replicated)
  KV caches [B * K, S, H] rows over ("data", "tensor"): the rule of ("batch", "kv_heads") on
                          the [B, K] view, merged into the one row dim (rows are batch-major)
  tokens, lengths, ...    "batch" -> data; scalars, the seed key and the stop rules replicated

A dimension that its mesh axes do not divide (2 kv heads on tensor=4) is replicated along
them; the rules table warns per array, and `decode_shardings` folds those into ONE warning.
fsdp is refused for decoding: a weight split over fsdp is all-gathered by every decode step.

Batches are padded to a multiple of the data axis with rows that start done
(`padded_batch_size`, api.prepare_batch's inactive rows).

Legend: B batch, K kv heads, X = B * K cache rows, S cache slots, H head dim.
"""

from __future__ import annotations

import collections
import math
import re
import warnings
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hydra_jax.model.config import ModelConfig
from hydra_jax.model.kv_cache import KVCache
from hydra_jax.parallel import sharding

DECODE_AXES = ("data", "tensor")


class MeshError(ValueError):
  """A mesh decoding cannot use; api turns it into a DecodeInputError."""


# --- building the mesh -------------------------------------------------------------------------


def parse_mesh_spec(text: str) -> Dict[str, int]:
  """"data=2,tensor=4" -> {"data": 2, "tensor": 4}; an axis left out has size 1."""
  sizes: Dict[str, int] = {}
  for part in (p.strip() for p in str(text).split(",")):
    m = re.fullmatch(r"([A-Za-z_]\w*)\s*=\s*(\d+)", part)
    if not m:
      raise MeshError(f"mesh {text!r}: {part!r} is not AXIS=SIZE; write e.g. data=2,tensor=4")
    name, size = m.group(1), int(m.group(2))
    if name not in DECODE_AXES:
      hint = (" (fsdp would all-gather every weight on every decode step: put those devices "
              "on tensor)" if name == "fsdp" else "")
      raise MeshError(f"mesh {text!r}: unknown axis {name!r}; decoding meshes have the axes "
                      f"{' and '.join(DECODE_AXES)}{hint}")
    if name in sizes:
      raise MeshError(f"mesh {text!r}: axis {name!r} is given twice")
    if size < 1:
      raise MeshError(f"mesh {text!r}: axis {name!r} has size {size}; sizes must be >= 1")
    sizes[name] = size
  return {a: sizes.get(a, 1) for a in DECODE_AXES}


def make_decode_mesh(mesh, devices: Optional[Sequence] = None) -> Optional[Mesh]:
  """A Mesh from "data=D,tensor=T", a {"data": D, "tensor": T} dict or a jax Mesh (checked).

  Uses every device of every process (jax.devices()) unless `devices` is given; the product
  of the sizes must equal their count. None stays None (unsharded decoding).
  """
  if mesh is None:
    return None
  if isinstance(mesh, Mesh):
    return check_decode_mesh(mesh)
  if isinstance(mesh, dict):
    mesh = ",".join(f"{k}={v}" for k, v in mesh.items())
  if not isinstance(mesh, str):
    raise MeshError(f"mesh must be 'data=D,tensor=T', a dict of those sizes or a jax Mesh, got "
                    f"{type(mesh).__name__}")
  sizes = parse_mesh_spec(mesh)
  devices = list(jax.devices() if devices is None else devices)
  want = math.prod(sizes.values())
  shown = ",".join(f"{a}={sizes[a]}" for a in DECODE_AXES)
  if len(devices) == 1:
    raise MeshError(f"mesh {shown}: there is only one device, so there is nothing to shard; "
                    f"drop --mesh / mesh= (or run with more devices)")
  if want != len(devices):
    raise MeshError(f"mesh {shown} uses {want} devices but there are {len(devices)}: make "
                    f"data x tensor equal {len(devices)} (e.g. data=1,tensor={len(devices)})")
  return sharding.make_mesh((sizes["data"], 1, sizes["tensor"]), devices=devices)


def check_decode_mesh(mesh: Mesh) -> Mesh:
  """A caller's Mesh: axes among data / fsdp / tensor, fsdp of size 1, more than one device."""
  unknown = [a for a in mesh.axis_names if a not in sharding.MESH_AXES]
  if unknown:
    raise MeshError(f"mesh axes {tuple(mesh.axis_names)}: {unknown[0]!r} is unknown; decoding "
                    f"uses 'data' and 'tensor' (make one with make_decode_mesh('data=D,tensor=T'))")
  if mesh.shape.get("fsdp", 1) > 1:
    raise MeshError(f"mesh has fsdp={mesh.shape['fsdp']}: a weight split over fsdp is "
                    f"all-gathered by every decode step; put those devices on tensor")
  if mesh.devices.size == 1:
    raise MeshError("the mesh has one device, so there is nothing to shard; decode without it")
  return mesh


def data_size(mesh: Optional[Mesh]) -> int:
  return 1 if mesh is None else int(mesh.shape.get("data", 1))


def padded_batch_size(batch_size: int, mesh: Optional[Mesh]) -> int:
  """The batch rounded up to a multiple of the data axis (padding rows start done)."""
  d = data_size(mesh)
  return -(-int(batch_size) // d) * d


def describe(mesh: Mesh) -> str:
  return ",".join(f"{a}={mesh.shape.get(a, 1)}" for a in DECODE_AXES)


# --- shardings ---------------------------------------------------------------------------------


_WARNED = set()  # (what, summary) already given: loading and decoding one model warn once


class _OneWarning:
  """Collects the rules table's per-array "not divisible" warnings; emits one summary (once
  per `key`, e.g. the model config and mesh)."""

  def __init__(self, key=None):
    self.key = key

  def __enter__(self):
    self._catcher = warnings.catch_warnings(record=True)
    self.caught = self._catcher.__enter__()
    warnings.simplefilter("always")
    return self

  def __exit__(self, *exc):
    self._catcher.__exit__(*exc)
    notes = [str(w.message) for w in self.caught if "not divisible" in str(w.message)]
    for w in self.caught:
      if "not divisible" not in str(w.message):
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if notes and exc[0] is None:
      dims = collections.Counter(re.sub(r"^.*?: dim \d+ \((\w+), size (\d+)\) is not divisible by "
                                        r"mesh axes (\(.*?\)).*$", r"\1 (size \2) on \3", n)
                                 for n in notes)
      listed = "; ".join(f"{d}: {c} array(s)" for d, c in sorted(dims.items()))
      if (self.key, listed) in _WARNED:
        return
      _WARNED.add((self.key, listed))
      warnings.warn(f"decode mesh: some dimensions do not divide their mesh axes and are "
                    f"replicated along them (more memory per device, same results): {listed}",
                    stacklevel=3)


def _spec(names, shape, mesh, what) -> P:
  return sharding.logical_to_mesh_spec(names, shape=shape, mesh=mesh, name=what)


def batch_sharding(mesh: Mesh, ndim: int = 1, batch: Optional[int] = None) -> NamedSharding:
  """Leading dim by the "batch" rule (data), the rest replicated."""
  shape = None if batch is None else (batch,) + (1,) * (ndim - 1)
  names = ("batch",) + (None,) * (ndim - 1)
  return NamedSharding(mesh, _spec(names, shape, mesh if shape else None, "batch"))


def cache_rows_spec(mesh: Mesh, batch: int, num_kv_heads: int, warn: bool = True) -> P:
  """[B * K, S, H]: the ("batch", "kv_heads") rule on the [B, K] view, as one row dim.

  The merge keeps the row order (batch-major), so each device holds a contiguous block of
  rows. That block is "batch rows over data, kv heads over tensor" exactly when a data shard
  holds one batch row (B == data) or tensor is 1; with more rows per data shard the tensor
  axis splits the block (b, k) jointly, i.e. mostly by batch row, and attention reads heads
  that the kv-head-sharded q/k/v projections computed elsewhere (activation all-to-alls).
  """
  with warnings.catch_warnings():
    if not warn:  # decode_shardings already said it once
      warnings.simplefilter("ignore")
    view = _spec(("batch", "kv_heads"), (batch, num_kv_heads), mesh, "KV cache")
  axes = tuple(a for entry in view for a in ((entry,) if isinstance(entry, str) else entry or ()))
  return P(axes if len(axes) > 1 else (axes[0] if axes else None))


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
  rows = NamedSharding(mesh, cache_rows_spec(mesh, cache.batch_size, cache.num_kv_heads,
                                             warn=False))
  return KVCache(k=tuple(rows for _ in cache.k), v=tuple(rows for _ in cache.v),
                 lengths=batch_sharding(mesh, 1, cache.batch_size))


def state_shardings(state_shape, mesh: Mesh):
  """Shardings for a decode state (DecodeState from jax.eval_shape of a prefill).

  KV caches by `cache_rows_spec`; every other array whose leading dim is the batch over data;
  scalars and the seed key replicated.
  """
  batch = int(state_shape.done.shape[0])
  rep = sharding.replicated(mesh)

  def one(leaf):
    if isinstance(leaf, KVCache):
      return cache_shardings(leaf, mesh)
    shape = tuple(getattr(leaf, "shape", ()))
    if shape and shape[0] == batch and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return batch_sharding(mesh, len(shape), batch)
    return rep
  return jax.tree_util.tree_map(one, state_shape, is_leaf=lambda x: isinstance(x, KVCache))


def base_shardings(cfg: ModelConfig, mesh: Mesh, dtype=jnp.float32):
  """The base params' NamedShardings from their declared logical axes (nothing allocated)."""
  return sharding.base_param_shardings(cfg, mesh, param_dtype=dtype)


def heads_shardings(heads_cfg, base_cfg: ModelConfig, mesh: Mesh, dtype=jnp.float32):
  """The draft heads' NamedShardings from their declared logical axes (nothing allocated)."""
  from hydra_jax.model.heads import init_heads
  from hydra_jax.model.llama import init_params
  base = jax.eval_shape(lambda: init_params(base_cfg, jax.random.PRNGKey(0), dtype))
  boxed = jax.eval_shape(lambda b: init_heads(heads_cfg, base_cfg, b, jax.random.PRNGKey(0),
                                              dtype, boxed=True), base)
  return sharding.logical_to_sharding(boxed, mesh)


def decode_shardings(cfg: ModelConfig, mesh: Mesh, dtype=jnp.float32, heads_cfg=None):
  """(base param shardings, heads param shardings or None), with at most one warning."""
  with _OneWarning(key=(cfg, describe(mesh))):
    base = base_shardings(cfg, mesh, dtype)
    heads = None if heads_cfg is None else heads_shardings(heads_cfg, cfg, mesh, dtype)
    # The cache's kv-head split, for the same warning (its batch always divides: padded).
    cache_rows_spec(mesh, data_size(mesh), cfg.num_kv_heads)
  return base, heads


# --- placing and fetching ----------------------------------------------------------------------


def place(tree, shardings):
  """Arrays (host numpy, one-device or differently sharded jax arrays) onto `shardings`.

  Arrays already laid out so are kept as they are. With several processes each process must
  hold the whole value on its host (what it passes in); each device then takes its slice.
  Loading a big model this way holds it on the host: load it sharded instead
  (`load_model(path, mesh=...)`).
  """
  def one(x, s):
    if isinstance(x, jax.Array) and x.sharding == s:
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, s)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
  return jax.tree_util.tree_map(one, tree, shardings)


def fetch(arrays):
  """numpy copies of (possibly multi-process) global arrays, in every process."""
  out = []
  for x in arrays:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      x = multihost_utils.process_allgather(x, tiled=True)
    out.append(np.asarray(x))
  return out


def per_device_bytes(shapes, shardings) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs under `shardings` (the largest
  shard; shards are equal except along dims that are replicated)."""
  total = 0
  for x, s in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda v: isinstance(v, jax.sharding.Sharding))):
    shard = s.shard_shape(tuple(x.shape))
    total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
  return total


__all__ = ["DECODE_AXES", "MeshError", "base_shardings", "batch_sharding", "cache_rows_spec",
           "cache_shardings", "check_decode_mesh", "data_size", "decode_shardings", "describe",
           "fetch", "heads_shardings", "make_decode_mesh", "padded_batch_size", "parse_mesh_spec",
           "per_device_bytes", "place", "state_shardings"]
