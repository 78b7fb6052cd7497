"""What the draft heads accept: calibration ranks, the accept lengths they imply, and the same
measured by decoding. `tree_fit` fits trees on these.

`calibrate`: the base model greedily continues every prompt (`api.generate`, mode "ar"); then
ONE teacher-forced forward over prompt + continuation gives, for every position t of the
continuation and head k, the rank of the true token x_{t+k+2} in head k's logits given g_t and
the TRUE path E(x_{t+1..t+k+1}) (`DraftHeads.training_features`). Those are the tokens greedy
decoding accepts, so ranks[t] decides how far a step starting at t gets: the longest tree path
equal to ranks[t, :len(path)]. acc[d, r] = P(rank_d = r | the true tokens of depths < d are in
the heads' top-max_topk, i.e. some tree path holds the prefix).

Accept lengths of a static tree from the ranks: `replay_accept_length` is the mean over every
position; `decoded_accept_length` walks the steps greedy decoding takes (a step at t that
accepts a tokens is followed by one at t + a) and equals the tau decoding measures, step for
step (tests/test_tree_fit.py). The replay mean runs higher (7-14% on the embedded heads): easy
stretches hold many positions but few steps. Dynamic trees have no rank table: their tau is
measured by decoding (`measure_dynamic_tau`), as are end-to-end rates (`measure_decode_rates`).

Legend: K heads (depths), R ranks, B batch, T tokens, V vocab, M positions, P prompts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax.decoding.dynamic_tree import DynamicTree
from hydra_jax.decoding.prompt_files import read_single_turn_prompts
from hydra_jax.decoding.tree import CompiledTree
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import DraftHeads, HeadsConfig, shared_lm_kernel
from hydra_jax.model.llama import LlamaModel

MAX_TOPK = 10


@dataclasses.dataclass
class Calibration:
  """Teacher-forced ranks of the true tokens under the heads, and the accuracies they give."""
  acc: np.ndarray  # f64 [K, R]: P(rank_d = r | prefix in the top-R), R = max_topk
  ranks: np.ndarray  # int32 [M, K]: per position; R = not in the top-R, -1 = past the end
  eligible: np.ndarray  # int64 [K]: positions whose depth-d prefix is in the top-R
  num_prompts: int
  max_topk: int
  # int64 [P + 1]: prompt i's positions are ranks[offsets[i]:offsets[i + 1]], in order
  offsets: Optional[np.ndarray] = None

  @property
  def num_positions(self) -> int:
    return int(self.ranks.shape[0])


def read_prompts(path: str) -> List[Union[str, List[int]]]:
  """Calibration prompts, one turn each (`prompt_files` layouts); PromptFileError if bad."""
  return read_single_turn_prompts(path, "--prompts", "tree_fit")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _teacher_forced_ranks(base_cfg: ModelConfig, heads_cfg: HeadsConfig, dtype, max_topk: int,
                          base_params, heads_params, tokens_BxT):
  """ranks [K, B, T]: rank of x_{t+k+2} in head k's logits at t (ties: lower index first, like
  lax.top_k), clipped to max_topk (also for tokens outside the heads' draft vocabulary: no
  tree can propose them); garbage where t + k + 2 >= T (masked by the caller)."""
  b, t = tokens_BxT.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
  _, hidden, _ = LlamaModel(base_cfg, dtype=dtype).apply(
      {"params": base_params}, tokens_BxT, positions, return_logits=False)
  embeds = jnp.take(base_params["embed_tokens"]["embedding"], tokens_BxT, axis=0).astype(dtype)
  heads = DraftHeads(heads_cfg, base_cfg, dtype=dtype)
  feats = heads.apply({"params": heads_params}, hidden, embeds, positions, True,
                      method="training_features")
  base_lm = shared_lm_kernel(heads_cfg, base_cfg, base_params)
  to_draft = np.full((base_cfg.vocab_size,), -1, np.int32)
  to_draft[heads_cfg.draft_ids] = np.arange(heads_cfg.draft_vocab_size, dtype=np.int32)
  index = jnp.arange(heads_cfg.draft_vocab_size, dtype=jnp.int32)[None, None, :]
  out = []
  for k in range(heads_cfg.num_heads):
    logits = heads.apply({"params": heads_params}, k, feats[k], base_lm,
                         method="lm_logits")  # [B, T, V']
    shift = k + 2
    target = jnp.concatenate([tokens_BxT[:, shift:], jnp.zeros((b, min(shift, t)), jnp.int32)],
                             axis=1)[:, :t]
    target = jnp.take(jnp.asarray(to_draft), target)  # -1: not in the draft vocabulary
    true_logit = jnp.take_along_axis(logits, jnp.maximum(target, 0)[:, :, None], axis=-1)
    above = (logits > true_logit) | ((logits == true_logit) & (index < target[:, :, None]))
    rank = jnp.minimum(jnp.sum(above, axis=-1), max_topk)
    out.append(jnp.where(target < 0, max_topk, rank).astype(jnp.int32))
  return jnp.stack(out)


def accuracy_from_ranks(ranks_MxK: np.ndarray, max_topk: int = MAX_TOPK
                        ) -> Tuple[np.ndarray, np.ndarray]:
  """(acc [K, R], eligible [K]) from per-position ranks (R = miss, -1 = past the end).

  A position counts at depth d when its depth-d token is known and every shallower true token
  is within the top-R: the prefix some tree path can hold ("path prefix correct").
  """
  ranks = np.asarray(ranks_MxK)
  k = ranks.shape[1]
  acc = np.zeros((k, max_topk))
  eligible = np.zeros((k,), np.int64)
  in_top = (ranks >= 0) & (ranks < max_topk)
  for d in range(k):
    ok = (ranks[:, d] >= 0) & np.all(in_top[:, :d], axis=1)
    eligible[d] = int(ok.sum())
    if eligible[d]:
      acc[d] = np.bincount(ranks[ok, d], minlength=max_topk + 1)[:max_topk] / eligible[d]
  return acc, eligible


def teacher_forced_ranks(model, heads_cfg: HeadsConfig, heads_params,
                         sequences: Sequence[Sequence[int]], starts: Sequence[int],
                         max_topk: int = MAX_TOPK, batch_size: int = 8,
                         bucket: int = 64) -> Tuple[np.ndarray, np.ndarray]:
  """(ranks [M, K] for positions t >= starts[i] - 1 of each sequence, offsets [P + 1]).

  `starts[i]` is the prompt length: the continuation begins at index starts[i], so the first
  position is the prompt's last token (whose x_{t+1} is the first generated token). Sequence
  i's positions are rows offsets[i]:offsets[i + 1], in order.
  """
  k_heads = heads_cfg.num_heads
  longest = max(len(s) for s in sequences)
  t_pad = -(-longest // bucket) * bucket
  pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
  rows, offsets = [], [0]
  for start in range(0, len(sequences), batch_size):
    chunk = list(range(start, min(start + batch_size, len(sequences))))
    tokens = np.full((batch_size, t_pad), pad, np.int32)  # fixed shape: one compile
    for r, i in enumerate(chunk):
      tokens[r, :len(sequences[i])] = sequences[i]
    ranks = np.asarray(_teacher_forced_ranks(model.config, heads_cfg, jnp.dtype(model.dtype),
                                             max_topk, model.params, heads_params,
                                             jnp.asarray(tokens)))  # [K, B, T]
    for r, i in enumerate(chunk):
      length = len(sequences[i])
      for t in range(max(starts[i] - 1, 0), length - 2):  # depth 0 needs x_{t+2}
        depth_known = np.arange(k_heads) + t + 2 < length
        rows.append(np.where(depth_known, ranks[:, r, t], -1))
      offsets.append(len(rows))
  if not rows:
    raise ValueError("no position to calibrate on: continuations need at least 2 tokens "
                     "(raise max_new_tokens)")
  return np.stack(rows).astype(np.int32), np.asarray(offsets, np.int64)


def calibrate(model, heads, prompts, max_new_tokens: int = 128, max_topk: int = MAX_TOPK,
              chat: bool = False, batch_size: int = 8) -> Calibration:
  """Per-depth top-k accuracies of `heads` (dir or (cfg, params)) on the base's greedy output."""
  from hydra_jax.decoding import api  # api imports this module lazily: no cycle at import
  heads_cfg, heads_params = api.load_draft_heads(model, heads)
  ids = api.encode_prompts(model, prompts, chat=chat)
  results = api.generate(model, ids, max_new_tokens, mode="ar", batch_size=batch_size)
  sequences = [p + r.output_ids for p, r in zip(ids, results)]
  ranks, offsets = teacher_forced_ranks(model, heads_cfg, heads_params, sequences,
                                        [len(p) for p in ids], max_topk, batch_size)
  acc, eligible = accuracy_from_ranks(ranks, max_topk)
  return Calibration(acc=acc, ranks=ranks, eligible=eligible, num_prompts=len(ids),
                     max_topk=max_topk, offsets=offsets)



