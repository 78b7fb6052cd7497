"""The jitted speculate-verify loop: draft a tree, verify it in one base forward, accept, commit.

Everything runs inside one `lax.while_loop` with static shapes (the tree is compiled to numpy
constants; lengths, counters and max_new_tokens are traced int32). One step, per row b:

  draft   tokens_BxN: node 0 is the root (the base model's own next token, emitted last step);
          Medusa runs every head once on g; Hydra/Hydra++ go depth by depth, each depth's heads
          reading g and the embeddings of the path so far (static gather plans from the tree).
  verify  one base forward over the N tree tokens at positions len + depth, attending to the
          committed cache and their own ancestors (the same forward as prefill).
  accept  greedy: per leaf path, the longest prefix whose tokens equal the base argmax at their
          parent; the longest path wins. a accepted nodes + 1 bonus token are emitted.
          typical / exact (temperature > 0): see spec_sampling; `accept` is a static argument.
  commit  the root and the accepted nodes' KV move to contiguous slots len .. len + a; Hydra++
          feeds the accepted positions' base hidden states through its prefix layer's own cache.

The drafter is pluggable (`Drafter`), so tests can plug in a perfect one.

Legend: B batch, N tree nodes (root included), D_ tree depth, M = D_ + 1 path slots, P leaf
paths, R rows expanded at one depth, S cache slots, E model width, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding.sampling import SamplingParams, sample
from hydra_jax.decoding.spec_sampling import (DEFAULT_POSTERIOR_ALPHA,
                                              DEFAULT_POSTERIOR_THRESHOLD, AcceptParams,
                                              check_accept_mode, exact_accept, position_keys,
                                              typical_accept)
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import DraftHeads, HeadsConfig
from hydra_jax.model.kv_cache import KVCache, init_cache
from hydra_jax.model.llama import LlamaModel
from hydra_jax.model.masks import cache_causal_mask, tree_mask


@flax.struct.dataclass
class DraftInputs:
  """What a drafter may read at the start of a step."""
  root_B: jax.Array  # the tree root: base model's next token (already emitted)
  context_BxE: jax.Array  # g_t: base (or prefix-layer) hidden state at the last committed token
  num_out_B: jax.Array  # tokens emitted so far (the root is the last of them)
  step: jax.Array  # loop iteration


# A drafter maps DraftInputs to the tree's tokens [B, N] (node 0 must be the root).
Drafter = Callable[[DraftInputs], jax.Array]


@flax.struct.dataclass
class SpecState:
  step: jax.Array  # int32 scalar
  done_B: jax.Array  # bool
  finish_B: jax.Array  # int32: FINISH_* code once done
  out_BxC: jax.Array  # int32 output buffer (new tokens)
  num_out_B: jax.Array  # int32
  steps_B: jax.Array  # int32 verify forwards while the row was live
  accepted_BxC: jax.Array  # int32 tokens emitted by each step (a + 1), per row
  root_B: jax.Array
  context_BxE: jax.Array
  cache: KVCache
  prefix_cache: Optional[KVCache]
  # Sampling: output index i of row b draws with fold_in(fold_in(rng, row_ids_B[b]), i), the
  # autoregressive engine's key schedule (unused by greedy acceptance).
  rng: jax.Array
  row_ids_B: jax.Array  # int32


FINISH_LIVE, FINISH_STOP, FINISH_LENGTH, FINISH_CACHE = 0, 1, 2, 3
FINISH_NAMES = {FINISH_LIVE: "live", FINISH_STOP: "stop", FINISH_LENGTH: "length",
                FINISH_CACHE: "cache_full"}


@dataclasses.dataclass(frozen=True)
class SpecModels:
  """The static half of the engine: configs and the compiled tree (a jit static argument)."""
  base_cfg: ModelConfig
  heads_cfg: HeadsConfig
  tree: "object"  # hydra_jax.decoding.tree.CompiledTree
  dtype: object = jnp.float32

  @property
  def base(self) -> LlamaModel:
    return LlamaModel(self.base_cfg, dtype=self.dtype)

  @property
  def heads(self) -> DraftHeads:
    return DraftHeads(self.heads_cfg, self.base_cfg, dtype=self.dtype)


# --- drafting ----------------------------------------------------------------------------


def _embed(base_params, tokens):
  return jnp.take(base_params["embed_tokens"]["embedding"], tokens, axis=0)


def heads_drafter(models: SpecModels, base_params, heads_params) -> Drafter:
  """The real drafter: Medusa's cartesian top-k, or Hydra's depth-by-depth expansion."""
  tree, hcfg = models.tree, models.heads_cfg
  heads = models.heads

  def head_logits(k, g, path_embeds):
    return heads.apply({"params": heads_params}, k, g, path_embeds, True, method="head_logits")

  def medusa(inp: DraftInputs) -> jax.Array:
    b = inp.root_B.shape[0]
    tokens = jnp.zeros((b, tree.num_nodes), jnp.int32).at[:, 0].set(inp.root_B)
    for d in range(1, tree.depth + 1):
      logits = head_logits(d - 1, inp.context_BxE, None)  # [B, V]
      _, top = jax.lax.top_k(logits, int(tree.topk_per_depth[d - 1]))
      nodes = np.asarray(tree.depth_nodes[d - 1])
      tokens = tokens.at[:, nodes].set(top[:, np.asarray(tree.ranks)[nodes]])
    return tokens

  def sequential(inp: DraftInputs) -> jax.Array:
    b = inp.root_B.shape[0]
    tokens = jnp.zeros((b, tree.num_nodes), jnp.int32).at[:, 0].set(inp.root_B)
    for d in range(1, tree.depth + 1):
      rows = np.asarray(tree.expand_rows[d - 1])  # nodes at depth d-1 with children
      path_nodes = np.asarray(tree.node_path)[rows, :d]  # [R, d] root-first
      path_embeds = _embed(base_params, tokens[:, path_nodes]).astype(models.dtype)  # [B,R,d,E]
      g = jnp.broadcast_to(inp.context_BxE[:, None, :],
                           (b, len(rows), inp.context_BxE.shape[-1]))
      logits = head_logits(d - 1, g, path_embeds)  # [B, R, V]
      _, top = jax.lax.top_k(logits, int(tree.topk_per_depth[d - 1]))  # [B, R, k]
      nodes = np.asarray(tree.depth_nodes[d - 1])
      child = top[:, np.asarray(tree.child_row[d - 1]), np.asarray(tree.child_rank[d - 1])]
      tokens = tokens.at[:, nodes].set(child)
    return tokens

  if tree.depth > hcfg.num_heads:
    raise ValueError(f"tree depth {tree.depth} needs {tree.depth} draft heads but the heads "
                     f"have {hcfg.num_heads}")
  return sequential if hcfg.sequential else medusa


# --- acceptance --------------------------------------------------------------------------


def greedy_accept(tree, tokens_BxN: jax.Array, pred_BxN: jax.Array):
  """Longest agreeing prefix over the leaf paths.

  pred[b, i] is the base argmax after node i. Returns (accepted count a [B] excluding the root,
  the chosen path's node indices [B, M] (root first, padding clipped to 0), last node [B]).
  """
  retrieve = np.asarray(tree.retrieve)  # [P, M], -1 padded
  valid = retrieve >= 0
  idx = np.where(valid, retrieve, 0)
  cand = tokens_BxN[:, idx]  # [B, P, M]
  parent_pred = pred_BxN[:, idx[:, :-1]]  # [B, P, M-1]
  ok = (cand[:, :, 1:] == parent_pred) & valid[None, :, 1:]
  path_accept = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1)  # [B, P]
  best = jnp.argmax(path_accept, axis=-1)  # first longest
  a = jnp.take_along_axis(path_accept, best[:, None], axis=1)[:, 0]
  path_nodes = jnp.asarray(idx)[best]  # [B, M]
  last = jnp.take_along_axis(path_nodes, a[:, None], axis=1)[:, 0]
  return a.astype(jnp.int32), path_nodes.astype(jnp.int32), last.astype(jnp.int32)


# --- prefill and step --------------------------------------------------------------------


def _is_stop(tokens, stop_ids):
  if stop_ids.shape[0] == 0:
    return jnp.zeros(tokens.shape, bool)
  return jnp.any(tokens[..., None] == stop_ids.reshape((1,) * tokens.ndim + (-1,)), axis=-1)


def prefill(models: SpecModels, base_params, heads_params, prompt_BxP, prompt_lens_B,
            cache_len: int, max_new_tokens, stop_ids, accept: str = "greedy",
            params: Optional[AcceptParams] = None, rng=None, row_ids_B=None) -> SpecState:
  """Prompt forward, first token, Hydra++ prefix cache; returns the loop's initial state.

  With accept "typical" or "exact" the first token is sampled (output index 0's key) with
  `params`' temperature / top-k / top-p; rng is the seed key, row_ids_B (default 0..B-1) the
  rows' ids in the caller's list, so a row's draws do not depend on its batch.
  """
  b, p = prompt_BxP.shape
  check_accept_mode(accept)
  if accept != "greedy" and (rng is None or params is None):
    raise ValueError(f"accept={accept!r} samples: pass params=AcceptParams.make(sampling) and "
                     f"rng=jax.random.key(seed)")
  rng = jax.random.key(0) if rng is None else rng
  row_ids_B = (jnp.arange(b, dtype=jnp.int32) if row_ids_B is None
               else jnp.asarray(row_ids_B, jnp.int32))
  cfg = models.base_cfg
  cache = init_cache(cfg, b, cache_len, models.dtype)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :], (b, p))
  mask = cache_causal_mask(cache.lengths, p, cache_len)
  logits, hidden, cache = models.base.apply({"params": base_params}, prompt_BxP, positions,
                                            cache, mask)
  cache = cache.with_lengths(prompt_lens_B)
  last = prompt_lens_B - 1
  h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  last_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  if accept == "greedy":
    root = jnp.argmax(last_logits, -1)
  else:
    keys = position_keys(rng, row_ids_B, jnp.zeros((b,), jnp.int32))
    root = sample(last_logits, keys, params.temperature, params.top_k, params.top_p)
  root = root.astype(jnp.int32)

  prefix_cache = None
  context = h_last
  if models.heads_cfg.prefix_layer:
    prefix_cache = init_cache(cfg, b, cache_len, models.dtype, num_layers=1)
    g, prefix_cache = models.heads.apply({"params": heads_params}, hidden, positions, mask,
                                         prefix_cache, True, method="context")
    prefix_cache = prefix_cache.with_lengths(prompt_lens_B)
    context = jnp.take_along_axis(g, last[:, None, None], axis=1)[:, 0]

  cap = cache_len
  out = jnp.zeros((b, cap), jnp.int32).at[:, 0].set(root)
  stop = _is_stop(root, stop_ids)
  n = models.tree.num_nodes
  finish = jnp.where(stop, FINISH_STOP,
                     jnp.where(max_new_tokens <= 1, FINISH_LENGTH,
                               jnp.where(prompt_lens_B + n > cache_len, FINISH_CACHE,
                                         FINISH_LIVE))).astype(jnp.int32)
  return SpecState(step=jnp.zeros((), jnp.int32), done_B=finish != FINISH_LIVE, finish_B=finish,
                   out_BxC=out, num_out_B=jnp.ones((b,), jnp.int32),
                   steps_B=jnp.zeros((b,), jnp.int32),
                   accepted_BxC=jnp.zeros((b, cap), jnp.int32), root_B=root,
                   context_BxE=context.astype(models.dtype), cache=cache,
                   prefix_cache=prefix_cache, rng=rng, row_ids_B=row_ids_B)


def spec_step(models: SpecModels, base_params, heads_params, drafter: Drafter,
              state: SpecState, max_new_tokens, stop_ids, accept: str = "greedy",
              params: Optional[AcceptParams] = None) -> SpecState:
  """One speculate-verify-accept-commit cycle for every live row (`accept` is static)."""
  check_accept_mode(accept)
  tree = models.tree
  cache = state.cache
  b, s = cache.batch_size, cache.max_len
  n, m = tree.num_nodes, tree.depth + 1
  lengths = cache.lengths

  tokens = drafter(DraftInputs(root_B=state.root_B, context_BxE=state.context_BxE,
                               num_out_B=state.num_out_B, step=state.step))
  tokens = tokens.at[:, 0].set(state.root_B)  # the root is never a guess

  positions = lengths[:, None] + jnp.asarray(tree.depths, jnp.int32)[None, :]
  mask = tree_mask(lengths, tree.ancestors, s)
  logits, hidden, cache = models.base.apply({"params": base_params}, tokens, positions, cache,
                                            mask)
  if accept == "greedy":
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, N]
    a, path_nodes, last = greedy_accept(tree, tokens, pred)
    bonus = jnp.take_along_axis(pred, last[:, None], axis=1)[:, 0]
  elif accept == "typical":
    a, path_nodes, last = typical_accept(tree, tokens, logits, params)
    keys = position_keys(state.rng, state.row_ids_B, state.num_out_B + a)
    bonus = sample(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], keys,
                   params.temperature, params.top_k, params.top_p)
  else:  # "exact"
    keys = jnp.stack([position_keys(state.rng, state.row_ids_B, state.num_out_B + d)
                      for d in range(m)])  # [M, B]: depth d decides output index num_out + d
    a, path_nodes, last, bonus = exact_accept(tree, tokens, logits, keys, params)

  live = ~state.done_B
  # Commit the root + a accepted nodes (M slots move; only a + 1 count). A finished row still
  # runs (static shapes) but commits nothing: its writes land beyond its length, unread.
  commit = jnp.where(live, a + 1, 0)
  cache = cache.gather(lengths[:, None] + path_nodes, commit)
  if models.heads_cfg.prefix_layer:
    h_acc = jnp.take_along_axis(hidden, path_nodes[:, :, None], axis=1)  # [B, M, E]
    pos_acc = lengths[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :]
    pmask = cache_causal_mask(state.prefix_cache.lengths, m, s)
    g_acc, prefix_cache = models.heads.apply({"params": heads_params}, h_acc, pos_acc, pmask,
                                             state.prefix_cache, True, method="context")
    prefix_cache = prefix_cache.with_lengths(prefix_cache.lengths + commit)
    context = jnp.take_along_axis(g_acc, a[:, None, None], axis=1)[:, 0]
  else:
    prefix_cache = None
    context = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]

  # Emit the accepted tokens then the bonus: e[j] = tokens[path[j+1]] for j < a, e[a] = bonus.
  j = jnp.arange(m, dtype=jnp.int32)[None, :]
  next_nodes = jnp.concatenate([path_nodes[:, 1:], path_nodes[:, :1]], axis=1)
  emit = jnp.where(j < a[:, None], jnp.take_along_axis(tokens, next_nodes, axis=1),
                   bonus[:, None])
  in_step = j <= a[:, None]
  stop_hit = _is_stop(emit, stop_ids) & in_step
  any_stop = jnp.any(stop_hit, axis=-1)
  first_stop = jnp.argmax(stop_hit, axis=-1)
  count = jnp.where(any_stop, first_stop + 1, a + 1)
  room = jnp.maximum(max_new_tokens - state.num_out_B, 0)
  count = jnp.where(live, jnp.minimum(count, room), 0)
  write_at = jnp.where(j < count[:, None], state.num_out_B[:, None] + j, s + 1)
  rows = jnp.arange(b)[:, None]
  out = state.out_BxC.at[rows, write_at].set(emit, mode="drop")
  num_out = state.num_out_B + count
  step_slot = jnp.where(live, state.steps_B, s + 1)
  accepted = state.accepted_BxC.at[jnp.arange(b), step_slot].set(a + 1, mode="drop")

  stopped = any_stop & (first_stop < count)
  finish = jnp.where(stopped, FINISH_STOP,
                     jnp.where(num_out >= max_new_tokens, FINISH_LENGTH,
                               jnp.where(cache.lengths + n > s, FINISH_CACHE, FINISH_LIVE)))
  finish = jnp.where(live, finish, state.finish_B).astype(jnp.int32)
  keep = lambda new, old: jnp.where(live.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  return SpecState(step=state.step + 1, done_B=finish != FINISH_LIVE, finish_B=finish,
                   out_BxC=out, num_out_B=num_out, steps_B=state.steps_B + live.astype(jnp.int32),
                   accepted_BxC=accepted, root_B=keep(bonus, state.root_B),
                   context_BxE=keep(context.astype(state.context_BxE.dtype), state.context_BxE),
                   cache=cache, prefix_cache=prefix_cache, rng=state.rng,
                   row_ids_B=state.row_ids_B)


def run_loop(models: SpecModels, base_params, heads_params, drafter: Drafter, state: SpecState,
             max_new_tokens, stop_ids, accept: str = "greedy",
             params: Optional[AcceptParams] = None) -> SpecState:
  """`lax.while_loop` over spec_step until every row is done."""
  def cond(st):
    return jnp.any(~st.done_B)

  def body(st):
    return spec_step(models, base_params, heads_params, drafter, st, max_new_tokens, stop_ids,
                     accept, params)

  return jax.lax.while_loop(cond, body, state)


def _speculative_generate(models: SpecModels, cache_len: int, drafter_factory, base_params,
                          heads_params, prompt_BxP, prompt_lens_B, max_new_tokens, stop_ids,
                          sampling: Optional[SamplingParams] = None, rng=None, row_ids_B=None,
                          posterior_threshold=DEFAULT_POSTERIOR_THRESHOLD,
                          posterior_alpha=DEFAULT_POSTERIOR_ALPHA, accept: str = "greedy"):
  check_accept_mode(accept)
  params = None
  if accept != "greedy":
    if sampling is None:
      raise ValueError(f"accept={accept!r} samples: pass sampling=SamplingParams.make(temperature, "
                       f"top_k, top_p) and rng=jax.random.key(seed)")
    params = AcceptParams.make(sampling, posterior_threshold, posterior_alpha)
  state = prefill(models, base_params, heads_params, prompt_BxP, prompt_lens_B, cache_len,
                  max_new_tokens, stop_ids, accept, params, rng, row_ids_B)
  drafter = drafter_factory(models, base_params, heads_params)
  return run_loop(models, base_params, heads_params, drafter, state, max_new_tokens, stop_ids,
                  accept, params)


# Static: the models (configs + tree), cache length, drafter factory and accept mode.
# Everything else is traced, so another max_new_tokens, stop list of the same size, prompt of
# the same padded length, seed or sampling knob (temperature, top-k, top-p, posterior
# threshold / alpha) reuses the compiled loop. `sampling` is ignored by greedy acceptance.
speculative_generate = jax.jit(_speculative_generate, static_argnums=(0, 1, 2),
                               static_argnames=("accept",))


__all__ = ["DraftInputs", "Drafter", "SpecModels", "SpecState", "FINISH_NAMES", "greedy_accept",
           "heads_drafter", "prefill", "spec_step", "run_loop", "speculative_generate"]
