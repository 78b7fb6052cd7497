"""Acceptance rules of speculative decoding, as pure jnp functions of the verify forward.

Each rule decides, from the base model's logits over the tree, how much of the draft tree to
keep and which bonus token to emit:

  greedy    temperature 0: per leaf path, the longest prefix whose tokens equal the base
            argmax at their parent; the longest path wins; the bonus is the argmax after it.
  typical   Medusa's typical acceptance (lossy): a node x is plausible when p(x) > min(eps,
            alpha * exp(-H(p))), p being its parent's base distribution; the longest plausible
            path wins (ties: highest summed log-prob) and the bonus is sampled from the base
            distribution after the last accepted node. eps = posterior_threshold (0.09),
            alpha = posterior_alpha (0.3); Medusa's helpers swap these two defaults, ours are
            named by meaning. At temperature 0 it is greedy acceptance.
  exact     Lossless tree rejection sampling: the emitted tokens have exactly the law of
            autoregressive sampling from the base model at any temperature / top-k / top-p.

p always means the distribution `sampling.sample` draws from: softmax(process_logits(...)).

Why `exact` is "sample, then look for the sample among the children"
--------------------------------------------------------------------
The drafts are deterministic: the children x_1..x_k of a node (the heads' top-k, tried in rank
order) are a function of the committed context only, i.e. point-mass proposals q_i = 1[x_i].
SpecInfer-style multi-draft rejection at a node with base distribution p goes: with residual
r_1 = p, accept x_i with probability min(1, r_i(x_i) / q_i(x_i)) = r_i(x_i); on rejection
r_{i+1} = normalise(max(r_i - q_i, 0)) = r_i with x_i's mass removed, renormalised; after k
rejections sample the residual r_{k+1}. Claim: the token produced (the accepted child, or the
residual sample) has law p, and child x_i is accepted exactly when that token equals x_i.
Induction from the last sibling: suppose that from step i + 1 on the procedure outputs a token
with law r_{i+1}. At step i, P(out = x_i) = r_i(x_i) + (1 - r_i(x_i)) * r_{i+1}(x_i)
= r_i(x_i) (r_{i+1}(x_i) = 0), and for y != x_i, P(out = y) = (1 - r_i(x_i)) * r_i(y) /
(1 - r_i(x_i)) = r_i(y). So out ~ r_1 = p. Since a rejected token is never produced later,
"x_i accepted" is the event "out = x_i" (duplicated siblings are rejected for free).
Hence the whole recursion has the same law as: draw y ~ p once; descend into the first child
whose token is y, or, if there is none, emit y as the bonus and stop. Descending conditions on
the prefix, so the child's base distribution is the next position's autoregressive
conditional, and by induction over depth every emitted token is drawn from the base model's
conditional given everything emitted before it: the output law is autoregressive sampling.

Randomness: the token at output index i of row b is drawn with the key
fold_in(fold_in(seed, row_id[b]), i), the key the autoregressive engine uses for its i-th token
(`sampling.row_keys`). Each index's key is consumed by exactly one realised draw: tree nodes of
one depth are alternative histories for the same index and share its key, and whether index
i is decided in this step or the next depends only on keys < i. So rows are reproducible,
independent of their batch, and `exact` emits the SAME tokens as autoregressive sampling with
the same seed (up to float rounding between the tree forward and a one-token forward), for any
drafter; so does `typical` whenever it accepts nothing.

Legend: B batch, N tree nodes (root included), V vocab, P leaf paths, M = depth + 1 path
slots, K max children of a node, R nodes with children.
"""

from __future__ import annotations


import flax
import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding.sampling import SamplingParams, process_logits, sample

ACCEPT_MODES = ("greedy", "typical", "exact")
DEFAULT_POSTERIOR_THRESHOLD = 0.09  # eps: an absolute probability floor
DEFAULT_POSTERIOR_ALPHA = 0.3  # alpha: scales the entropy-adaptive threshold exp(-H)


