"""Speculative decoding: draft a tree, verify it in one base forward, accept, commit.

Everything runs in one `lax.while_loop` with static shapes (the tree is compiled to numpy
constants; lengths, counters and max_new_tokens are traced int32). The prompt forward, the
first token, the output buffer and the stop rules are the autoregressive loop's own
(`state`); one step, per row b:

  draft   `drafting`: tokens [B, N], node 0 the root (the last emitted token).
  verify  one base forward over the N tree tokens at positions len + depth, attending to the
          committed cache and their own ancestors (the same forward as prefill and AR steps).
  accept  `acceptance`: greedy, typical or exact (static); a accepted nodes + 1 bonus token.
  commit  the root and the accepted nodes' K/V move to contiguous slots len .. len + a;
          Hydra++ runs its prefix layer over the accepted positions' base hidden states (its
          own cache); g for the next step is read at the last accepted position.
  emit    `state.emit_tokens` with the a + 1 tokens: the same stop rules as AR, reserving the
          N cache slots the next verify writes.

Legend: B batch, N tree nodes (root included), M = depth + 1 path slots, S cache slots,
E model width, V vocab.
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp

from hydra_jax.decoding.acceptance import (AcceptParams, exact_accept, greedy_accept,
                                           typical_accept)
from hydra_jax.decoding import dynamic_tree as dyn
from hydra_jax.decoding.drafting import DraftInputs, Drafter, SpecModels
from hydra_jax.decoding.sampling import row_keys, sample, vocab_argmax
from hydra_jax.decoding.state import DecodeState, StopCriteria, emit_tokens, first_state, \
    keep_running, prefill
from hydra_jax.model.kv_cache import KVCache, init_cache
from hydra_jax.model.masks import cache_causal_mask, tree_mask


@flax.struct.dataclass
class SpecCarry:
  """What the speculative loop carries beyond DecodeState."""
  context_BxE: jax.Array  # g_t at each row's last committed position
  prefix_cache: Optional[KVCache]  # Hydra++: the prefix layer's own cache
  accepted_BxS: jax.Array  # int32: tokens emitted by each of a row's steps (a + 1)


def spec_prefill(models: SpecModels, cache_len: int, base_params, heads_params, tokens_BxP,
                 lengths_B, active_B, row_ids_B, rng, params: AcceptParams,
                 stop: StopCriteria) -> DecodeState:
  """Prompt forward (+ the Hydra++ prefix layer over it) and output index 0."""
  b, p = tokens_BxP.shape
  prefix_layer = models.heads_cfg.prefix_layer
  logits, hidden, cache = prefill(models.base, base_params, tokens_BxP, lengths_B, cache_len,
                                  all_hidden=prefix_layer)
  prefix_cache = None
  context = hidden
  if prefix_layer:
    prefix_cache = init_cache(models.base_cfg, b, cache_len, models.dtype, num_layers=1)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :], (b, p))
    mask = cache_causal_mask(prefix_cache.lengths, p, cache_len)
    g, prefix_cache = models.heads.apply({"params": heads_params}, hidden, positions, mask,
                                         prefix_cache, True, method="context")
    prefix_cache = prefix_cache.with_lengths(lengths_B)
    context = jnp.take_along_axis(g, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  carry = SpecCarry(context_BxE=context.astype(models.dtype), prefix_cache=prefix_cache,
                    accepted_BxS=jnp.zeros((b, cache_len), jnp.int32))
  return first_state(cache, logits, lengths_B, active_B, row_ids_B, rng, params, stop,
                     reserve=models.tree.num_nodes, spec=carry)


def verify(models: SpecModels, base_params, tokens_BxN, cache: KVCache):
  """The base forward over the tree's nodes in node order: (logits [B, N, V] f32, hidden
  [B, N, E], and the cache with node i's entry written at len + i, lengths unchanged)."""
  tree = models.tree
  lengths = cache.lengths
  positions = lengths[:, None] + jnp.asarray(tree.depths)[None, :]
  mask = tree_mask(lengths, tree.ancestors, cache.max_len)
  return models.base.apply({"params": base_params}, tokens_BxN, positions, cache, mask)


