"""Loading straight into shards: each process reads only the slices its devices hold.

    m = load_model_sharded("path/to/hf_dir", mesh)        # or a .gguf file
    m.params["lm_head"]["kernel"].sharding                # NamedSharding(mesh, P(None, "tensor"))

Every param is built with `jax.make_array_from_callback(shape, sharding, read)`: `read` gets
one device's index into OUR layout and returns that block, reading from the checkpoint only
the rows / columns of the Hugging Face tensors it comes from (safetensors'
`safe_open(...).get_slice`, or rows of a GGUF tensor's memory map, dequantised). The fused
params (qkv_proj from q/k/v, gate_up_proj from gate/up) are assembled per block from their HF
parts. So a process never holds more of the model on its host than its own shards and one
block in flight, whatever the model's size.

The layout transforms, fused slots and strict checks are hf.py's (`hf._RULES` via
`hf._match`, `hf.check_hf_tensor`): a block is transformed by the same `to_ours` as a whole
tensor, with a config whose sizes are the block's ("local" sizes). What is here is only where
a block of ours lies in each HF tensor (`_hf_box`).

Legend: D model width, K kv heads, G query heads per kv head, J = G + 2 fused projections,
H head dim, N query heads, F mlp width, V vocab.
"""

from __future__ import annotations

import os
import re
import types
from typing import Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.checkpoint import hf
from hydra_jax.checkpoint.hf import CheckpointError, HFModel

Box = Tuple[slice, ...]


# --- where a block of ours lies in each HF tensor ----------------------------------------------


def _part(hf_key: str) -> str:
  """q / k / v / gate / up / "" (not a fused part) from an HF tensor name."""
  m = re.search(r"\.(q|k|v|gate|up)_proj\.", hf_key)
  return m.group(1) if m else ""


