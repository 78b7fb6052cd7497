"""Draft heads: Medusa, Hydra and Hydra++ as one Flax module family.

Head k guesses the token two places past its input position t + k + 2 (x_{t+1}, the tree root,
comes from the base model itself). Medusa heads read only the base hidden state; Hydra heads
also read the embeddings of the tokens already on their path, E(x_{t+1}), ..., E(x_{t+k+1});
Hydra++ replaces the base hidden state by g_t, the output of one extra Llama decoder layer
(+ final RMSNorm) run causally over the base hidden states with its own KV cache.

  Medusa head k:  x = h;              L x [x = x + SiLU(W x + b)];          logits = x @ U
  Hydra head k:   z0 = [h, E_1..E_k+1]; x = W_res z0 + b_res + SiLU(W z0 + b);
                  L-1 x [x = x + SiLU(W x + b)];                            logits = x @ U + c
  Hydra++:        Hydra on g = PrefixLayer(h); Dropout before every block and the LM head.

The inner ResBlocks of a head are either ONE module applied repeatedly (`shared_inner`, how the
released checkpoints were trained: a Python list-multiplication quirk) or untied. For Medusa
`shared_inner` shares all L blocks (there is no distinct first block).

Param tree (kernels are [in, out]):
  heads_{k}/first/{linear,res_connection}/{kernel [(k+2)D, D], bias [D]}   (Hydra, Hydra++)
  heads_{k}/inner/linear/{kernel [D, D], bias [D]}     shared inner block
  heads_{k}/inner_{j}/linear/{kernel, bias}            untied inner blocks (j = 0..)
  heads_{k}/lm_head/{kernel [D, V], bias [V]}          (no bias for Medusa)
  prefix_layer/... (a llama DecoderLayer), prefix_norm/scale                (Hydra++)

Legend: B batch, T tokens, S cache slots, D model width, V vocab, K heads; "x" = any leading dims.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.model.config import ModelConfig
from hydra_jax.model.kv_cache import KVCache
from hydra_jax.model.llama import DecoderLayer, RMSNorm
from hydra_jax.model.masks import causal_mask

Dtype = Any
ARCHS = ("medusa", "hydra", "hydra++")


class HeadsMismatchError(ValueError):
  """The heads were made for another base model (hidden size, vocab, or architecture)."""


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  """Static description of a set of draft heads. Hashable (jit static arg), JSON round-trippable."""

  arch: str  # "medusa" | "hydra" | "hydra++"
  hidden_size: int  # must equal the base model's
  vocab_size: int  # must equal the base model's
  num_heads: int = 4
  num_layers: int = 1  # blocks per head (Hydra++ recipe: 4)
  shared_inner: bool = True  # inner blocks of a head are one module applied repeatedly
  dropout: float = 0.0  # Hydra++ recipe: 0.2; only active when deterministic=False
  base_fingerprint: str = ""  # ModelConfig.fingerprint() of the base the heads were made for

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"unknown heads arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
    if self.num_heads < 1 or self.num_layers < 1:
      raise ValueError(f"heads need num_heads >= 1 and num_layers >= 1, got {self.num_heads} "
                       f"heads x {self.num_layers} layers")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

  @property
  def prefix_layer(self) -> bool:
    return self.arch == "hydra++"

  @property
  def sequential(self) -> bool:
    """Whether head k reads the embeddings of the tokens on its path (Hydra, Hydra++)."""
    return self.arch != "medusa"

  @classmethod
  def for_base(cls, base_cfg: ModelConfig, arch: str, **kw) -> "HeadsConfig":
    return cls(arch=arch, hidden_size=base_cfg.hidden_size, vocab_size=base_cfg.vocab_size,
               base_fingerprint=base_cfg.fingerprint(), **kw)

  def check_compatible(self, base_cfg: ModelConfig) -> None:
    """Raises HeadsMismatchError naming every difference between the heads and the base."""
    problems = []
    if self.hidden_size != base_cfg.hidden_size:
      problems.append(f"heads were trained for hidden size {self.hidden_size} but the model has "
                      f"{base_cfg.hidden_size}")
    if self.vocab_size != base_cfg.vocab_size:
      problems.append(f"heads were trained for vocab size {self.vocab_size} but the model has "
                      f"{base_cfg.vocab_size}")
    if self.base_fingerprint and self.base_fingerprint != base_cfg.fingerprint():
      problems.append(f"heads were trained for a base model with config fingerprint "
                      f"{self.base_fingerprint} but the model's is {base_cfg.fingerprint()} "
                      f"(another architecture: layers, heads, rope or sizes differ)")
    if problems:
      raise HeadsMismatchError("; ".join(problems) + ". Use heads trained for this base model.")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "HeadsConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown HeadsConfig fields {sorted(unknown)}")
    return cls(**dict(d))

  def replace(self, **kw) -> "HeadsConfig":
    return dataclasses.replace(self, **kw)


def _torch_linear_init(fan_in: int):
  """torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for W_res."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _bcast(v, ndim: int):
  """A trailing-axis vector shaped to broadcast against an ndim array (rank promotion is off)."""
  return v.reshape((1,) * (ndim - 1) + (-1,))