def accept_tree(tree, tokens_BxN, logits_BxNxV, s: DecodeState, params: AcceptParams,
                accept: str, draft: Optional[dyn.DynamicDraft] = None):
  """(a [B], path_nodes [B, M], last node [B], bonus token [B]) by the static accept rule, on
  the static tree's topology or, given `draft`, on a dynamic tree's per-row parents."""
  if draft is None:
    rules = (lambda pred: greedy_accept(tree, tokens_BxN, pred),
             lambda: typical_accept(tree, tokens_BxN, logits_BxNxV, params),
             lambda keys: exact_accept(tree, tokens_BxN, logits_BxNxV, keys, params))
  else:
    rules = (lambda pred: dyn.greedy_accept(draft, pred, tree.depth),
             lambda: dyn.typical_accept(draft, logits_BxNxV, params, tree.depth),
             lambda keys: dyn.exact_accept(draft, logits_BxNxV, keys, params, tree.depth))
  greedy, typical, exact = rules
  if accept == "greedy":  # the argmax per node: [B, N] ints, not [B, N, V] logits
    pred = vocab_argmax(logits_BxNxV)
    a, path_nodes, last = greedy(pred)
    return a, path_nodes, last, jnp.take_along_axis(pred, last[:, None], axis=1)[:, 0]
  if accept == "typical":
    a, path_nodes, last = typical()
    bonus = sample(jnp.take_along_axis(logits_BxNxV, last[:, None, None], axis=1)[:, 0],
                   lambda: row_keys(s.rng, s.row_ids, s.num_generated + a), params.temperature,
                   params.top_k, params.top_p)
    return a, path_nodes, last, bonus
  # "exact": depth d decides output index num_generated + d
  return exact(jnp.stack([row_keys(s.rng, s.row_ids, s.num_generated + d)
                          for d in range(tree.depth + 1)]))


def verify_dynamic(models: SpecModels, base_params, draft: dyn.DynamicDraft, cache: KVCache):
  """`verify` for a dynamic tree: per-row positions (len + depth) and ancestor masks."""
  lengths = cache.lengths
  positions = lengths[:, None] + draft.depths_BxN
  mask = tree_mask(lengths, dyn.ancestors(draft, models.tree.depth), cache.max_len)
  return models.base.apply({"params": base_params}, draft.tokens_BxN, positions, cache, mask)


def commit_kv(cache: KVCache, lengths, path_nodes, commit) -> KVCache:
  """The root + accepted nodes' K/V to slots len .. len + a, lengths advanced by `commit`.
  Node i was verified into slot len + i, and the path's node at depth d has index >= d."""
  return cache.gather(lengths[:, None] + path_nodes, commit)


def next_context(models: SpecModels, heads_params, carry: SpecCarry, hidden_BxNxE, path_nodes,
                 a, last, lengths, commit):
  """g at the last accepted position, and the prefix layer's cache fed the accepted ones."""
  if not models.heads_cfg.prefix_layer:
    return jnp.take_along_axis(hidden_BxNxE, last[:, None, None], axis=1)[:, 0], None
  m = path_nodes.shape[1]
  h_acc = jnp.take_along_axis(hidden_BxNxE, path_nodes[:, :, None], axis=1)  # [B, M, E]
  pos_acc = lengths[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :]
  pmask = cache_causal_mask(carry.prefix_cache.lengths, m, carry.prefix_cache.max_len)
  g_acc, prefix_cache = models.heads.apply({"params": heads_params}, h_acc, pos_acc, pmask,
                                           carry.prefix_cache, True, method="context")
  prefix_cache = prefix_cache.with_lengths(prefix_cache.lengths + commit)
  return jnp.take_along_axis(g_acc, a[:, None, None], axis=1)[:, 0], prefix_cache


