"""The host-side driver of both decode loops: compile once per shape, run batches, report.

`DecodeEngine` holds the static half of decoding (model config, compute dtype and, for
speculative decoding, the heads config, the tree, the accept mode and the drafter) and one
cache of compiled executables, keyed by the shapes of what is traced. A call compiles two
executables ahead of time, the prefill (prompt forward + output index 0) and the loop (which
takes the state donated), and times them apart from compilation.

Speculative rows report `accept_length` (mean tokens per verify forward, bonus included) and
`accepted_per_step` in BatchOutput.extra.

With a `mesh` (`decoding.mesh.make_decode_mesh`), both executables are compiled with explicit
in/out shardings from the one rules table (params and heads over "tensor", the KV caches'
rows over ("data", "tensor"), per-row state over "data"), the loop still takes its state
donated and runs every step on the devices with no host round trip; `loop_collectives`
lists what a step communicates. Several processes (jax.distributed) run the same calls on
the same host inputs; every process gets the whole result.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding import autoregressive as ar
from hydra_jax.decoding import collectives
from hydra_jax.decoding import speculative as spec
from hydra_jax.decoding.acceptance import (ACCEPT_MODES, DEFAULT_POSTERIOR_ALPHA,
                                           DEFAULT_POSTERIOR_THRESHOLD, AcceptParams,
                                           check_accept_mode)
from hydra_jax.decoding.drafting import SpecModels, heads_drafter
from hydra_jax.decoding.dynamic_tree import dynamic_drafter
from hydra_jax.decoding.sampling import SamplingParams
from hydra_jax.decoding.state import BatchOutput, StopCriteria
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import SHARED_LM_KERNEL, HeadsConfig, with_shared_lm_kernel
from hydra_jax.model.llama import (TIED_HEAD_COPY, LlamaModel, with_row_major_copies,
                                   with_tied_head_copy)
from hydra_jax.parallel import mesh as decode_mesh

# Incremented when a loop is TRACED, i.e. on every (re)compile; tests read it.
TRACE_COUNTS: collections.Counter = collections.Counter()


def _signature(tree) -> Tuple:
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))


def _shapes(tree):
  """Shapes and dtypes only (a trace's out_info also carries layouts)."""
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def wants_tied_head_copy(cfg: ModelConfig, dtype, multi_row: bool, mesh=None) -> bool:
  """Whether decoding should hand the model a tied LM head's [E, V] copy
  (llama.with_tied_head_copy): on a CPU without a mesh, where some LM head product has >= 2
  rows: `multi_row` (speculative verify, or any forward of several tokens), or bf16 (whose
  one-row products are computed as two). f32 autoregressive decoding of one row never reads
  it (XLA:CPU's GEMV is fastest on the embedding as it lies), so it keeps none."""
  return bool(cfg.tie_word_embeddings and mesh is None and jax.default_backend() == "cpu"
              and (multi_row or jnp.dtype(dtype) != jnp.float32))


# Above this many bytes of f32 weights a verify's 2-16-row products read them from memory,
# not cache, and the multiply-and-reduce beats XLA:CPU's GEMM (2-core EPYC, 32 MB L3, one
# core, side by side: SmolLM2-135M, 540 MB, a 4-token Hydra++ step 53.5 -> 43.4 ms; the 36 MB
# embedded model, 4.3 -> 4.5 ms, stays on the GEMM).
ROW_MAJOR_MIN_BYTES = 64 << 20


def wants_row_major_copies(cfg: ModelConfig, dtype, speculative: bool, mesh=None) -> bool:
  """Whether decoding should hand the model row-major copies of its kernels
  (llama.with_row_major_copies, read by `llama.dense`): speculative f32 decoding on a CPU
  without a mesh, of a model above ROW_MAJOR_MIN_BYTES. Autoregressive steps are one-row
  GEMVs, fastest on the kernels as they lie, so they keep none."""
  return bool(speculative and mesh is None and jax.default_backend() == "cpu"
              and jnp.dtype(dtype) == jnp.float32 and 4 * cfg.num_params > ROW_MAJOR_MIN_BYTES)


class DecodeEngine:
  """Autoregressive decoding (heads_cfg None) or speculative decoding with heads and a tree."""

  def __init__(self, cfg: ModelConfig, dtype=jnp.float32, heads_cfg: Optional[HeadsConfig] = None,
               tree=None, accept: str = "greedy", drafter_factory=heads_drafter, mesh=None,
               row_major_copies: Optional[bool] = None):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.accept = check_accept_mode(accept)
    self.speculative = heads_cfg is not None
    if self.speculative:
      heads_cfg.check_compatible(cfg)
      if tree is None:
        raise ValueError("speculative decoding needs a tree (tree.resolve_tree)")
      if tree.depth > heads_cfg.num_heads:
        raise ValueError(f"tree depth {tree.depth} needs {tree.depth} draft heads but the heads "
                         f"have {heads_cfg.num_heads}: use a tree of depth <= "
                         f"{heads_cfg.num_heads}")
      self.models = SpecModels(cfg, heads_cfg, tree, self.dtype)
    elif accept != "greedy":
      raise ValueError("autoregressive decoding samples by itself: accept is for speculation")
    self.model = LlamaModel(cfg, dtype=self.dtype, param_dtype=self.dtype)
    if self.speculative and tree.dynamic and drafter_factory is heads_drafter:
      drafter_factory = dynamic_drafter  # the topology is chosen in the loop, per step
    self.drafter_factory = drafter_factory
    self._compiled: Dict[Tuple, Any] = {}
    self.copy_tied_head = wants_tied_head_copy(cfg, self.dtype, self.speculative, mesh)
    # None: wants_row_major_copies decides; True / False (benchmarks) force the choice.
    self.row_major_copies = (wants_row_major_copies(cfg, self.dtype, self.speculative, mesh)
                             if row_major_copies is None else row_major_copies)
    self.mesh = decode_mesh.make_decode_mesh(mesh)
    if self.row_major_copies and self.mesh is not None:
      raise ValueError("row-major kernel copies are for single-device CPU decoding, not a mesh")
    self.param_shardings = self.heads_shardings = None
    if self.mesh is not None:
      self.param_shardings, self.heads_shardings = decode_mesh.decode_shardings(
          cfg, self.mesh, self.dtype, heads_cfg)

  @property
  def slots_per_step(self) -> int:
    """Cache entries one loop step writes before committing (the tree size when speculating)."""
    return self.models.tree.num_nodes if self.speculative else 1

  # --- the jitted halves ---------------------------------------------------------------------

  def _prefill_fn(self, cache_len: int):
    # The seed key comes in as its raw uint32 data: a plain array places on any mesh.
    if self.speculative:
      def prefill(params, heads_params, tokens, lengths, active, row_ids, key_data, *rest):
        TRACE_COUNTS["prefill"] += 1
        return spec.spec_prefill(self.models, cache_len, params, heads_params, tokens, lengths,
                                 active, row_ids, jax.random.wrap_key_data(key_data), *rest)
    else:
      def prefill(params, heads_params, tokens, lengths, active, row_ids, key_data, *rest):
        TRACE_COUNTS["prefill"] += 1
        return ar.ar_prefill(self.model, cache_len, params, tokens, lengths, active, row_ids,
                             jax.random.wrap_key_data(key_data), *rest)
    if self.mesh is None:
      return prefill
    mesh = self.mesh

    def sharded_prefill(*args):
      # The state's shardings follow from its shapes, known only while tracing: constraining
      # here (not jit's out_shardings) lets one trace give both the program and the shape.
      state = prefill(*args)
      return jax.lax.with_sharding_constraint(state, decode_mesh.state_shardings(state, mesh))
    return sharded_prefill

  def _loop_fn(self):
    if self.speculative:
      models, accept, factory = self.models, self.accept, self.drafter_factory

      def loop(params, heads_params, state, accept_params, stop):
        TRACE_COUNTS["spec_loop"] += 1
        drafter = factory(models, params, heads_params)
        return spec.spec_loop(models, params, heads_params, drafter, state, accept_params, stop,
                              accept)
      return loop

    def ar_loop(params, heads_params, state, accept_params, stop):
      TRACE_COUNTS["loop"] += 1
      return ar.ar_loop(self.model, params, state, accept_params, stop)
    return ar_loop

  def _jitted(self, args, cache_len: int):
    """(prefill traced for args, loop jitted, the state's shape), the prefill traced once: a
    big model's trace takes seconds. With a mesh, explicit shardings."""
    if self.mesh is None:
      prefill = jax.jit(self._prefill_fn(cache_len)).trace(*args)
      return prefill, jax.jit(self._loop_fn(), donate_argnums=(2,)), _shapes(prefill.out_info)
    rep = decode_mesh.sharding.replicated(self.mesh)
    in_sh = self._input_shardings(args[2].shape[0])
    prefill = jax.jit(self._prefill_fn(cache_len), in_shardings=in_sh).trace(*args)
    state_shape = _shapes(prefill.out_info)
    state_sh = decode_mesh.state_shardings(state_shape, self.mesh)
    loop = jax.jit(self._loop_fn(),
                   in_shardings=(self.param_shardings, self.heads_shardings, state_sh, rep, rep),
                   out_shardings=state_sh, donate_argnums=(2,))
    return prefill, loop, state_shape

  def _input_shardings(self, batch: int) -> Tuple:
    """Prefill in_shardings: params, heads, tokens / lengths / active / row ids over data,
    the key data and the scalar knobs replicated."""
    rep = decode_mesh.sharding.replicated(self.mesh)
    rows = lambda ndim: decode_mesh.batch_sharding(self.mesh, ndim, batch)
    return (self.param_shardings, self.heads_shardings, rows(2), rows(1), rows(1), rows(1), rep,
            rep, rep)

  def lower(self, args, cache_len: int):
    """(prefill, loop) lowered for `args` (arrays or ShapeDtypeStructs: nothing is allocated);
    what `run` compiles, and what sizing reads (`.compile().memory_analysis()`)."""
    prefill, loop, state_shape = self._jitted(args, cache_len)
    params, heads_params, *_, accept_params, stop = args
    return (prefill.lower(),
            loop.lower(params, heads_params, state_shape, accept_params, stop))

  def _executables(self, args, cache_len: int):
    key = (_signature(args), cache_len)
    if key in self._compiled:
      return self._compiled[key], 0.0
    t0 = time.perf_counter()
    prefill, loop = self.lower(args, cache_len)
    self._compiled[key] = (prefill.compile(), loop.compile())
    return self._compiled[key], time.perf_counter() - t0

  def loop_collectives(self, args=None, cache_len: Optional[int] = None):
    """The collectives one loop step runs (`collectives.Collective` list), read from the
    compiled loop for `args` (e.g. `abstract_args(...)`; compiled now unless `run` already
    did), or without args from the loop `run` compiled last."""
    if args is None:
      if not self._compiled:
        raise ValueError("nothing compiled yet: pass args (abstract_args(...)) and cache_len")
      loop_exe = list(self._compiled.values())[-1][1]
    else:
      loop_exe = self._executables(args, cache_len)[0][1]
    return collectives.loop_collectives(loop_exe)

  def abstract_args(self, batch: int, prompt_len: int, heads_params_shape=None,
                    params_shape=None) -> Tuple:
    """`run`'s arguments as ShapeDtypeStructs (with their shardings on a mesh), for `lower`:
    sizing and HLO inspection without allocating weights. Shapes default to the config's."""
    from hydra_jax.model.llama import init_params
    if params_shape is None:
      params_shape = jax.eval_shape(lambda: init_params(self.cfg, jax.random.PRNGKey(0),
                                                        self.dtype))
    # What `run` adds outside jit, so that sizing sees it too.
    embedding = params_shape["embed_tokens"]["embedding"]
    if self.copy_tied_head and TIED_HEAD_COPY not in params_shape:
      params_shape = {**params_shape, TIED_HEAD_COPY: jax.ShapeDtypeStruct(
          embedding.shape[::-1], embedding.dtype)}
    if self.row_major_copies:
      params_shape = with_row_major_copies(self.cfg, params_shape)
    hcfg = self.models.heads_cfg if self.speculative else None
    if (heads_params_shape is not None and self.mesh is None and hcfg.lm_head == "base"
        and SHARED_LM_KERNEL not in heads_params_shape):
      heads_params_shape = {**heads_params_shape, SHARED_LM_KERNEL: jax.ShapeDtypeStruct(
          (self.cfg.hidden_size, hcfg.draft_vocab_size), embedding.dtype)}
    i32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    args = (params_shape, heads_params_shape, i32((batch, prompt_len)), i32((batch,)),
            jax.ShapeDtypeStruct((batch,), jnp.bool_), i32((batch,)),
            jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
            jax.eval_shape(lambda: AcceptParams.make(SamplingParams.make())),
            jax.eval_shape(lambda: StopCriteria.make(1)))
    if self.mesh is None:
      return args
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return tuple(a if a is None else jax.tree_util.tree_map(
        with_sharding, a, s if not isinstance(s, jax.sharding.Sharding)
        else jax.tree_util.tree_map(lambda _: s, a))
        for a, s in zip(args, self._input_shardings(batch)))

  # --- running -------------------------------------------------------------------------------

  def run(self, params, heads_params, tokens_BxP: np.ndarray, lengths_B: np.ndarray,
          active_B: np.ndarray, row_ids_B: np.ndarray, sampling: SamplingParams,
          stop: StopCriteria, seed: int, cache_len: int,
          posterior_threshold: float = DEFAULT_POSTERIOR_THRESHOLD,
          posterior_alpha: float = DEFAULT_POSTERIOR_ALPHA) -> BatchOutput:
    """Prefill + decode one padded batch (heads_params None without heads)."""
    self._check_params(params)
    heads_params = self.run_heads_params(params, heads_params)
    params = self.run_params(params)
    accept_params = AcceptParams.make(sampling, posterior_threshold, posterior_alpha)
    host = (np.asarray(tokens_BxP, np.int32), np.asarray(lengths_B, np.int32),
            np.asarray(active_B, bool), np.asarray(row_ids_B, np.int32),
            np.asarray(jax.random.key_data(jax.random.key(seed))))
    if self.mesh is None:
      args = (params, heads_params, *(jnp.asarray(x) for x in host), accept_params, stop)
    else:
      args = self._placed_args(params, heads_params, host, accept_params, stop)
      params, heads_params, accept_params, stop = args[0], args[1], args[-2], args[-1]
    (prefill_exe, loop_exe), compile_s = self._executables(args, cache_len)
    t0 = time.perf_counter()
    state = prefill_exe(*args)
    jax.block_until_ready(state.tokens)
    t1 = time.perf_counter()
    state = loop_exe(params, heads_params, state, accept_params, stop)
    fetch = [state.tokens, state.num_generated, state.steps_per_row, state.finish]
    if self.speculative:
      fetch.append(state.spec.accepted_BxS)
    out = decode_mesh.fetch(fetch)
    t2 = time.perf_counter()
    result = BatchOutput(*(np.asarray(x) for x in out[:4]), prefill_s=t1 - t0, run_s=t2 - t0,
                         compile_s=compile_s)
    if self.speculative:
      steps, accepted = result.steps, out[4]
      per_step = [accepted[r, :int(steps[r])].tolist() for r in range(len(steps))]
      result.extra = {
          "accept_length": np.asarray([float(np.mean(x)) if x else None for x in per_step],
                                      dtype=object),
          "accepted_per_step": np.asarray(per_step + [None], dtype=object)[:-1]}
    return result

  def run_params(self, params):
    """The base params the jitted prefill and loop take: with a tied LM head's [E, V] copy
    where `copy_tied_head` and the kernels' row-major copies where `row_major_copies` (made
    outside jit, once per set of weights), else as given."""
    params = with_tied_head_copy(self.cfg, params) if self.copy_tied_head else params
    return with_row_major_copies(self.cfg, params) if self.row_major_copies else params

  def run_heads_params(self, params, heads_params):
    """The heads params the jitted loop takes: without a mesh, with the heads' shared LM
    kernel ready (heads.with_shared_lm_kernel: made outside jit, once per set of weights)."""
    if not self.speculative or self.mesh is not None:
      return heads_params
    return with_shared_lm_kernel(self.models.heads_cfg, self.cfg, params, heads_params)

  def _placed_args(self, params, heads_params, host, accept_params, stop):
    """Everything `run` passes, laid out on the mesh (params kept when already placed)."""
    batch = host[0].shape[0]
    if batch % decode_mesh.data_size(self.mesh):
      raise ValueError(f"batch {batch} is not a multiple of the mesh's data axis "
                       f"({decode_mesh.describe(self.mesh)}): pad it with inactive rows "
                       f"(api.prepare_batch, mesh.padded_batch_size)")
    sh = self._input_shardings(batch)
    rep = sh[-1]
    placed = decode_mesh.place(list(host), list(sh[2:7]))
    scalars = decode_mesh.place((accept_params, stop),
                                jax.tree_util.tree_map(lambda _: rep, (accept_params, stop)))
    heads = None if heads_params is None else decode_mesh.place(heads_params, sh[1])
    return (decode_mesh.place(params, sh[0]), heads, *placed, *scalars)

  def _check_params(self, params):
    embed = params["embed_tokens"]["embedding"]
    if tuple(embed.shape) != (self.cfg.vocab_size, self.cfg.hidden_size):
      raise ValueError(f"params have an embedding of shape {tuple(embed.shape)}, but the model "
                       f"config implies {(self.cfg.vocab_size, self.cfg.hidden_size)}")


__all__ = ["ACCEPT_MODES", "DecodeEngine", "TRACE_COUNTS", "wants_tied_head_copy"]