def prefix_counts(ranks_MxK: np.ndarray, max_topk: int) -> Dict[Tuple[int, ...], int]:
  counts: Dict[Tuple[int, ...], int] = {}
  for row in np.asarray(ranks_MxK).tolist():
    for d in range(len(row)):
      if not 0 <= row[d] < max_topk:
        break
      key = tuple(row[:d + 1])
      counts[key] = counts.get(key, 0) + 1
  return counts


def replay_accept_length(tree: Union[CompiledTree, Sequence], ranks_MxK: np.ndarray) -> float:
  """Mean accept length (bonus included) of greedy steps started at the calibrated positions.

  No independence assumption: a step at t accepts the nodes whose path equals ranks[t]'s
  prefix, so tau = 1 + sum over nodes of the share of positions matching the node's path.
  A depth past the end of a sequence counts as a miss.
  """
  paths = tree.paths if isinstance(tree, CompiledTree) else [tuple(p) for p in tree]
  counts = prefix_counts(ranks_MxK, 1 + max(max(p) for p in paths))
  return 1.0 + sum(counts.get(tuple(p), 0) for p in paths) / max(len(ranks_MxK), 1)


def _accepted_depth(paths, row) -> int:
  """Nodes a greedy step accepts when the true tokens have these ranks: the longest path equal
  to the row's rank prefix (-1 = past the end never matches)."""
  best = 0
  for p in paths:
    if len(p) > best and tuple(row[:len(p)]) == p:
      best = len(p)
  return best


