"""The Llama-family decoder (llama, mistral, qwen2) as Flax Linen modules, used functionally.

One forward serves prefill, one-token decode, tree verification and training: the caller
passes token ids, their positions, optionally the KV cache, and the attention mask it built
(see `hydra_jax.model.masks`). Parameters carry logical axis names, so training shards them
by rules; `nn.unbox` gives the plain pytree that loading and decoding use.

Einsum legend: B batch, T query tokens, S key slots, D model width, N query heads,
K kv heads, G query heads per kv head (N = K * G), X = B * K cache rows, Q = G * T query
rows of a kv head,
J fused projections (G + 2 for q/k/v, 2 for
gate/up), H head dim, F mlp width, V vocab.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.model.config import ModelConfig
from hydra_jax.model.kv_cache import KVCache, write_rows
from hydra_jax.model.masks import causal_mask

Dtype = Any


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [H/2] in f32, with linear or Llama-3 scaling when configured."""
  h = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  scaling = cfg.rope_scaling_dict
  if scaling is None:
    return inv
  factor = float(scaling["factor"])
  if scaling["rope_type"] == "linear":
    return inv / factor
  # llama3: long wavelengths are slowed by `factor`, short ones kept, the middle interpolated.
  old_len = float(scaling["original_max_position_embeddings"])
  low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, positions_BxT: jax.Array, dtype) -> Tuple[jax.Array, jax.Array]:
  """(cos, sin) [B, T, H] for rotate-half RoPE: computed once per forward, shared by the layers."""
  angles = positions_BxT.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)[None, None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x_BxTxhxH: jax.Array, rope: Tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotate-half RoPE, as Hugging Face does it (so HF q/k weights need no permutation).

  x is [B, T, ..., H] (any head axes between T and H); rope = rope_tables(...).
  """
  cos, sin = rope
  shape = cos.shape[:2] + (1,) * (x_BxTxhxH.ndim - 3) + cos.shape[-1:]
  cos, sin = cos.reshape(shape), sin.reshape(shape)
  x1, x2 = jnp.split(x_BxTxhxH, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BxTxhxH * cos + rotated * sin


class RMSNorm(nn.Module):
  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)  # norms in f32 whatever the compute dtype
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return x32 * scale  # activations stay f32; `dense` casts its inputs


def _param(module: nn.Module, name: str, shape, axes, dtype, init=None):
  init = init or nn.initializers.normal(0.02)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _single_row_is_slow(rows: int, dtype) -> bool:
  """XLA:CPU runs bf16 x bf16 -> f32 products of ONE row on a generic path ~10x slower than
  its bf16 kernels (which take >= 2 rows): such products are computed with the row twice."""
  return rows == 1 and jnp.dtype(dtype) != jnp.float32 and jax.default_backend() == "cpu"


# XLA:CPU's f32 GEMM reads the weights of a 2-16-row product far below the one-row GEMV's
# rate (on one 2-core EPYC 2-4 rows cost ~2.1 one-row products).
# The same product written as a multiply-and-reduce over a row-major copy [O, I] of the
# weights compiles to one fusion (jaxlib 0.10 hands it whole to YNNPACK) that costs 1.6-1.7
# one-row products there. Its speed depends on the row count, not monotonically: 2, 3, 4, 8
# and 16 rows run well and 5-7 or 9-15 badly, so those are padded with zero rows (README,
# "f32 verify forwards as one multiply-and-reduce").
REDUCE_MAX_ROWS = 16
_REDUCE_ROW_BUCKETS = (2, 3, 4, 8, 16)


def dense(x_xI: jax.Array, w_IxO: jax.Array, dtype, w_OxI: Optional[jax.Array] = None
          ) -> jax.Array:
  """x [..., I] @ w [I, *O] -> [..., *O] in f32: inputs cast to `dtype`, accumulated in f32.

  Every projection of the model and the heads goes through here. Activations stay f32
  between matmuls; `dtype` is what the weights are stored in and the products read. With
  bf16, XLA:CPU hands bf16 x bf16 -> f32 dots to YNNPACK's bf16 kernels (twice the f32
  rate, half the bytes; `_single_row_is_slow` for the exception). Accelerators take the
  plain dot. `w_OxI` (the same weights as [prod(O), I], `with_row_major_copies`, made by
  the decode engine on a CPU) turns f32 products of 2-16 rows into a multiply-and-reduce.
  """
  lead, i, out = x_xI.shape[:-1], x_xI.shape[-1], w_IxO.shape[1:]
  rows = math.prod(lead)
  x2 = x_xI.reshape(rows, i).astype(dtype)
  if (w_OxI is not None and jnp.dtype(dtype) == jnp.float32
      and 2 <= rows <= REDUCE_MAX_ROWS):
    padded = next(r for r in _REDUCE_ROW_BUCKETS if r >= rows)
    x2 = jnp.pad(x2, ((0, padded - rows), (0, 0)))
    y = jnp.sum(w_OxI.astype(dtype)[None] * x2[:, None, :], axis=-1)[:rows]
    return y.reshape(lead + out)
  pad = _single_row_is_slow(rows, dtype)
  if pad:
    x2 = jnp.concatenate([x2, x2], axis=0)
  # w keeps its shape: merging O's dims where a minor one is sharded (gate_up [D, 2, F] split
  # on F) has no sharding on the merged dim, and SPMD partitioning all-gathered the whole
  # weight for it. XLA flattens the free dims itself, per device.
  y = jax.lax.dot_general(x2, w_IxO.astype(dtype), (((1,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
  return (_first_row(y) if pad else y).reshape(lead + out)


def _first_row(y_2xN: jax.Array, axis: int = 0) -> jax.Array:
  """Row 0 of a product computed on two copies of its row.

  Row 1 must look used, or XLA slices the duplicate away before the dot (back to the slow
  one-row path): it is added where row 0 is NaN, a test XLA cannot fold for floats.
  """
  first, second = jnp.split(y_2xN, 2, axis=axis)
  return jnp.where(jnp.isnan(first), second, first)


class Attention(nn.Module):
  """GQA attention over the new tokens and (optionally) a KV cache [B * K, S, H].

  q, k and v come from ONE matmul (qkv_proj [D, K, G + 2, H]: per kv head, its G query heads,
  its key and its value).
  """
  cfg: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, rope, mask_BxTxS, kv: Optional[Tuple[jax.Array, jax.Array]],
               offsets_B: Optional[jax.Array]):
    cfg, dt = self.cfg, self.dtype
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = n // k
    qkv = _QKV(cfg=cfg, dtype=dt, param_dtype=self.param_dtype, name="qkv_proj")(x_BxTxD)
    b, t = x_BxTxD.shape[:2]

    def rows(x_BxTxKxJxH):  # [B, T, K, J, H] -> [B * K, J * T, H]: the cache's row layout
      j = x_BxTxKxJxH.shape[3]
      return jnp.transpose(x_BxTxKxJxH, (0, 2, 3, 1, 4)).reshape(b * k, j * t, h)

    # Scale q once here instead of the [.., T, S] scores. Query rows Q = (G, T) of a kv head.
    q = rows(apply_rope(qkv[:, :, :, :g], rope) * (1.0 / math.sqrt(h)))
    key = rows(apply_rope(qkv[:, :, :, g:g + 1], rope))  # [X, T, H]
    val = rows(qkv[:, :, :, g + 1:])

    if kv is None:
      keys, values, new_kv = key, val, None
    else:
      keys = write_rows(kv[0], key, offsets_B)
      values = write_rows(kv[1], val, offsets_B)
      new_kv = (keys, values)

    # Plain batched matmuls over the X = B * K rows, reading the cache as it lies (see
    # kv_cache): keeping B, K, G and T apart in an einsum lets XLA:CPU transpose or copy the
    # whole cache every step.
    s = keys.shape[1]
    mask = jnp.broadcast_to(mask_BxTxS[:, None, None], (b, k, g, t, s)).reshape(b * k, g * t, s)
    pad = _single_row_is_slow(g * t, dt)
    if pad:  # one query row per kv head (a decode step without GQA): computed twice
      q, mask = jnp.concatenate([q, q], axis=1), jnp.concatenate([mask, mask], axis=1)
    scores = jnp.einsum("XQH,XSH->XQS", q.astype(dt), keys.astype(dt),
                        preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)  # softmax in f32
    out = jnp.einsum("XQS,XSH->XQH", probs, values.astype(dt),
                     preferred_element_type=jnp.float32)
    out = _first_row(out, axis=1) if pad else out
    out = jnp.transpose(out.reshape(b, k, g, t, h), (0, 3, 1, 2, 4)).reshape(b, t, n * h)
    return _OutProj(cfg=cfg, dtype=dt, param_dtype=self.param_dtype, name="o_proj")(out), new_kv


class _QKV(nn.Module):
  """The fused q/k/v projection: kernel [D, K, G + 2, H] (+ bias [K, G + 2, H])."""
  cfg: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.cfg
    shape = (c.num_kv_heads, c.num_heads // c.num_kv_heads + 2, c.head_dim)
    w = _param(self, "kernel", (c.hidden_size,) + shape, ("embed", "kv_heads", "qkv", "head_dim"),
               self.param_dtype)
    y = dense(x_BxTxD, w, self.dtype, _row_major_copy(self))  # [B, T, K, J, H]
    if c.attention_bias:
      bias = _param(self, "bias", shape, ("kv_heads", "qkv", "head_dim"), self.param_dtype,
                    nn.initializers.zeros)
      y = y + bias.astype(jnp.float32)[None, None]
    return y


class _OutProj(nn.Module):
  cfg: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxNH):
    c = self.cfg
    w = _param(self, "kernel", (c.num_heads, c.head_dim, c.hidden_size),
               ("heads", "head_dim", "embed"), self.param_dtype)
    # [N, H, D] as [N * H, D]
    return dense(x_BxTxNH, w.reshape(-1, c.hidden_size), self.dtype, _row_major_copy(self))


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one matmul (gate_up_proj [D, 2, F])."""
  cfg: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD):
    d, f, dt = self.cfg.hidden_size, self.cfg.intermediate_size, self.dtype

    def project(x, name, shape, axes):
      kernel = _Kernel(shape=shape, axes=axes, param_dtype=self.param_dtype, name=name)
      return dense(x, kernel(), dt, _row_major_copy(kernel))

    gate_up = project(x_BxTxD, "gate_up_proj", (d, 2, f), ("embed", "gate_up", "mlp"))
    hidden = nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    return project(hidden, "down_proj", (f, d), ("mlp", "embed"))


