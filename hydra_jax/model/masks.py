"""Attention masks that callers build for the one forward (prefill, decode, tree verify).

Every mask is boolean [B, T, S]: True where query t of row b may attend to key slot s.
With a cache, the T new tokens of row b sit at slots lengths[b] .. lengths[b] + T - 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def causal_mask(batch_size: int, seq_len: int) -> jax.Array:
  """No cache: plain causal attention within the T tokens (training, full forwards)."""
  tri = jnp.tril(jnp.ones((seq_len, seq_len), bool))
  return jnp.broadcast_to(tri, (batch_size, seq_len, seq_len))


def cache_causal_mask(lengths_B: jax.Array, num_new: int, max_len: int) -> jax.Array:
  """New tokens appended at each row's length, attending causally to the cache and each other."""
  query_slot = lengths_B[:, None] + jnp.arange(num_new)[None, :]  # [B, T]
  key_slot = jnp.arange(max_len)
  return key_slot[None, None, :] <= query_slot[:, :, None]


def tree_mask(lengths_B: jax.Array, ancestors_NxN: np.ndarray | jax.Array, max_len: int) -> jax.Array:
  """Tree tokens at slots lengths[b] + node: each sees the committed cache and its ancestors.

  `ancestors_NxN[i, j]` is True when node j is node i or one of its ancestors; a [B, N, N]
  array gives each row its own tree (dynamic trees).
  """
  ancestors = jnp.asarray(ancestors_NxN, bool)
  n = ancestors.shape[-1]
  rel = jnp.arange(max_len)[None, :] - lengths_B[:, None]  # [B, S]
  in_tree = (rel >= 0) & (rel < n)
  node = jnp.clip(rel, 0, n - 1)
  if ancestors.ndim == 3:
    tree_part = jnp.take_along_axis(ancestors, jnp.broadcast_to(
        node[:, None, :], (node.shape[0], n, max_len)), axis=2)  # [B, N, S]
  else:
    tree_part = jnp.transpose(ancestors[:, node], (1, 0, 2))  # [B, N, S]
  return (rel < 0)[:, None, :] | (tree_part & in_tree[:, None, :])