def decoded_accept_lengths(tree: Union[CompiledTree, Sequence], ranks_MxK: np.ndarray,
                           offsets: Sequence[int]) -> List[int]:
  """Accept lengths (bonus included) of the steps greedy speculative decoding takes over the
  calibration continuations, in order, without decoding.

  Greedy speculative output is the autoregressive continuation the ranks were computed on, so
  the steps are known: the first starts at the prompt's last position, and a step at t that
  accepts a tokens (bonus included) is followed by one at t + a. `replay_accept_length`
  averages over EVERY position instead, and so overweights the easy stretches that decoding
  crosses in few steps: on the embedded heads it ran 7-14% above the tau decoding measured.
  """
  paths = tree.paths if isinstance(tree, CompiledTree) else [tuple(p) for p in tree]
  ranks = np.asarray(ranks_MxK).tolist()
  out = []
  for lo, hi in zip(offsets[:-1], offsets[1:]):
    r = int(lo)
    while r < hi:
      a = 1 + _accepted_depth(paths, ranks[r])
      out.append(a)
      r += a
  return out


def decoded_accept_length(tree: Union[CompiledTree, Sequence], ranks_MxK: np.ndarray,
                          offsets: Sequence[int]) -> float:
  """Mean of `decoded_accept_lengths`: the tau greedy decoding measures with this tree."""
  steps = decoded_accept_lengths(tree, ranks_MxK, offsets)
  return sum(steps) / max(len(steps), 1)



def measure_dynamic_tau(model, heads, trees: Sequence[DynamicTree], prompt_ids,
                        max_new_tokens: int = 128, batch_size: int = 8) -> List[float]:
  """Tokens per verify step (bonus included) of greedy decoding with each dynamic tree over the
  calibration prompts: what a rank table cannot predict for a topology chosen per step."""
  from hydra_jax.decoding import api
  taus = []
  for tree in trees:
    results = api.generate(model, prompt_ids, max_new_tokens, heads=heads, tree=tree,
                           batch_size=batch_size)
    per_step = [a for r in results for a in (r.extra.get("accepted_per_step") or [])]
    taus.append(sum(per_step) / max(len(per_step), 1))
  return taus


def measure_decode_rates(runs: Mapping[str, Tuple[Any, Any, Any]], prompt_ids,
                         max_new_tokens: int, repeats: int = 3) -> Dict[str, float]:
  """End-to-end greedy tokens/s per named (model, heads or None, tree) over the prompts, batch
  1 as the benchmark decodes; compile excluded (a warm-up pass), runs interleaved, median of
  `repeats`. What `--dtype auto` is chosen on: the step timer above ranks trees within one
  dtype well, but across dtypes it disagreed with the decode loop (the embedded Hydra heads
  on an AMD EPYC: the timer expected bf16 1.09x faster than f32, the benchmark measured
  bf16 0.64x)."""
  from hydra_jax.decoding import api

  def once(model, heads, tree):
    results = api.generate(model, prompt_ids, max_new_tokens, heads=heads, tree=tree,
                           batch_size=1)
    return (sum(r.new_tokens for r in results)
            / max(sum(r.time_s for r in results), 1e-9))  # batch 1: one row per batch

  for run in runs.values():
    once(*run)  # compile
  samples: Dict[str, List[float]] = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      samples[name].append(once(*run))
  return {name: float(np.median(v)) for name, v in samples.items()}