class _Kernel(nn.Module):
  shape: Tuple[int, ...]
  axes: Tuple[str, ...]
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    return _param(self, "kernel", self.shape, self.axes, self.param_dtype)


def _row_major_copy(module: nn.Module) -> Optional[jax.Array]:
  """The module's ROW_MAJOR_COPY where the caller passed one (see `dense`), else None."""
  return module.variables.get("params", {}).get(ROW_MAJOR_COPY)


class DecoderLayer(nn.Module):
  """Pre-norm attention + SwiGLU block. Also the Hydra++ prefix layer.

  `rope` is rope_tables(cfg, positions, dtype) of the T new tokens.
  """
  cfg: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, rope, mask_BxTxS, kv=None, offsets_B=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.cfg.rms_norm_eps
    h = RMSNorm(eps, name="input_layernorm", **kw)(x_BxTxD)
    attn, new_kv = Attention(self.cfg, name="self_attn", **kw)(h, rope, mask_BxTxS, kv, offsets_B)
    x = x_BxTxD + attn
    h = RMSNorm(eps, name="post_attention_layernorm", **kw)(x)
    return x + MLP(self.cfg, name="mlp", **kw)(h), new_kv


# params key of a tied LM head's [E, V] copy (LlamaModel.logits); never saved or sharded.
TIED_HEAD_COPY = "tied_lm_head_ExV"
# (id(source array), tag) -> (weak reference to the source, the array derived from it): arrays
# decoding derives from the weights once per set of weights, for every engine that decodes
# them, dropped with their source (the derived array does not reference it).
_DERIVED: dict = {}


