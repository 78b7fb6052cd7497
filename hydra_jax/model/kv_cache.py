"""A static, preallocated KV cache with per-row lengths.

Shapes are fixed when the cache is created, so every jitted loop that carries it has static
shapes; only `lengths` (int32 [B]) changes. Slots at or beyond a row's length hold garbage
that the attention mask hides and the next write overwrites.

Legend: L layers, B batch, S cache slots, K kv heads, H head dim, T new tokens, M gathered.
"""

from __future__ import annotations

from typing import Tuple

import flax
import jax
import jax.numpy as jnp

from hydra_jax.model.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  k: Tuple[jax.Array, ...]  # per layer [B, S, K, H]
  v: Tuple[jax.Array, ...]  # per layer [B, S, K, H]
  lengths: jax.Array  # [B] int32: committed entries per row

  @property
  def batch_size(self) -> int:
    return self.k[0].shape[0]

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  @property
  def num_layers(self) -> int:
    return len(self.k)

  def with_lengths(self, lengths: jax.Array) -> "KVCache":
    """Sets per-row lengths: advancing after a write, or rolling a row back."""
    return self.replace(lengths=jnp.asarray(lengths, jnp.int32))

  def rollback(self, lengths: jax.Array) -> "KVCache":
    """Forgets entries beyond `lengths` (which must not exceed the current lengths)."""
    return self.with_lengths(jnp.minimum(self.lengths, jnp.asarray(lengths, jnp.int32)))

  def gather(self, src_slots: jax.Array, count: jax.Array) -> "KVCache":
    """Compacts selected entries to contiguous slots and commits them.

    For each row b: slots lengths[b] + i <- slots src_slots[b, i] for i < M, then
    lengths[b] += count[b]. Entries i >= count[b] are copied too (static shapes) but stay
    beyond the new length, so they are never read. After a speculative step, src_slots are
    the cache slots of the accepted tree path, which are all >= lengths[b] + i, so reading
    everything before writing anything is hazard-free.
    """
    src_slots = jnp.asarray(src_slots, jnp.int32)

    def move(layer):
      picked = jnp.take_along_axis(layer, src_slots[:, :, None, None], axis=1)  # [B, M, K, H]
      return write_rows(layer, picked, self.lengths)

    return KVCache(k=tuple(move(x) for x in self.k), v=tuple(move(x) for x in self.v),
                   lengths=self.lengths + jnp.asarray(count, jnp.int32))


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32,
               num_layers: int | None = None) -> KVCache:
  """An empty cache of `max_len` slots per row. `num_layers` overrides cfg (prefix layer)."""
  layers = cfg.num_layers if num_layers is None else num_layers
  shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
  zeros = lambda: jnp.zeros(shape, dtype)
  return KVCache(k=tuple(zeros() for _ in range(layers)), v=tuple(zeros() for _ in range(layers)),
                 lengths=jnp.zeros((batch_size,), jnp.int32))


def write_rows(layer_BxSxKxH: jax.Array, new_BxTxKxH: jax.Array, offsets_B: jax.Array) -> jax.Array:
  """Writes T new entries per row at slots offsets[b] .. offsets[b] + T - 1.

  The caller guarantees offsets[b] + T <= S (XLA would silently clamp the start otherwise).
  """
  new = new_BxTxKxH.astype(layer_BxSxKxH.dtype)

  def one_row(row_SxKxH, upd_TxKxH, off):
    return jax.lax.dynamic_update_slice(row_SxKxH, upd_TxKxH, (off, 0, 0))

  return jax.vmap(one_row)(layer_BxSxKxH, new, offsets_B.astype(jnp.int32))
