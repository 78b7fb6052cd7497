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

The first block's two matmuls read the same z0, so they are one: first/kernel [(k+2)D, 2, D]
holds W (index 0, the SiLU branch) and W_res (index 1) side by side.

LM heads (`lm_head`, `draft_vocab`): "own" gives every head its own [D, V'] LM head
(initialised from the base's, the paper's recipe); "base" makes every head reuse the base
model's frozen LM head (a head then only owns a bias, and the heads' parameters shrink by
K * D * V). `draft_vocab` (token ids, most frequent first; EAGLE-3 / FR-Spec) restricts the
heads' logits to those V' tokens: drafting reads V'/V of the LM-head bytes. Head logits are
then indexed by draft position; `draft_ids` maps them back to token ids. Verification always
uses the base model's full vocabulary, so decoding stays lossless whatever the heads propose.

Param tree (kernels are [in, out]):
  heads_{k}/first/{kernel [(k+2)D, 2, D], bias [2, D]}   (Hydra, Hydra++)
  heads_{k}/inner/linear/{kernel [D, D], bias [D]}     shared inner block
  heads_{k}/inner_{j}/linear/{kernel, bias}            untied inner blocks (j = 0..)
  heads_{k}/lm_head/{kernel [D, V'], bias [V']}        lm_head "own" (no bias for Medusa)
  heads_{k}/lm_head/bias [V']                          lm_head "base" (Hydra, Hydra++)
  prefix_layer/... (a llama DecoderLayer), prefix_norm/scale                (Hydra++)

Legend: B batch, T tokens, S cache slots, D model width, V vocab, V' draft vocab, K heads;
"x" = any leading dims.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.model.config import ModelConfig
from hydra_jax.model.kv_cache import KVCache
from hydra_jax.model.llama import (TIED_HEAD_COPY, DecoderLayer, RMSNorm, dense, derived_array,
                                   rope_tables)
from hydra_jax.model.masks import causal_mask

Dtype = Any
ARCHS = ("medusa", "hydra", "hydra++")
LM_HEADS = ("own", "base")


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
  lm_head: str = "own"  # "own": an LM head per head; "base": reuse the base's frozen one
  draft_vocab: Tuple[int, ...] = ()  # token ids the heads can propose; () = the full vocab

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"unknown heads arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
    if self.num_heads < 1 or self.num_layers < 1:
      raise ValueError(f"heads need num_heads >= 1 and num_layers >= 1, got {self.num_heads} "
                       f"heads x {self.num_layers} layers")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
    if self.lm_head not in LM_HEADS:
      raise ValueError(f"unknown lm_head {self.lm_head!r}; choose one of {', '.join(LM_HEADS)}")
    ids = tuple(int(i) for i in self.draft_vocab)
    object.__setattr__(self, "draft_vocab", ids)  # lists from JSON -> a hashable tuple
    if ids and (len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= self.vocab_size):
      raise ValueError(f"draft_vocab must hold distinct token ids in [0, {self.vocab_size}); "
                       f"got {len(ids)} ids in [{min(ids)}, {max(ids)}] with "
                       f"{len(ids) - len(set(ids))} repeats")

  @property
  def prefix_layer(self) -> bool:
    return self.arch == "hydra++"

  @property
  def draft_vocab_size(self) -> int:
    """V': how many tokens the heads' logits range over."""
    return len(self.draft_vocab) or self.vocab_size

  @property
  def draft_ids(self) -> np.ndarray:
    """int32 [V']: token id of each draft-logit index (arange(V) without a draft vocab)."""
    if self.draft_vocab:
      return np.asarray(self.draft_vocab, np.int32)
    return np.arange(self.vocab_size, dtype=np.int32)

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
    y = dense(x, w, self.dtype)
    if self.use_bias:
      b = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.axes[-1:]),
                     (self.features,), self.param_dtype)
      y = y + _bcast(b.astype(jnp.float32), y.ndim)
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
  """Hydra's first block: z1 = W_res z0 + b_res + SiLU(W z0 + b), (k+2)D -> D, one matmul.

  kernel [(k+2)D, 2, D]: [:, 0] = W (zero-initialised), [:, 1] = W_res (torch's default
  Linear init); bias [2, D] likewise.
  """
  in_features: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z0):
    torch_init = _torch_linear_init(self.in_features)

    def init(key, shape, dtype=jnp.float32):  # shape [..., 2, D]: W zero, W_res torch-like
      res = torch_init(key, shape[:-2] + shape[-1:], dtype)
      return jnp.stack([jnp.zeros_like(res), res], axis=-2)

    w = self.param("kernel", nn.with_logical_partitioning(init, ("head_in", "fused", "mlp")),
                   (self.in_features, 2, self.hidden_size), self.param_dtype)
    b = self.param("bias", nn.with_logical_partitioning(init, ("fused", "mlp")),
                   (2, self.hidden_size), self.param_dtype)
    y = dense(z0, w, self.dtype)  # [..., 2, D]
    y = y + b.astype(jnp.float32).reshape((1,) * (y.ndim - 2) + b.shape)
    return y[..., 1, :] + nn.silu(y[..., 0, :])


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
    if c.lm_head == "own":
      self.lm_head = _Dense(c.draft_vocab_size, d, ("embed", "vocab"), use_bias=c.arch != "medusa",
                            kernel_init=nn.initializers.normal(0.02), **kw)
    elif c.arch != "medusa":
      self.lm_bias = self.param("lm_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, ("vocab",)), (c.draft_vocab_size,), self.param_dtype)
    self.drop = nn.Dropout(c.dropout)
    self._num_inner = num_inner

  def features(self, g_xD, path_embeds_xKp1xD, deterministic: bool = True):
    c, k = self.cfg, self.index
    use_drop = c.dropout > 0.0 and not deterministic
    drop = (lambda x: self.drop(x, deterministic=False)) if use_drop else (lambda x: x)
    x = g_xD.astype(jnp.float32)
    if c.sequential:
      if path_embeds_xKp1xD is None or path_embeds_xKp1xD.shape[-2] != k + 1:
        got = None if path_embeds_xKp1xD is None else path_embeds_xKp1xD.shape
        raise ValueError(f"{c.arch} head {k} needs path embeddings [..., {k + 1}, D], got {got}")
      pe = path_embeds_xKp1xD.astype(jnp.float32)
      z0 = jnp.concatenate([x, pe.reshape(pe.shape[:-2] + ((k + 1) * c.hidden_size,))], axis=-1)
      x = self.first(drop(z0))
    for j in range(self._num_inner):
      block = self.inner if c.shared_inner else self.inner[j]
      x = block(drop(x))
    return drop(x)  # the dropout before the LM head belongs to the features

  def logits(self, feats_xD, base_lm_DxVd=None):
    """f32 [..., V'] logits; lm_head "base" needs base_lm_DxVd (`shared_lm_kernel`)."""
    if self.cfg.lm_head == "own":
      return self.lm_head(feats_xD).astype(jnp.float32)
    if base_lm_DxVd is None:
      raise ValueError("heads with lm_head='base' need the base model's LM head: pass "
                       "base_lm=shared_lm_kernel(heads_cfg, base_cfg, base_params)")
    y = dense(feats_xD, base_lm_DxVd, self.dtype)
    if self.cfg.arch != "medusa":
      y = y + _bcast(self.lm_bias.astype(jnp.float32), y.ndim)
    return y.astype(jnp.float32)


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
    rope = rope_tables(self.base, positions_BxT, jnp.float32)
    x, new_kv = self.prefix_layer(hidden_BxTxD.astype(jnp.float32), rope, mask_BxTxS, kv,
                                  None if cache is None else cache.lengths)
    new_cache = None if cache is None else cache.replace(k=(new_kv[0],), v=(new_kv[1],))
    return self.prefix_norm(x), new_cache

  def features(self, k: int, g_xD, path_embeds_xKp1xD=None, deterministic: bool = True):
    """Head k's features before its LM head; path_embeds[..., j, :] = E(x_{t+1+j}), j = 0..k."""
    return self.heads[k].features(g_xD, path_embeds_xKp1xD, deterministic)

  def lm_logits(self, k: int, feats_xD, base_lm=None):
    """Head k's LM head, f32 [..., V'] (base_lm: see `shared_lm_kernel`)."""
    return self.heads[k].logits(feats_xD, base_lm)

  def head_logits(self, k: int, g_xD, path_embeds_xKp1xD=None, deterministic: bool = True,
                  base_lm=None):
    return self.lm_logits(k, self.features(k, g_xD, path_embeds_xKp1xD, deterministic), base_lm)

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

  def __call__(self, hidden_BxTxD, token_embeds_BxTxD, positions_BxT, deterministic: bool = True,
               base_lm=None):
    """Every head's logits under teacher forcing: list of K f32 [B, T, V']."""
    feats = self.training_features(hidden_BxTxD, token_embeds_BxTxD, positions_BxT, deterministic)
    return [self.lm_logits(k, f, base_lm) for k, f in enumerate(feats)]


def base_lm_head_kernel(base_cfg: ModelConfig, base_params) -> jax.Array:
  """The base model's LM head as [D, V] (the embedding transposed when tied: the decode
  engine's ready-made copy where it passed one, llama.TIED_HEAD_COPY)."""
  base_params = nn.meta.unbox(base_params)
  if base_cfg.tie_word_embeddings and TIED_HEAD_COPY in base_params:
    return jnp.asarray(base_params[TIED_HEAD_COPY])
  stored, is_embedding = _stored_lm_head(base_cfg, base_params)
  return jnp.asarray(stored).T if is_embedding else jnp.asarray(stored)


def _stored_lm_head(base_cfg: ModelConfig, base_params):
  """(the stored array the base LM head reads, whether it is the [V, E] embedding): tied
  weights, or a checkpoint without lm_head, read the embedding; else lm_head's [D, V] kernel."""
  if base_cfg.tie_word_embeddings or "lm_head" not in base_params:
    return base_params["embed_tokens"]["embedding"], True
  return base_params["lm_head"]["kernel"], False


def shared_lm_kernel(cfg: HeadsConfig, base_cfg: ModelConfig, base_params) -> Optional[jax.Array]:
  """[D, V'] for heads with lm_head "base": the base LM head's draft-vocab columns; else None.

  Build it once per call, outside any loop: the heads read it every draft depth. Decoding
  builds it once per set of weights instead (`with_shared_lm_kernel`).
  """
  if cfg.lm_head != "base":
    return None
  if cfg.draft_vocab and base_cfg.tie_word_embeddings:  # whole rows of [V, E], then [D, V']
    embedding = jnp.asarray(nn.meta.unbox(base_params)["embed_tokens"]["embedding"])
    return jnp.take(embedding, jnp.asarray(cfg.draft_ids), axis=0).T
  kernel = base_lm_head_kernel(base_cfg, base_params)
  return jnp.take(kernel, jnp.asarray(cfg.draft_ids), axis=1) if cfg.draft_vocab else kernel


# heads params key of a ready `shared_lm_kernel` (decoding only; never saved or sharded).
SHARED_LM_KERNEL = "shared_lm_DxVd"


def with_shared_lm_kernel(cfg: HeadsConfig, base_cfg: ModelConfig, base_params, heads_params):
  """heads_params plus SHARED_LM_KERNEL for heads with lm_head "base" (else as given), made
  outside jit once per set of base weights and draft vocabulary (llama.derived_array).

  Why: built inside the decode loop's jit, the draft-vocabulary gather of SmolLM2's 49,152 x
  576 head ran on every call (~25 ms on the AMD EPYC, one thread: a prompt's worth of steps
  paid it, and step-cost timings of 8-16 steps paid 1.5-3 ms per step)."""
  if cfg.lm_head != "base" or heads_params is None or SHARED_LM_KERNEL in heads_params:
    return heads_params
  source, _ = _stored_lm_head(base_cfg, nn.meta.unbox(base_params))
  kernel = derived_array(source, (SHARED_LM_KERNEL, cfg.draft_vocab),
                         lambda _: shared_lm_kernel(cfg, base_cfg, base_params))
  return {**heads_params, SHARED_LM_KERNEL: kernel}


def split_shared_lm_kernel(heads_params):
  """(the heads' own params, the ready SHARED_LM_KERNEL or None)."""
  if heads_params is None or SHARED_LM_KERNEL not in heads_params:
    return heads_params, None
  own = {k: v for k, v in heads_params.items() if k != SHARED_LM_KERNEL}
  return own, heads_params[SHARED_LM_KERNEL]


def init_heads(cfg: HeadsConfig, base_cfg: ModelConfig, base_params, rng: jax.Array,
               param_dtype=jnp.float32, boxed: bool = False):
  """Random heads as the reference initialises them, every own LM head a copy of the base's.

  ResBlock W (and b) zero, W_res torch-default uniform, prefix layer N(0, 0.02), norms 1,
  LM-head bias 0; own LM heads start as the base LM head's draft-vocab columns.
  `boxed=True` keeps the logical-axis metadata for sharded training.
  """
  cfg.check_compatible(base_cfg)
  model = DraftHeads(cfg, base_cfg, param_dtype=param_dtype)
  d = base_cfg.hidden_size
  dummy = jnp.zeros((1, 1, d), jnp.float32)
  positions = jnp.zeros((1, 1), jnp.int32)
  base_lm = shared_lm_kernel(cfg, base_cfg, base_params)
  params = jax.jit(lambda r, lm: model.init(r, dummy, dummy, positions, base_lm=lm)["params"])(
      rng, base_lm)
  params = flax.core.unfreeze(params)
  if cfg.lm_head == "own":
    lm = base_lm_head_kernel(base_cfg, base_params)
    lm = jnp.take(lm, jnp.asarray(cfg.draft_ids), axis=1) if cfg.draft_vocab else lm
    lm = lm.astype(param_dtype)
    for k in range(cfg.num_heads):
      head = params[f"heads_{k}"]["lm_head"]
      kernel = head["kernel"]
      head["kernel"] = (kernel.replace_boxed(lm) if isinstance(kernel, nn.meta.AxisMetadata)
                        else lm)
  return params if boxed else nn.meta.unbox(params)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.meta.unbox(params)))


def param_shapes(cfg: HeadsConfig, base_cfg: ModelConfig, param_dtype=jnp.float32):
  """The heads' param tree as ShapeDtypeStructs, without allocating (checkpoint checks, sharding)."""
  model = DraftHeads(cfg, base_cfg, param_dtype=param_dtype)
  dummy = jnp.zeros((1, 1, cfg.hidden_size), jnp.float32)
  positions = jnp.zeros((1, 1), jnp.int32)
  base_lm = (jax.ShapeDtypeStruct((cfg.hidden_size, cfg.draft_vocab_size), jnp.float32)
             if cfg.lm_head == "base" else None)
  shapes = jax.eval_shape(
      lambda lm: model.init(jax.random.PRNGKey(0), dummy, dummy, positions, base_lm=lm)["params"],
      base_lm)
  return nn.meta.unbox(shapes)
