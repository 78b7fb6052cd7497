"""Dynamic draft trees: the topology chosen inside the loop, every step, from the draft's scores.

A static tree spends its nodes on the same branches every step, whether or not the heads are
sure of them. A dynamic tree (EAGLE-2's idea, for Medusa / Hydra heads) keeps a fixed node
budget N (root included) and depth D, and each step keeps the N - 1 drafted tokens of highest
cumulative draft log-probability (the sum of log q over the path), so nodes go where the heads
are confident. Shapes stay static; only the values of the topology change:

  depth 1   head 0 ranks the vocabulary after the root: its top K are candidates.
  depth d   the K best candidates of depth d - 1 (the beam) are expanded: head d - 1 reads
            each one's path (Hydra: g and the path's embeddings; Medusa: g alone, so every
            beam node gets the same K tokens) and offers its top K children: K * K candidates.
  choose    of the C = K + (D - 1) K^2 candidates, the N - 1 of highest cumulative log q, in
            candidate order (depth-major, parents before children). A child never scores
            above its parent (log q <= 0) and top_k keeps the lower index on ties, so every
            chosen node's parent is chosen: the choice is a tree, parents before children.

The verify forward then takes the nodes with per-row positions (len + depth) and a per-row
ancestor mask built from the chosen parents; acceptance walks the per-row parents.

Acceptance: greedy (identical to AR, as with static trees), typical, and exact. Exact stays
lossless on a dynamic tree: `exact_accept` samples each token from the BASE distribution and
only descends when the sample is a child, so the emitted law is the base's whatever tokens the
tree holds; the topology depends on the draft alone (not on the sampling keys), which changes
how far a step gets, never what it emits (chi-square tested like the static trees).

Legend: B batch, N nodes (root included), D depth, K beam width, C candidates, R beam rows,
E model width, V' draft vocab, M = D + 1 path slots.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding.acceptance import AcceptParams, log_probs, typical_threshold
from hydra_jax.decoding.drafting import DraftInputs, SpecModels, draft_head_fns
from hydra_jax.decoding.sampling import sample

DYNAMIC_PREFIX = "dynamic"
DEFAULT_BEAM = 4  # the widest default K: enough for 16 nodes; C grows as K^2 per depth
MAX_DEFAULT_DEPTH = 4  # the paper's heads count


class DynamicTreeError(ValueError):
  pass


def default_beam(num_nodes: int) -> int:
  """K for a budget of N nodes: about half the drafts, 2 to 4. Measured on the embedded
  model's heads: at N = 5, K = 2 accepts as much as K = 4 with a third of Hydra's head rows."""
  return min(num_nodes - 1, max(2, min(DEFAULT_BEAM, (num_nodes - 1) // 2)))


@dataclasses.dataclass(frozen=True)
class DynamicTree:
  """A node budget, depth and beam width: the static half of a dynamic tree (hashable)."""
  num_nodes: int  # N, root included: the tokens one verify forward takes
  depth: int  # D
  beam: int  # K
  name: str = ""
  # T: the draft scores are log softmax(logits / T). Heads trained on hard labels (Medusa,
  # Hydra) are roughly calibrated for greedy acceptance at T = 1; teacher-trained ones
  # (Hydra++: soft targets, the base's own spread) rank well but under-state how often their
  # top token is the base's argmax, which T < 1 corrects. tree_fit measures it.
  temperature: float = 1.0

  dynamic = True  # a class attribute (CompiledTree's is False): the loop branches on it

  @property
  def num_candidates(self) -> int:
    return self.beam + (self.depth - 1) * self.beam * self.beam

  @property
  def candidate_depths(self) -> np.ndarray:
    return np.asarray([1] * self.beam + [d for d in range(2, self.depth + 1)
                                         for _ in range(self.beam * self.beam)], np.int32)

  def describe(self) -> str:
    return (f"tree {self.name}: dynamic, {self.num_nodes} nodes (root + {self.num_nodes - 1}) "
            f"chosen per step from {self.num_candidates} candidates, depth {self.depth}, beam "
            f"{self.beam}, score temperature {self.temperature:g}")


def is_dynamic_spec(spec) -> bool:
  return isinstance(spec, str) and (spec == DYNAMIC_PREFIX or spec.startswith(DYNAMIC_PREFIX + ":"))


def parse_dynamic(spec: str, num_heads: Optional[int] = None,
                  max_topk: Optional[int] = None) -> DynamicTree:
  """`dynamic:N`, `dynamic:N:D`, `dynamic:N:D:K` or `dynamic:N:D:K:T` (nodes with the root,
  depth, beam width, score temperature). D defaults to the heads' count (at most 4) and
  N - 1; K to min(4, N - 1); T to 1."""
  m = re.fullmatch(rf"{DYNAMIC_PREFIX}:(\d+)(?::(\d+))?(?::(\d+))?(?::(\d*\.?\d+))?", spec)
  if not m or (m.group(4) and not m.group(3)):
    raise DynamicTreeError(f"dynamic tree {spec!r}: write dynamic:N (nodes, root included), "
                           "dynamic:N:D (and depth), dynamic:N:D:K (and beam width) or "
                           "dynamic:N:D:K:T (and score temperature), e.g. dynamic:16")
  n = int(m.group(1))
  if n < 2:
    raise DynamicTreeError(f"dynamic tree {spec!r}: N = {n} nodes leaves no draft; use N >= 2")
  heads = num_heads if num_heads is not None else MAX_DEFAULT_DEPTH
  d = int(m.group(2)) if m.group(2) else min(heads, MAX_DEFAULT_DEPTH, n - 1)
  k = int(m.group(3)) if m.group(3) else default_beam(n)
  if d < 1 or k < 1:
    raise DynamicTreeError(f"dynamic tree {spec!r}: depth and beam must be >= 1")
  if num_heads is not None and d > num_heads:
    raise DynamicTreeError(f"dynamic tree {spec!r}: depth {d} needs {d} draft heads but the "
                           f"heads have {num_heads}; use depth <= {num_heads}")
  if max_topk is not None and max_topk > 0 and k > max_topk:
    raise DynamicTreeError(f"dynamic tree {spec!r}: beam {k} exceeds the heads' {max_topk} "
                           "ranked tokens")
  temp = float(m.group(4)) if m.group(4) else 1.0
  if not temp > 0:
    raise DynamicTreeError(f"dynamic tree {spec!r}: the score temperature must be > 0")
  name = f"{DYNAMIC_PREFIX}:{n}:{d}:{k}" + (f":{temp:g}" if temp != 1.0 else "")
  tree = DynamicTree(num_nodes=n, depth=d, beam=k, name=name, temperature=temp)
  if n - 1 > tree.num_candidates:
    raise DynamicTreeError(f"dynamic tree {spec!r}: {n - 1} nodes but depth {d} x beam {k} "
                           f"offers only {tree.num_candidates} candidates; raise D or K")
  return tree


@flax.struct.dataclass
class DynamicDraft:
  """One step's tree: tokens and topology per row, node 0 the root, parents before children."""
  tokens_BxN: jax.Array  # int32
  parents_BxN: jax.Array  # int32, the root's parent is itself (0): walks stop there
  depths_BxN: jax.Array  # int32, root 0