class _Dense(nn.Module):
  features: int
  in_features: int
  axes: tuple
  use_bias: bool = True
  kernel_init: Any = nn.initializers.zeros
  bias_init: Any = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                   (self.in_features, self.features), self.param_dtype)
    y = x.astype(self.dtype) @ w.astype(self.dtype)
    if self.use_bias:
      b = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.axes[-1:]),
                     (self.features,), self.param_dtype)
      y = y + _bcast(b.astype(self.dtype), y.ndim)
    return y


class _ResBlock(nn.Module):
  """y = x + SiLU(W x + b); W and b zero-initialised, so the block starts as the identity."""
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = self.hidden_size
    # The output dim is tagged "mlp" (not "embed" twice) so sharding rules never collide.
    h = _Dense(d, d, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
               name="linear")(x)
    return x + nn.silu(h)


class _FirstBlock(nn.Module):
  """Hydra's first block: z1 = W_res z0 + b_res + SiLU(W z0 + b), (k+2)D -> D."""
  in_features: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z0):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    axes = ("head_in", "mlp")
    fused = _Dense(self.hidden_size, self.in_features, axes, name="linear", **kw)(z0)
    res = _Dense(self.hidden_size, self.in_features, axes, name="res_connection",
                 kernel_init=_torch_linear_init(self.in_features),
                 bias_init=_torch_linear_init(self.in_features), **kw)(z0)
    return res + nn.silu(fused)


class _Head(nn.Module):
  """One draft head: its blocks and its LM head."""
  cfg: HeadsConfig
  index: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c, k = self.cfg, self.index
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = c.hidden_size
    num_inner = c.num_layers if c.arch == "medusa" else c.num_layers - 1
    if c.sequential:
      self.first = _FirstBlock((k + 2) * d, d, **kw)
    if num_inner:
      if c.shared_inner:
        self.inner = _ResBlock(d, **kw)
      else:
        self.inner = [_ResBlock(d, **kw) for _ in range(num_inner)]
    self.lm_head = _Dense(c.vocab_size, d, ("embed", "vocab"), use_bias=c.arch != "medusa",
                          kernel_init=nn.initializers.normal(0.02), **kw)
    self.drop = nn.Dropout(c.dropout)
    self._num_inner = num_inner

  def features(self, g_xD, path_embeds_xKp1xD, deterministic: bool = True):
    c, k = self.cfg, self.index
    use_drop = c.dropout > 0.0 and not deterministic
    drop = (lambda x: self.drop(x, deterministic=False)) if use_drop else (lambda x: x)
    x = g_xD.astype(self.dtype)
    if c.sequential:
      if path_embeds_xKp1xD is None or path_embeds_xKp1xD.shape[-2] != k + 1:
        got = None if path_embeds_xKp1xD is None else path_embeds_xKp1xD.shape
        raise ValueError(f"{c.arch} head {k} needs path embeddings [..., {k + 1}, D], got {got}")
      pe = path_embeds_xKp1xD.astype(self.dtype)
      z0 = jnp.concatenate([x, pe.reshape(pe.shape[:-2] + ((k + 1) * c.hidden_size,))], axis=-1)
      x = self.first(drop(z0))
    for j in range(self._num_inner):
      block = self.inner if c.shared_inner else self.inner[j]
      x = block(drop(x))
    return drop(x)  # the dropout before the LM head belongs to the features

  def logits(self, feats_xD):
    return self.lm_head(feats_xD).astype(jnp.float32)