@flax.struct.dataclass
class AcceptParams:
  """Traced knobs of the sampling acceptance rules (new values never recompile)."""
  temperature: jax.Array  # f32 []; 0 = greedy
  top_k: jax.Array  # int32 []; 0 = off
  top_p: jax.Array  # f32 []; 1.0 = off
  posterior_threshold: jax.Array  # f32 []: eps of typical acceptance
  posterior_alpha: jax.Array  # f32 []: alpha of typical acceptance

  @classmethod
  def make(cls, sampling: SamplingParams | None = None,
           posterior_threshold=DEFAULT_POSTERIOR_THRESHOLD,
           posterior_alpha=DEFAULT_POSTERIOR_ALPHA) -> "AcceptParams":
    sampling = SamplingParams.make() if sampling is None else sampling
    return cls(temperature=jnp.asarray(sampling.temperature, jnp.float32),
               top_k=jnp.asarray(sampling.top_k, jnp.int32),
               top_p=jnp.asarray(sampling.top_p, jnp.float32),
               posterior_threshold=jnp.asarray(posterior_threshold, jnp.float32),
               posterior_alpha=jnp.asarray(posterior_alpha, jnp.float32))


def check_accept_mode(accept: str) -> str:
  if accept not in ACCEPT_MODES:
    raise ValueError(f"unknown accept mode {accept!r}; choose one of {', '.join(ACCEPT_MODES)} "
                     f"(greedy: temperature 0, exact: lossless sampling, typical: Medusa's lossy "
                     f"typical acceptance)")
  return accept


def greedy_accept(tree, tokens_BxN: jax.Array, pred_BxN: jax.Array):
  """Longest agreeing prefix over the leaf paths.

  pred[b, i] is the base argmax after node i. Returns (accepted count a [B] excluding the root,
  the chosen path's node indices [B, M] (root first, padding clipped to 0), last node [B]).
  Padded path slots never count: `valid` masks them before the running product.
  """
  return _choose_path(tree, tokens_BxN[:, :] == _parent_pred(tree, pred_BxN), None)


def _parent_pred(tree, pred_BxN):
  """pred at each node's parent (the root's entry is unused)."""
  return pred_BxN[:, np.maximum(np.asarray(tree.parents), 0)]


def children_table(tree) -> np.ndarray:
  """int32 [N, K]: each node's children in rank order (node order), padded with -1."""
  kids = [[] for _ in range(tree.num_nodes)]
  for i in range(1, tree.num_nodes):  # node order sorts siblings by rank
    kids[int(tree.parents[i])].append(i)
  width = max(1, max(len(k) for k in kids))
  table = np.full((tree.num_nodes, width), -1, np.int32)
  for i, k in enumerate(kids):
    table[i, :len(k)] = k
  return table


def log_probs(logits_XxV: jax.Array, params: AcceptParams) -> jax.Array:
  """log p for rows of logits: the distribution the sampler draws from (-inf outside it)."""
  processed = process_logits(logits_XxV, params.temperature, params.top_k, params.top_p)
  return jax.nn.log_softmax(processed, axis=-1)


def typical_threshold(logp_xV: jax.Array, params: AcceptParams) -> jax.Array:
  """Medusa's plausibility bar per distribution: min(eps, alpha * exp(-H(p))) (0 log 0 = 0)."""
  probs = jnp.exp(logp_xV)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * logp_xV, 0.0), axis=-1)
  return jnp.minimum(params.posterior_threshold, params.posterior_alpha * jnp.exp(-entropy))


def _choose_path(tree, ok_BxN: jax.Array, score_BxN):
  """Longest path of ok nodes; ties broken by the summed score of the accepted nodes (the
  first longest path when score is None: greedy, where equal-length paths hold equal tokens).

  Returns (a [B], path_nodes [B, M] root first with padding clipped to 0, last node [B]).
  """
  retrieve = np.asarray(tree.retrieve)
  valid = retrieve >= 0
  idx = np.where(valid, retrieve, 0)
  ok = ok_BxN[:, idx[:, 1:]] & valid[None, :, 1:]  # [B, P, M-1]
  run = jnp.cumprod(ok.astype(jnp.int32), axis=-1)
  path_accept = jnp.sum(run, axis=-1)  # [B, P]
  if score_BxN is None:
    best = jnp.argmax(path_accept, axis=-1)  # first longest
  else:
    path_score = jnp.sum(jnp.where(run > 0, score_BxN[:, idx[:, 1:]], 0.0), axis=-1)
    longest = jnp.max(path_accept, axis=-1, keepdims=True)
    best = jnp.argmax(jnp.where(path_accept == longest, path_score, -jnp.inf), axis=-1)
  a = jnp.take_along_axis(path_accept, best[:, None], axis=1)[:, 0]
  path_nodes = jnp.asarray(idx)[best]
  last = jnp.take_along_axis(path_nodes, a[:, None], axis=1)[:, 0]
  return a.astype(jnp.int32), path_nodes.astype(jnp.int32), last.astype(jnp.int32)