def dynamic_drafter(models: SpecModels, base_params, heads_params):
  """The drafter for a DynamicTree: beam expansion by cumulative log q, then the N - 1 best."""
  tree: DynamicTree = models.tree
  k, depth, n = tree.beam, tree.depth, tree.num_nodes
  embedding, to_tokens, head_logits = draft_head_fns(models, base_params, heads_params)
  cand_depths = jnp.asarray(tree.candidate_depths)

  def log_q(logits):
    return jax.nn.log_softmax(logits.astype(jnp.float32) / tree.temperature, axis=-1)

  def draft(inp: DraftInputs) -> DynamicDraft:
    b, e = inp.context_BxE.shape
    rows = jnp.arange(b)[:, None]
    root_embed = jnp.take(embedding, inp.root_B, axis=0).astype(models.dtype)  # [B, E]
    if models.heads_cfg.sequential:
      logits = head_logits(0, inp.context_BxE[:, None, :], root_embed[:, None, None, :])[:, 0]
    else:
      logits = head_logits(0, inp.context_BxE, None)
    score, idx = jax.lax.top_k(log_q(logits), k)  # [B, K]
    toks = to_tokens(idx)
    cand_tok, cand_score, cand_parent = [toks], [score], [jnp.full((b, k), -1, jnp.int32)]
    beam_cand = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))  # candidate ids
    beam_score = score
    beam_path = jnp.stack([jnp.broadcast_to(root_embed[:, None], (b, k, e)),
                           jnp.take(embedding, toks, axis=0).astype(models.dtype)], axis=2)
    offset = k
    for d in range(2, depth + 1):
      if models.heads_cfg.sequential:
        g = jnp.broadcast_to(inp.context_BxE[:, None, :], (b, k, e))
        child_score, child_idx = jax.lax.top_k(log_q(head_logits(d - 1, g, beam_path)), k)
      else:  # Medusa: head d - 1 reads g only, so every beam node gets the same children
        s, i = jax.lax.top_k(log_q(head_logits(d - 1, inp.context_BxE, None)), k)
        child_score = jnp.broadcast_to(s[:, None], (b, k, k))
        child_idx = jnp.broadcast_to(i[:, None], (b, k, k))
      cum = (beam_score[:, :, None] + child_score).reshape(b, k * k)  # [B, K*K]
      toks = to_tokens(child_idx).reshape(b, k * k)
      parent = jnp.repeat(beam_cand, k, axis=1)  # [B, K*K]
      cand_tok.append(toks)
      cand_score.append(cum)
      cand_parent.append(parent)
      if d < depth:
        beam_score, j = jax.lax.top_k(cum, k)  # [B, K] indices into this depth's K*K
        beam_cand = offset + j.astype(jnp.int32)
        beam_path = jnp.concatenate(
            [beam_path[rows, j // k],
             jnp.take(embedding, toks[rows, j], axis=0).astype(models.dtype)[:, :, None]],
            axis=2)
      offset += k * k
    tok_c = jnp.concatenate(cand_tok, axis=1)  # [B, C]
    score_c = jnp.concatenate(cand_score, axis=1)
    parent_c = jnp.concatenate(cand_parent, axis=1)
    _, chosen = jax.lax.top_k(score_c, n - 1)
    chosen = jnp.sort(chosen, axis=1).astype(jnp.int32)  # candidate order: parents first
    node_of = jnp.zeros_like(parent_c).at[rows, chosen].set(
        jnp.arange(1, n, dtype=jnp.int32)[None, :])  # candidate -> node (chosen ones)
    parent_cand = jnp.take_along_axis(parent_c, chosen, axis=1)
    parent_node = jnp.where(parent_cand < 0, 0, jnp.take_along_axis(
        node_of, jnp.maximum(parent_cand, 0), axis=1))
    zeros = jnp.zeros((b, 1), jnp.int32)
    return DynamicDraft(
        tokens_BxN=jnp.concatenate([inp.root_B[:, None], jnp.take_along_axis(tok_c, chosen, 1)],
                                   axis=1),
        parents_BxN=jnp.concatenate([zeros, parent_node], axis=1),
        depths_BxN=jnp.concatenate([zeros, cand_depths[chosen]], axis=1))

  return draft


def ancestors(draft: DynamicDraft, depth: int) -> jax.Array:
  """bool [B, N, N]: [b, i, j] when node j is node i or one of its ancestors."""
  n = draft.parents_BxN.shape[1]
  ids = jnp.arange(n, dtype=jnp.int32)
  cur = jnp.broadcast_to(ids, draft.parents_BxN.shape)
  anc = cur[:, :, None] == ids[None, None, :]
  for _ in range(depth):
    cur = jnp.take_along_axis(draft.parents_BxN, cur, axis=1)
    anc = anc | (cur[:, :, None] == ids[None, None, :])
  return anc


def _along_paths(values_BxN, parents_BxN, depth: int, combine):
  """values folded from the root down each node's path, e.g. all() of oks or sum of scores:
  out[i] = combine(values[i], out[parent(i)]), the root its own value."""
  out = values_BxN
  for _ in range(depth):
    out = combine(values_BxN, jnp.take_along_axis(out, parents_BxN, axis=1))
  return out


def _path_to(last_B, draft: DynamicDraft, depth: int):
  """(a [B], path_nodes [B, M]): the root-first path to `last`, padded with the root (0)."""
  a = jnp.take_along_axis(draft.depths_BxN, last_B[:, None], axis=1)[:, 0]
  chain = [last_B]  # chain[t] is last's ancestor t levels up (the root once past it)
  for _ in range(depth):
    chain.append(jnp.take_along_axis(draft.parents_BxN, chain[-1][:, None], axis=1)[:, 0])
  chain = jnp.stack(chain, axis=1)  # [B, M]
  j = jnp.arange(depth + 1, dtype=jnp.int32)[None, :]
  picked = jnp.take_along_axis(chain, jnp.clip(a[:, None] - j, 0, depth), axis=1)
  return a, jnp.where(j <= a[:, None], picked, 0).astype(jnp.int32)


def _choose(ok_BxN, score_BxN, draft: DynamicDraft, depth: int):
  """The deepest node whose whole path is ok (ties: the higher path score, else the first)."""
  path_ok = _along_paths(ok_BxN, draft.parents_BxN, depth, jnp.logical_and)
  reach = jnp.where(path_ok, draft.depths_BxN, -1)
  if score_BxN is None:  # greedy: equal-depth accepted paths hold equal tokens
    last = jnp.argmax(reach, axis=1).astype(jnp.int32)
  else:
    path_score = _along_paths(score_BxN, draft.parents_BxN, depth, jnp.add)
    longest = jnp.max(reach, axis=1, keepdims=True)
    last = jnp.argmax(jnp.where(reach == longest, path_score, -jnp.inf), axis=1).astype(jnp.int32)
  a, path_nodes = _path_to(last, draft, depth)
  return a.astype(jnp.int32), path_nodes, last


def _at_parents(x_BxN, draft: DynamicDraft):
  return jnp.take_along_axis(x_BxN, draft.parents_BxN, axis=1)


def greedy_accept(draft: DynamicDraft, pred_BxN, depth: int):
  """As `acceptance.greedy_accept`: node i is right when it is the base argmax after its
  parent; returns (a, path_nodes, last)."""
  ok = (draft.tokens_BxN == _at_parents(pred_BxN, draft)).at[:, 0].set(True)
  return _choose(ok, None, draft, depth)


def typical_accept(draft: DynamicDraft, logits_BxNxV, params: AcceptParams, depth: int):
  """As `acceptance.typical_accept` (Medusa's rule), on the per-row topology."""
  b, n, v = logits_BxNxV.shape
  logp = log_probs(logits_BxNxV.reshape(b * n, v), params).reshape(b, n, v)
  threshold = typical_threshold(logp, params)  # [B, N]: each node as a parent
  rows = jnp.arange(b)[:, None]
  cand = logp[rows, draft.parents_BxN, draft.tokens_BxN]  # log p_parent(token) [B, N]
  ok = (jnp.exp(cand) > _at_parents(threshold, draft)).at[:, 0].set(True)
  return _choose(ok, jnp.where(ok, cand, 0.0).at[:, 0].set(0.0), draft, depth)


def exact_accept(draft: DynamicDraft, logits_BxNxV, keys_MxB, params: AcceptParams, depth: int):
  """As `acceptance.exact_accept`: depth by depth, sample y from the base at the current node
  and descend into a child holding y; the first y with none is the bonus."""
  b, n = draft.tokens_BxN.shape
  rows = jnp.arange(b)
  node_ids = jnp.arange(n, dtype=jnp.int32)[None, :]
  cur = jnp.zeros((b,), jnp.int32)
  alive = jnp.ones((b,), bool)
  a = jnp.zeros((b,), jnp.int32)
  bonus = jnp.zeros((b,), jnp.int32)
  path = [cur]
  for d in range(depth + 1):
    y = sample(logits_BxNxV[rows, cur], keys_MxB[d], params.temperature, params.top_k,
               params.top_p)
    match = ((draft.parents_BxN == cur[:, None]) & (node_ids > 0)
             & (draft.tokens_BxN == y[:, None]))
    hit = alive & jnp.any(match, axis=1)
    child = jnp.argmax(match, axis=1).astype(jnp.int32)
    bonus = jnp.where(alive & ~hit, y, bonus)
    a = a + hit.astype(jnp.int32)
    cur = jnp.where(hit, child, cur)
    alive = hit
    if d < depth:
      path.append(jnp.where(hit, child, 0))
  return a, jnp.stack(path, axis=1), cur, bonus


__all__ = ["DYNAMIC_PREFIX", "DynamicDraft", "DynamicTree", "DynamicTreeError", "ancestors",
           "dynamic_drafter", "exact_accept", "greedy_accept", "is_dynamic_spec", "parse_dynamic",
           "typical_accept"]