class DraftHeads(nn.Module):
  """K draft heads (and, for Hydra++, the prefix layer). Apply with the heads' params only.

  Use `method=` to call `context`, `features`, `lm_logits`, `head_logits`, `training_features`;
  pass `rngs={'dropout': key}` with deterministic=False.
  """
  cfg: HeadsConfig
  base: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.cfg.prefix_layer:
      self.prefix_layer = DecoderLayer(self.base, **kw)
      self.prefix_norm = RMSNorm(self.base.rms_norm_eps, **kw)
    self.heads = [_Head(self.cfg, k, **kw) for k in range(self.cfg.num_heads)]

  def context(self, hidden_BxTxD, positions_BxT, mask_BxTxS=None, cache: Optional[KVCache] = None,
              deterministic: bool = True):
    """g for every position: Hydra++ runs the prefix layer; other archs return hidden as is.

    With a cache (1 layer), the T new K/V entries are written at slots cache.lengths[b] + t and
    the lengths are NOT advanced, exactly like LlamaModel.
    """
    del deterministic  # the prefix layer has no dropout
    if not self.cfg.prefix_layer:
      return hidden_BxTxD, cache
    b, t = hidden_BxTxD.shape[:2]
    if mask_BxTxS is None:
      if cache is not None:
        raise ValueError("the prefix layer with a KV cache needs an explicit attention mask")
      mask_BxTxS = causal_mask(b, t)
    kv = None if cache is None else (cache.k[0], cache.v[0])
    x, new_kv = self.prefix_layer(hidden_BxTxD.astype(self.dtype), positions_BxT, mask_BxTxS, kv,
                                  None if cache is None else cache.lengths)
    new_cache = None if cache is None else cache.replace(k=(new_kv[0],), v=(new_kv[1],))
    return self.prefix_norm(x), new_cache

  def features(self, k: int, g_xD, path_embeds_xKp1xD=None, deterministic: bool = True):
    """Head k's features before its LM head; path_embeds[..., j, :] = E(x_{t+1+j}), j = 0..k."""
    return self.heads[k].features(g_xD, path_embeds_xKp1xD, deterministic)

  def lm_logits(self, k: int, feats_xD):
    """Head k's LM head, f32 [..., V]."""
    return self.heads[k].logits(feats_xD)

  def head_logits(self, k: int, g_xD, path_embeds_xKp1xD=None, deterministic: bool = True):
    return self.lm_logits(k, self.features(k, g_xD, path_embeds_xKp1xD, deterministic))

  def training_features(self, hidden_BxTxD, token_embeds_BxTxD, positions_BxT,
                        deterministic: bool = True) -> List[jax.Array]:
    """Teacher forcing: entry k at position t reads g_t and E(x_{t+1}), ..., E(x_{t+k+1}).

    Positions whose path runs past the sequence (t + k + 1 >= T) see zero embeddings there;
    their targets must be masked by the caller. Head k at position t predicts x_{t+k+2}.
    """
    g, _ = self.context(hidden_BxTxD, positions_BxT, deterministic=deterministic)
    need_path = self.cfg.sequential
    shifted = []  # shifted[j][:, t] = E(x_{t+1+j}), zero past the end
    if need_path:
      t = token_embeds_BxTxD.shape[1]
      for j in range(self.cfg.num_heads):
        s = j + 1
        pad = jnp.zeros_like(token_embeds_BxTxD[:, :min(s, t)])
        shifted.append(jnp.concatenate([token_embeds_BxTxD[:, s:], pad], axis=1)[:, :t])
    out = []
    for k in range(self.cfg.num_heads):
      path = jnp.stack(shifted[:k + 1], axis=-2) if need_path else None
      out.append(self.features(k, g, path, deterministic))
    return out

  def __call__(self, hidden_BxTxD, token_embeds_BxTxD, positions_BxT, deterministic: bool = True):
    """Every head's logits under teacher forcing: list of K f32 [B, T, V]."""
    feats = self.training_features(hidden_BxTxD, token_embeds_BxTxD, positions_BxT, deterministic)
    return [self.lm_logits(k, f) for k, f in enumerate(feats)]


def base_lm_head_kernel(base_cfg: ModelConfig, base_params) -> jax.Array:
  """The base model's LM head as [D, V] (the embedding transposed when tied)."""
  base_params = nn.meta.unbox(base_params)
  if base_cfg.tie_word_embeddings or "lm_head" not in base_params:
    return jnp.asarray(base_params["embed_tokens"]["embedding"]).T
  return jnp.asarray(base_params["lm_head"]["kernel"])


def init_heads(cfg: HeadsConfig, base_cfg: ModelConfig, base_params, rng: jax.Array,
               param_dtype=jnp.float32, boxed: bool = False):
  """Random heads as the reference initialises them, every LM head a copy of the base's.

  ResBlock W (and b) zero, W_res torch-default uniform, prefix layer N(0, 0.02), norms 1,
  LM-head bias 0. `boxed=True` keeps the logical-axis metadata for sharded training.
  """
  cfg.check_compatible(base_cfg)
  model = DraftHeads(cfg, base_cfg, param_dtype=param_dtype)
  d = base_cfg.hidden_size
  dummy = jnp.zeros((1, 1, d), jnp.float32)
  positions = jnp.zeros((1, 1), jnp.int32)
  params = jax.jit(lambda r: model.init(r, dummy, dummy, positions)["params"])(rng)
  params = flax.core.unfreeze(params)
  lm = base_lm_head_kernel(base_cfg, base_params).astype(param_dtype)
  for k in range(cfg.num_heads):
    head = params[f"heads_{k}"]["lm_head"]
    kernel = head["kernel"]
    head["kernel"] = (kernel.replace_boxed(lm) if isinstance(kernel, nn.meta.AxisMetadata)
                      else lm)
  return params if boxed else nn.meta.unbox(params)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.meta.unbox(params)))


def path_embeddings(embedding_VxD, path_tokens_xJ) -> jax.Array:
  """E(tokens) for a path of token ids [..., J] -> [..., J, D] (the base's frozen table)."""
  return jnp.take(embedding_VxD, path_tokens_xJ, axis=0)


def param_shapes(cfg: HeadsConfig, base_cfg: ModelConfig, param_dtype=jnp.float32):
  """The heads' param tree as ShapeDtypeStructs, without allocating (checkpoint checks, sharding)."""
  model = DraftHeads(cfg, base_cfg, param_dtype=param_dtype)
  dummy = jnp.zeros((1, 1, cfg.hidden_size), jnp.float32)
  positions = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), dummy, dummy, positions)["params"])
  return nn.meta.unbox(shapes)
