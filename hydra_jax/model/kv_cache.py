"""A static, preallocated KV cache with per-row lengths.

Shapes are fixed when the cache is created, so every jitted loop that carries it has static
shapes; only `lengths` (int32 [B]) changes. Slots at or beyond a row's length hold garbage
that the attention mask hides and the next write overwrites.

Layout: per layer [X, S, H] with X = B * K, one row per (batch row, kv head), batch-major
(the row-major merge of [B, K, S, H], so it is free to view either way). Attention batches
its two products over exactly these rows, so it reads the cache as it lies: with [B, K, ...]
XLA:CPU merges B and K in a reshape between the cache update and the read, and that fused
reshape made it copy every layer's whole cache each decode step. Kv heads come before slots
for the same reason (no transposed copy of the values per step).

Legend: L layers, B batch, K kv heads, X = B * K rows, S cache slots, H head dim, T new tokens,
M gathered.
"""

from __future__ import annotations

from typing import Tuple

import flax
import jax
import jax.numpy as jnp

from hydra_jax.model.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  k: Tuple[jax.Array, ...]  # per layer [B * K, S, H]
  v: Tuple[jax.Array, ...]  # per layer [B * K, S, H]
  lengths: jax.Array  # [B] int32: committed entries per row

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def num_kv_heads(self) -> int:
    return self.k[0].shape[0] // self.batch_size

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  @property
  def num_layers(self) -> int:
    return len(self.k)

  def with_lengths(self, lengths: jax.Array) -> "KVCache":
    """Sets per-row lengths: advancing after a write, or rolling a row back."""
    return self.replace(lengths=jnp.asarray(lengths, jnp.int32))

  def gather(self, src_slots: jax.Array, count: jax.Array) -> "KVCache":
    """Compacts selected entries to contiguous slots and commits them.

    For each row b: slots lengths[b] + i <- slots src_slots[b, i] for i < M, then
    lengths[b] += count[b]. Entries i >= count[b] are copied too (static shapes) but stay
    beyond the new length, so they are never read. After a speculative step, src_slots are
    the cache slots of the accepted tree path, which are all >= lengths[b] + i, so reading
    everything before writing anything is hazard-free.

    Measured on XLA:CPU (a speculative loop body): this write after the verify forward's own
    write makes XLA copy each layer's cache twice per step; skipping the move with a lax.cond
    when the path already lies in place made it worse (the branches copy the whole cache),
    and so did writing from the forward's new entries instead of reading the cache.
    """
    src_slots = jnp.asarray(src_slots, jnp.int32)
    count = jnp.asarray(count, jnp.int32)
    src = jnp.repeat(src_slots, self.num_kv_heads, axis=0)  # [X, M]

    def move(layer):
      picked = jnp.take_along_axis(layer, src[:, :, None], axis=1)  # [X, M, H]
      return write_rows(layer, picked, self.lengths)

    return KVCache(k=tuple(move(x) for x in self.k), v=tuple(move(x) for x in self.v),
                   lengths=self.lengths + count)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32,
               num_layers: int | None = None) -> KVCache:
  """An empty cache of `max_len` slots per row. `num_layers` overrides cfg (prefix layer)."""
  layers = cfg.num_layers if num_layers is None else num_layers
  shape = (batch_size * cfg.num_kv_heads, max_len, cfg.head_dim)
  zeros = lambda: jnp.zeros(shape, dtype)
  return KVCache(k=tuple(zeros() for _ in range(layers)), v=tuple(zeros() for _ in range(layers)),
                 lengths=jnp.zeros((batch_size,), jnp.int32))


def write_rows(layer_XxSxH: jax.Array, new_XxTxH: jax.Array, offsets_B: jax.Array) -> jax.Array:
  """Writes T new entries per batch row at slots offsets[b] .. offsets[b] + T - 1.

  One dynamic_update_slice per cache row, batched over the rows (a scatter with the rows as
  its batch dim), in place in a decode loop. Batched over rows, not one update per batch row
  at a constant row offset: on a cache whose rows are sharded over a mesh, SPMD partitioning
  keeps a row-batched scatter local to each device, but all-gathered the WHOLE cache for each
  constant-offset update (per layer, per step). On XLA:CPU both are in place and the scatter
  is no slower. The caller guarantees offsets[b] + T <= S (XLA would silently clamp the
  start otherwise).
  """
  new = new_XxTxH.astype(layer_XxSxH.dtype)
  k = layer_XxSxH.shape[0] // offsets_B.shape[0]
  offsets_X = jnp.repeat(offsets_B.astype(jnp.int32), k)  # rows are batch-major
  zero = jnp.zeros((), jnp.int32)
  return jax.vmap(lambda row_SxH, new_TxH, offset: jax.lax.dynamic_update_slice(
      row_SxH, new_TxH, (offset, zero)))(layer_XxSxH, new, offsets_X)