def _hf_box(target: str, hf_key: str, cfg, lo: List[int], hi: List[int]
            ) -> Tuple[Box, Dict[str, int]]:
  """(the HF tensor's box holding our block [lo, hi), the block's local config sizes).

  Dims of ours that no box can cut (qkv's J, head_dim, gate_up's 2: never sharded) must come
  in whole; `_read_block` widens them before calling.
  """
  kind = "/".join(target.split("/")[-2:])
  part = _part(hf_key)
  g, h = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
  s = lambda a, b, unit=1: slice(a * unit, b * unit)
  if kind == "embed_tokens/embedding":  # ours [V, D] = HF [V, D]
    return (s(lo[0], hi[0]), s(lo[1], hi[1])), {}
  if kind == "lm_head/kernel":  # ours [D, V] = HF [V, D].T
    return (s(lo[1], hi[1]), s(lo[0], hi[0])), {}
  if kind.endswith("/scale"):  # norms [D]
    return (s(lo[0], hi[0]),), {}
  if kind == "qkv_proj/kernel":  # ours [D, K, J, H]; HF q [K*G*H, D], k / v [K*H, D]
    unit = g * h if part == "q" else h
    kc = hi[1] - lo[1]
    return (s(lo[1], hi[1], unit), s(lo[0], hi[0])), dict(
        hidden_size=hi[0] - lo[0], num_kv_heads=kc, num_heads=kc * g)
  if kind == "qkv_proj/bias":  # ours [K, J, H]; HF q [K*G*H], k / v [K*H]
    unit = g * h if part == "q" else h
    kc = hi[0] - lo[0]
    return (s(lo[0], hi[0], unit),), dict(num_kv_heads=kc, num_heads=kc * g)
  if kind == "o_proj/kernel":  # ours [N, H, D] = HF [D, N*H].T
    nc = hi[0] - lo[0]
    return (s(lo[2], hi[2]), s(lo[0], hi[0], h)), dict(
        hidden_size=hi[2] - lo[2], num_heads=nc, num_kv_heads=max(1, nc // g))
  if kind == "gate_up_proj/kernel":  # ours [D, 2, F]; HF gate / up [F, D]
    return (s(lo[2], hi[2]), s(lo[0], hi[0])), dict(hidden_size=hi[0] - lo[0],
                                                    intermediate_size=hi[2] - lo[2])
  if kind == "down_proj/kernel":  # ours [F, D] = HF [D, F].T
    return (s(lo[1], hi[1]), s(lo[0], hi[0])), {}
  raise CheckpointError(f"no sharded reader for parameter {target} (from {hf_key}): add it to "
                        f"sharded_load._hf_box")


# Our dims that are never cut by a box (read whole, then sliced): qkv's J and H, the
# bias's J and H, o_proj's H, gate_up's gate/up axis.
_WHOLE_DIMS = {"qkv_proj/kernel": (2, 3), "qkv_proj/bias": (1, 2), "o_proj/kernel": (1,),
               "gate_up_proj/kernel": (1,)}


def _local_cfg(cfg, sizes: Dict[str, int]):
  """The attributes `to_ours` / `slot` / fused shapes read, at the block's sizes."""
  names = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
           "vocab_size")
  base = {n: getattr(cfg, n) for n in names}
  return types.SimpleNamespace(**dict(base, **sizes))


# --- tensor sources ------------------------------------------------------------------------------


class SafetensorsSource:
  """HF tensors of a model directory, read by box through safetensors' lazy slices."""

  def __init__(self, path: str):
    from safetensors import safe_open
    self.path = path
    self._handles: Dict[str, object] = {}
    self.file_of: Dict[str, str] = {}
    self.entries: List[Tuple[str, str, Tuple[int, ...]]] = []  # (file, key, shape)
    for fname in hf._weight_files(path):
      try:
        handle = safe_open(fname, framework="numpy")
      except Exception as e:  # corrupt header, truncated file, ...
        raise CheckpointError(f"cannot read {fname}: {e} (the file is corrupt or not "
                              f"safetensors)") from None
      self._handles[fname] = handle
      for key in handle.keys():
        self.entries.append((fname, key, tuple(handle.get_slice(key).get_shape())))
        self.file_of.setdefault(key, fname)
    self.where = ", ".join(sorted(os.path.basename(f) for f in self._handles))
    self.bytes_read = 0

  def read(self, key: str, box: Box) -> np.ndarray:
    block = self._handles[self.file_of[key]].get_slice(key)[box]
    self.bytes_read += block.nbytes
    return np.asarray(block, np.float32)


class GGUFSource:
  """HF-named tensors of a GGUF file: rows of each tensor's memory map, dequantised.

  GGUF quantises along a row (HF's last axis), so a box reads its rows whole and cuts the
  columns after dequantising; llama q/k rows are un-permuted per head (boxes over them hold
  whole heads).
  """

  def __init__(self, path: str, reader, cfg):
    from hydra_jax.checkpoint import gguf
    self._gguf, self.path, self.where, self.cfg = gguf, path, path, cfg
    self.tensors = {}
    self.entries = []
    for t in reader.tensors:
      if gguf._is_rope_freqs(t.name, cfg):
        continue
      key = gguf.hf_name(t.name)
      self.tensors[key] = t
      self.entries.append((path, key, tuple(int(d) for d in reversed(t.shape))))
    self.bytes_read = 0

  def read(self, key: str, box: Box) -> np.ndarray:
    from gguf import dequantize
    t = self.tensors[key]
    shape = tuple(int(d) for d in reversed(t.shape))
    if len(shape) == 1:  # norms and biases: small, read whole
      raw = t.data
    else:
      r0, r1 = box[0].indices(shape[0])[:2]
      a, b = r0, r1
      permuted = (self.cfg.model_type == "llama" and
                  re.search(r"\.attn_[qk]\.weight$", t.name) is not None)
      if permuted:  # whole heads, so that the per-head un-permute sees complete heads
        h = self.cfg.head_dim
        a, b = r0 // h * h, -(-r1 // h) * h
      raw = t.data[a:b]  # rows of the memory map: quantised blocks run along a row
    self.bytes_read += raw.nbytes
    try:
      w = np.asarray(dequantize(raw, t.tensor_type), np.float32)
    except NotImplementedError:
      raise CheckpointError(f"tensor {t.name} in {self.path} is stored as "
                            f"{t.tensor_type.name}, which the installed gguf package cannot "
                            f"dequantize (re-quantize the model to Q8_0, Q4_K or F16)") from None
    if len(shape) == 1:
      return w.reshape(shape)[box]
    w = w.reshape((b - a,) + shape[1:])
    if permuted:
      w = self._gguf._unpermute_rope_rows(w, (b - a) // self.cfg.head_dim)
    return w[r0 - a:r1 - a][(slice(None),) + tuple(box[1:])]


# --- assembling blocks ---------------------------------------------------------------------------


def _parts_by_target(cfg) -> Dict[str, List[Tuple[str, Callable, Callable]]]:
  """Our param path -> [(HF key, slot, to_ours)] from hf.py's table."""
  out: Dict[str, List[Tuple[str, Callable, Callable]]] = {}
  for key in hf.expected_hf_keys(cfg):
    target, slot, to_ours, _, _ = hf._match(key)
    out.setdefault(target, []).append((key, slot, to_ours))
  return out


def _read_block(source, target: str, parts, cfg, shape: Tuple[int, ...], index) -> np.ndarray:
  """Our param `target`'s block at `index` (a device's tuple of slices), f32."""
  kind = "/".join(target.split("/")[-2:])
  bounds = [sl.indices(n)[:2] for sl, n in zip(index, shape)]
  whole = _WHOLE_DIMS.get(kind, ())
  lo = [0 if d in whole else a for d, (a, _) in enumerate(bounds)]
  hi = [n if d in whole else b for d, ((_, b), n) in enumerate(zip(bounds, shape))]
  block = None
  for key, slot, to_ours in parts:
    box, sizes = _hf_box(target, key, cfg, lo, hi)
    local = _local_cfg(cfg, sizes)
    arr = to_ours(source.read(key, box), local)
    if slot(local) is None:
      block = arr
    else:
      if block is None:
        block = np.zeros(hf.fused_param_shape(target, local), np.float32)
      block[slot(local)] = arr
  cut = tuple(slice(a - l, b - l) for (a, b), l in zip(bounds, lo))
  return block[cut]


def load_params_sharded(source, cfg, shardings, param_dtype=jnp.float32) -> dict:
  """Our params as global arrays on `shardings` (a params-shaped tree of NamedShardings),
  each device's block read from `source` alone. The checkpoint's tensor index is checked
  first, as strictly as the unsharded loader checks it."""
  seen: Dict[str, str] = {}
  for fname, key, shape in source.entries:
    hf.check_hf_tensor(fname, key, shape, cfg, seen)
  hf.check_complete(seen, cfg, source.where)
  parts = _parts_by_target(cfg)
  np_dtype = jnp.dtype(param_dtype)

  def build(path, sharding):
    target = "/".join(str(getattr(k, "key", k)) for k in path)
    if target not in parts:
      raise CheckpointError(f"the model has a parameter {target} that no tensor of "
                            f"{source.where} maps to")
    shape = _param_shape(target, cfg)
    blocks: Dict[Tuple, np.ndarray] = {}  # replicas of one block are read once

    def read(index):
      key = tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))
      if key not in blocks:
        blocks[key] = _read_block(source, target, parts[target], cfg, shape, index
                                  ).astype(np_dtype)
      return blocks[key]
    return jax.make_array_from_callback(shape, sharding, read)

  return jax.tree_util.tree_map_with_path(build, shardings)