def emit_accepted(s: DecodeState, tokens_BxN, path_nodes, a, bonus, cache, context,
                  prefix_cache, stop: StopCriteria, reserve: int) -> DecodeState:
  """Bookkeeping: the step's a + 1 tokens through `emit_tokens`, counters, per-step stats."""
  m = path_nodes.shape[1]
  live = ~s.done
  carry: SpecCarry = s.spec
  # e[j] = tokens[path[j + 1]] for j < a (the accepted drafts), e[a] = bonus.
  j = jnp.arange(m, dtype=jnp.int32)[None, :]
  next_nodes = jnp.concatenate([path_nodes[:, 1:], path_nodes[:, :1]], axis=1)
  emit = jnp.where(j < a[:, None], jnp.take_along_axis(tokens_BxN, next_nodes, axis=1),
                   bonus[:, None])
  b = emit.shape[0]
  step_slot = jnp.where(live, s.steps_per_row, carry.accepted_BxS.shape[1])
  accepted = carry.accepted_BxS.at[jnp.arange(b), step_slot].set(a + 1, mode="drop")
  carry = SpecCarry(context_BxE=jnp.where(live[:, None], context.astype(carry.context_BxE.dtype),
                                          carry.context_BxE),
                    prefix_cache=prefix_cache, accepted_BxS=accepted)
  s = s.replace(step=s.step + 1, cache=cache, spec=carry,
                steps_per_row=s.steps_per_row + live.astype(jnp.int32))
  return emit_tokens(s, emit, a + 1, stop, reserve)


def spec_step(models: SpecModels, base_params, heads_params, drafter: Drafter, s: DecodeState,
              params: AcceptParams, stop: StopCriteria, accept: str = "greedy") -> DecodeState:
  """One draft-verify-accept-commit-emit cycle (`accept` is static)."""
  lengths = s.cache.lengths
  draft = drafter(DraftInputs(root_B=s.last_token, context_BxE=s.spec.context_BxE,
                              num_out_B=s.num_generated, step=s.step))
  if models.tree.dynamic:
    draft = draft.replace(tokens_BxN=draft.tokens_BxN.at[:, 0].set(s.last_token))
    tokens = draft.tokens_BxN
    logits, hidden, cache = verify_dynamic(models, base_params, draft, s.cache)
    a, path_nodes, last, bonus = accept_tree(models.tree, tokens, logits, s, params, accept,
                                             draft)
  else:
    tokens = draft.at[:, 0].set(s.last_token)  # the root is never a guess
    logits, hidden, cache = verify(models, base_params, tokens, s.cache)
    a, path_nodes, last, bonus = accept_tree(models.tree, tokens, logits, s, params, accept)
  # Commit the root + a accepted nodes (M slots move; only a + 1 count). A finished row still
  # runs (static shapes) but commits nothing: its writes land beyond its length, unread.
  commit = jnp.where(~s.done, a + 1, 0)
  cache = commit_kv(cache, lengths, path_nodes, commit)
  context, prefix_cache = next_context(models, heads_params, s.spec, hidden, path_nodes, a, last,
                                       lengths, commit)
  return emit_accepted(s, tokens, path_nodes, a, bonus, cache, context, prefix_cache, stop,
                       models.tree.num_nodes)


def spec_loop(models: SpecModels, base_params, heads_params, drafter: Drafter, state: DecodeState,
              params: AcceptParams, stop: StopCriteria, accept: str = "greedy") -> DecodeState:
  n = models.tree.num_nodes
  return jax.lax.while_loop(
      lambda s: keep_running(s, stop, reserve=n),
      lambda s: spec_step(models, base_params, heads_params, drafter, s, params, stop, accept),
      state)


__all__ = ["SpecCarry", "accept_tree", "commit_kv", "emit_accepted", "next_context", "spec_loop",
           "spec_prefill", "spec_step", "verify", "verify_dynamic"]
