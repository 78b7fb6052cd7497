"""Drafting: the draft heads propose the tree's tokens for one speculative step.

A drafter maps `DraftInputs` to the tree's tokens [B, N], node 0 being the root (the base
model's own next token, already emitted). The real one, `heads_drafter`, follows the tree's
static plan (`tree.CompiledTree`):

  Medusa   every head reads only g, so all heads run on g and depth d takes its nodes from
           head d-1's top-k (the cartesian tree).
  Hydra    depth by depth: head d-1 runs on the rows that have children at depth d, each row
           reading g and the embeddings of the tokens on its path; the top-k of each row are
           its children. Every node's embedding is looked up once, when its token is chosen.

Heads with a draft vocabulary rank V' tokens; `draft_ids` maps the winners to token ids.
Drafters are pluggable (tests plug in a perfect one): `drafter_factory(models, base_params,
heads_params) -> Drafter`, called once per decode call, outside the loop, so that what does
not change between steps (the shared LM head's columns) is built once.

Legend: B batch, N tree nodes (root included), R rows expanded at one depth, E model width,
V' draft vocab, k top-k of one depth.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding.sampling import vocab_argmax
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import DraftHeads, HeadsConfig, shared_lm_kernel, split_shared_lm_kernel
from hydra_jax.model.llama import LlamaModel


@flax.struct.dataclass
class DraftInputs:
  """What a drafter may read at the start of a step."""
  root_B: jax.Array  # the tree root: base model's next token (already emitted)
  context_BxE: jax.Array  # g_t: base (or prefix-layer) hidden state at the last committed token
  num_out_B: jax.Array  # tokens emitted so far (the root is the last of them)
  step: jax.Array  # loop iteration


Drafter = Callable[[DraftInputs], jax.Array]


@dataclasses.dataclass(frozen=True)
class SpecModels:
  """The static half of a speculative engine: configs and the compiled tree (hashable)."""
  base_cfg: ModelConfig
  heads_cfg: HeadsConfig
  tree: "object"  # hydra_jax.decoding.tree.CompiledTree
  dtype: object = jnp.float32

  @property
  def base(self) -> LlamaModel:
    return LlamaModel(self.base_cfg, dtype=self.dtype, param_dtype=self.dtype)

  @property
  def heads(self) -> DraftHeads:
    return DraftHeads(self.heads_cfg, self.base_cfg, dtype=self.dtype, param_dtype=self.dtype)


def _top(logits_xV: jax.Array, k: int) -> jax.Array:
  """Indices of the k largest logits, best first (argmax for k = 1: no sort)."""
  if k == 1:
    return vocab_argmax(logits_xV)[..., None]
  return jax.lax.top_k(logits_xV, k)[1].astype(jnp.int32)


def draft_head_fns(models: SpecModels, base_params, heads_params):
  """(the base's embedding table, draft index -> token id, head_logits(k, g, path_embeds)):
  what every drafter reads, built once per decode call."""
  hcfg = models.heads_cfg
  if models.tree.depth > hcfg.num_heads:
    raise ValueError(f"tree depth {models.tree.depth} needs {models.tree.depth} draft heads but "
                     f"the heads have {hcfg.num_heads}")
  heads = models.heads
  embedding = base_params["embed_tokens"]["embedding"]
  heads_params, base_lm = split_shared_lm_kernel(heads_params)  # ready-made by the engine
  if base_lm is None:
    base_lm = shared_lm_kernel(hcfg, models.base_cfg, base_params)
  draft_ids = jnp.asarray(hcfg.draft_ids) if hcfg.draft_vocab else None

  def to_tokens(idx):
    return idx if draft_ids is None else jnp.take(draft_ids, idx)

  def head_logits(k, g, path_embeds):
    return heads.apply({"params": heads_params}, k, g, path_embeds, True, base_lm,
                       method="head_logits")
  return embedding, to_tokens, head_logits


def heads_drafter(models: SpecModels, base_params, heads_params) -> Drafter:
  """The real drafter for a static tree: Medusa's cartesian top-k, or Hydra's depth-by-depth
  expansion (dynamic trees: `dynamic_tree.dynamic_drafter`)."""
  tree, hcfg = models.tree, models.heads_cfg
  embedding, to_tokens, head_logits = draft_head_fns(models, base_params, heads_params)

  def medusa(inp: DraftInputs) -> jax.Array:
    parts = [inp.root_B[:, None]]
    for d in range(1, tree.depth + 1):
      top = _top(head_logits(d - 1, inp.context_BxE, None), tree.topk_per_depth[d - 1])
      parts.append(to_tokens(top[:, tree.ranks[tree.depth_nodes[d - 1]]]))
    return jnp.concatenate(parts, axis=1)

  def sequential(inp: DraftInputs) -> jax.Array:
    b, e = inp.context_BxE.shape
    depth_tokens = [inp.root_B[:, None]]  # [d]: tokens of the depth-d nodes [B, n_d]
    depth_embeds = [jnp.take(embedding, inp.root_B[:, None], axis=0).astype(models.dtype)]
    for d in range(1, tree.depth + 1):
      rows = tree.expand_rows[d - 1]  # nodes at depth d - 1 with children
      # Path of each row, root first: entry j is its ancestor at depth j, as an index into
      # that depth's nodes (static).
      path_embeds = jnp.stack(
          [depth_embeds[j][:, tree.depth_local[tree.node_path[rows, j]]] for j in range(d)],
          axis=2)  # [B, R, d, E]
      g = jnp.broadcast_to(inp.context_BxE[:, None, :], (b, len(rows), e))
      top = _top(head_logits(d - 1, g, path_embeds), tree.topk_per_depth[d - 1])  # [B, R, k]
      child = to_tokens(top[:, tree.child_row[d - 1], tree.child_rank[d - 1]])  # [B, n_d]
      depth_tokens.append(child)
      if d < tree.depth:
        depth_embeds.append(jnp.take(embedding, child, axis=0).astype(models.dtype))
    return jnp.concatenate(depth_tokens, axis=1)  # node order is depth order

  return sequential if hcfg.sequential else medusa


__all__ = ["DraftInputs", "Drafter", "SpecModels", "draft_head_fns", "heads_drafter"]