_ABSTRACT: Dict = {}


def _param_shape(target: str, cfg) -> Tuple[int, ...]:
  """A param's full shape, from the model's own declaration (eval_shape: nothing allocated)."""
  if cfg not in _ABSTRACT:
    from hydra_jax.model.llama import init_params
    _ABSTRACT[cfg] = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  node = _ABSTRACT[cfg]
  for p in target.split("/"):
    node = node[p]
  return tuple(node.shape)


def load_model_sharded(path: str, mesh, param_dtype=jnp.float32, dtype=jnp.float32,
                       tokenizer: bool = True, shardings=None) -> HFModel:
  """An HFModel whose params are sharded for decoding on `mesh` (`decoding.mesh`), read
  slice by slice from a Hugging Face directory or a .gguf file."""
  from hydra_jax.parallel import mesh as decode_mesh
  path = os.path.expanduser(os.fspath(path))
  if path.endswith(".gguf"):
    from hydra_jax.checkpoint import gguf
    reader = gguf.open_gguf(path)
    cfg = gguf.read_gguf_config(reader, path)
    gguf.check_gguf_tensors(reader, path, cfg)
    source = GGUFSource(path, reader, cfg)
    tok = gguf.read_gguf_tokenizer(reader, path) if tokenizer else None
  else:
    cfg = hf.read_hf_config(path)
    source = SafetensorsSource(path)
    tok = hf.load_tokenizer(path) if tokenizer else None
  if shardings is None:
    shardings, _ = decode_mesh.decode_shardings(cfg, mesh, param_dtype)
  params = load_params_sharded(source, cfg, shardings, param_dtype)
  return HFModel(config=cfg, params=params, tokenizer=tok, path=path, dtype=dtype)


__all__ = ["GGUFSource", "SafetensorsSource", "load_model_sharded", "load_params_sharded"]