def derived_array(source: jax.Array, tag, make) -> jax.Array:
  """make(source), made once per (source array, hashable tag) and cached while the source
  lives. Call it outside jit: made inside, XLA recomputes it on every call (or every step)."""
  key = (id(source), tag)
  ref, value = _DERIVED.get(key, (None, None))
  if ref is None or ref() is not source:
    value = jax.block_until_ready(make(source))
    # The callback holds the dict itself: at interpreter exit the module global is None.
    _DERIVED[key] = (weakref.ref(source, lambda _, d=_DERIVED: d.pop(key, None)), value)
  return value


def with_tied_head_copy(cfg: ModelConfig, params):
  """params plus TIED_HEAD_COPY (the embedding transposed) for a tied model; else params.
  Call it outside jit: the copy is made once per embedding array and cached while it lives."""
  if not cfg.tie_word_embeddings or TIED_HEAD_COPY in params:
    return params
  copy = derived_array(params["embed_tokens"]["embedding"], TIED_HEAD_COPY, jnp.transpose)
  return {**params, TIED_HEAD_COPY: copy}


# params key, next to a kernel of the decoder or the LM head, of the same weights as a
# row-major [prod(O), prod(I)] array (`dense`); a tied head's is the embedding itself. Made by
# the decode engine on a CPU (DecodeEngine.run_params), never saved or sharded.
ROW_MAJOR_COPY = "kernel_OxI"
# Modules whose kernel has more than one input dim (o_proj [N, H, D] reads N * H).
_INPUT_DIMS = {"o_proj": 2}