def typical_accept(tree, tokens_BxN: jax.Array, logits_BxNxV: jax.Array, params: AcceptParams):
  """Medusa's typical acceptance over the tree; returns (a, path_nodes [B, M], last).

  Node x with parent u is plausible when p_u(x) > min(eps, alpha * exp(-H(p_u))), p_u the
  processed base distribution at u (temperature, top-k, top-p) and H its entropy (0 log 0 = 0;
  Medusa adds 1e-5 inside the log). The bonus token is not drawn here: sample it from the base
  distribution at `last` (with the key of output index num_out + a).
  """
  b, n, v = logits_BxNxV.shape
  rows = np.nonzero(~np.asarray(tree.is_leaf))[0].astype(np.int32)  # [R], the root first
  logp = log_probs(logits_BxNxV[:, rows].reshape(b * len(rows), v), params)
  logp = logp.reshape(b, len(rows), v)
  threshold = typical_threshold(logp, params)  # [B, R]
  # Each non-root node reads its parent's row.
  row_of = np.zeros(n, np.int32)
  row_of[rows] = np.arange(len(rows), dtype=np.int32)
  parent_row = row_of[np.maximum(np.asarray(tree.parents), 0)]  # [N] (the root's is unused)
  cand_logp = jnp.take_along_axis(logp[:, parent_row], tokens_BxN[:, :, None], axis=-1)[..., 0]
  ok = jnp.exp(cand_logp) > threshold[:, parent_row]  # [B, N]
  return _choose_path(tree, ok, jnp.where(ok, cand_logp, 0.0))


def exact_accept(tree, tokens_BxN: jax.Array, logits_BxNxV: jax.Array, keys_MxB: jax.Array,
                 params: AcceptParams):
  """Lossless tree rejection sampling; returns (a, path_nodes [B, M], last, bonus [B]).

  keys_MxB[d] draws the token decided at depth d (output index num_out + d). Depth by depth
  (static), each row samples y from the base distribution at its current node and descends
  into the first child whose token is y (the SpecInfer recursion in closed form, see the
  module docstring); the first y with no such child is the bonus. Head drafts are distinct
  top-k tokens; should two siblings share a token, following the first is still exact (the
  emitted tokens do not change, a longer path through the other may just go unused).
  """
  b = tokens_BxN.shape[0]
  m = tree.depth + 1
  kids_NxK = jnp.asarray(children_table(tree))
  rows = jnp.arange(b)
  cur = jnp.zeros((b,), jnp.int32)
  alive = jnp.ones((b,), bool)
  a = jnp.zeros((b,), jnp.int32)
  bonus = jnp.zeros((b,), jnp.int32)
  path = [cur]
  for d in range(m):  # depth m - 1 nodes are leaves: every row stops by then
    y = sample(logits_BxNxV[rows, cur], keys_MxB[d], params.temperature, params.top_k,
               params.top_p)
    kids = kids_NxK[cur]  # [B, K]
    match = (jnp.take_along_axis(tokens_BxN, jnp.maximum(kids, 0), axis=1) == y[:, None]) \
        & (kids >= 0)
    hit = alive & jnp.any(match, axis=-1)
    child = jnp.take_along_axis(kids, jnp.argmax(match, axis=-1)[:, None], axis=1)[:, 0]
    bonus = jnp.where(alive & ~hit, y, bonus)
    a = a + hit.astype(jnp.int32)
    cur = jnp.where(hit, child, cur)
    alive = hit
    if d + 1 < m:
      path.append(jnp.where(hit, child, 0))
  return a, jnp.stack(path, axis=1), cur, bonus


__all__ = ["ACCEPT_MODES", "AcceptParams", "DEFAULT_POSTERIOR_ALPHA", "DEFAULT_POSTERIOR_THRESHOLD",
           "check_accept_mode", "children_table", "exact_accept", "greedy_accept", "log_probs",
           "typical_accept", "typical_threshold"]