def _row_major(w: jax.Array, n_in: int) -> jax.Array:
  w = w.reshape((math.prod(w.shape[:n_in]), -1))
  return jnp.transpose(w)


def with_row_major_copies(cfg: ModelConfig, params):
  """params plus a ROW_MAJOR_COPY next to every kernel (and the tied embedding), for `dense`'s
  multiply-and-reduce. Call it outside jit: each copy is made once per kernel array and
  cached while it lives (ShapeDtypeStructs get shapes). The copies double the memory of the
  kernels (not of a tied head); params that have them all come back as they are."""

  def visit(name, tree):
    out = {k: visit(k, v) if isinstance(v, dict) else v for k, v in tree.items()}
    kernel = tree.get("kernel")
    if kernel is not None and kernel.ndim >= 2 and ROW_MAJOR_COPY not in tree:
      n_in = _INPUT_DIMS.get(name, 1)
      make = lambda w: _row_major(w, n_in)  # noqa: E731
      out[ROW_MAJOR_COPY] = (jax.eval_shape(make, kernel)  # sizing: shapes only
                             if isinstance(kernel, jax.ShapeDtypeStruct)
                             else derived_array(kernel, (ROW_MAJOR_COPY, n_in), make))
    if name == "embed_tokens" and cfg.tie_word_embeddings:
      out.setdefault(ROW_MAJOR_COPY, tree["embedding"])  # [V, E] is the head's [O, I]
    unchanged = out.keys() == tree.keys() and all(out[k] is tree[k] for k in tree)
    return tree if unchanged else out

  return visit(None, params)


class LlamaModel(nn.Module):
  """The decoder with its embedding and LM head.

  __call__(tokens [B, T], positions [B, T], cache | None, mask [B, T, S] | None)
    -> (logits [B, T, V] f32 or None, hidden [B, T, D] after the final norm, cache | None)

  With a cache, the T new entries are written at slots cache.lengths[b] + t; the lengths are
  NOT advanced (the caller knows how many entries to commit: all after prefill, only the
  accepted path after tree verification). Without a cache the mask defaults to causal.
  """
  cfg: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = self.cfg
    self.embed_tokens = _Embedding(c.vocab_size, c.hidden_size, self.param_dtype)
    self.layers = [DecoderLayer(c, **kw) for _ in range(c.num_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, **kw)
    if not c.tie_word_embeddings:
      self.lm_head = _Kernel(shape=(c.hidden_size, c.vocab_size), axes=("embed", "vocab"),
                             param_dtype=self.param_dtype)

  def embed(self, tokens_BxT):
    return jnp.take(self.embed_tokens(), tokens_BxT, axis=0).astype(jnp.float32)

  def logits(self, hidden_BxTxD, columns=None):
    """LM head (inputs in the compute dtype), f32 logits (what sampling and losses want);
    `columns` (int [V']): only those tokens' logits, [B, T, V'].

    A tied head is the embedding [V, E], read as it lies by one-row products (XLA:CPU's GEMV
    is fastest that way). Products of two or more rows (a verify forward, a batch, or a bf16
    row, which `dense` computes twice) read params[TIED_HEAD_COPY] instead when the caller
    passes one: the same weights laid out [E, V], which XLA:CPU's GEMM reads much faster
    (SmolLM2, 49,152 x 576, one thread: f32 2 rows 9.5 -> 7.0 ms, 8 rows 12.0 -> 9.6; bf16
    2 rows 65 -> 7.4). The decode engine makes that copy once per set of weights on a CPU
    (`DecodeEngine.run_params`), outside jit: made inside, XLA rebuilt it every step."""
    rows = math.prod(hidden_BxTxD.shape[:-1])
    params = self.variables.get("params", {})
    copy = params.get(TIED_HEAD_COPY)
    if self.cfg.tie_word_embeddings and copy is not None and (
        rows > 1 or _single_row_is_slow(rows, self.dtype)):
      w = copy
    elif self.cfg.tie_word_embeddings:
      w = self.embed_tokens().T
    else:
      w = self.lm_head()
    head = "embed_tokens" if self.cfg.tie_word_embeddings else "lm_head"
    w_rows = params.get(head, {}).get(ROW_MAJOR_COPY)
    if columns is not None:
      w = jnp.take(w, columns, axis=1)
      w_rows = None
    return dense(hidden_BxTxD, w, self.dtype, w_rows)

  def __call__(self, tokens_BxT, positions_BxT, cache: Optional[KVCache] = None,
               mask_BxTxS=None, return_logits: bool = True):
    b, t = tokens_BxT.shape
    if mask_BxTxS is None:
      if cache is not None:
        raise ValueError("a forward with a KV cache needs an explicit attention mask")
      mask_BxTxS = causal_mask(b, t)
    x = self.embed(tokens_BxT)
    rope = rope_tables(self.cfg, positions_BxT, jnp.float32)
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x, layer_kv = layer(x, rope, mask_BxTxS, kv, None if cache is None else cache.lengths)
      if layer_kv is not None:
        new_k.append(layer_kv[0])
        new_v.append(layer_kv[1])
    hidden = self.norm(x)
    new_cache = None if cache is None else cache.replace(k=tuple(new_k), v=tuple(new_v))
    logits = self.logits(hidden) if return_logits else None
    return logits, hidden, new_cache


class _Embedding(nn.Module):
  vocab_size: int
  hidden_size: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    return _param(self, "embedding", (self.vocab_size, self.hidden_size), ("vocab", "embed"),
                  self.param_dtype)


def init_params(cfg: ModelConfig, rng: jax.Array, param_dtype=jnp.float32, boxed: bool = False):
  """Random params (N(0, 0.02), norms 1); `boxed=True` keeps the logical-axis metadata."""
  model = LlamaModel(cfg, param_dtype=param_dtype)
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = model.init(rng, tokens, tokens)
  params = variables["params"]
  return params if boxed else nn.unbox(params)
