"""Speculative sampling at temperature > 0: exact (lossless) and typical acceptance.

References we did not write: the base model's exact autoregressive distribution, enumerated
over every continuation of a fixed prompt (V^3 sequences of a 32-token vocab, processed by
the sampler's own temperature / top-k / top-p), the autoregressive engine's samples with the
same seed, the greedy engine, and a loop-by-loop transcription of Medusa's typical rule.

Statistics: NUM_ROWS identical prompt rows with per-row keys in ONE call; the first three
tokens (token 1 from prefill, tokens 2 and 3 from speculative steps) are compared with the
enumerated law by chi-square at the 1e-4 level, on the joint of the three tokens (cells of < 5
expected counts merged) and on the marginals of tokens 2 and 3 (tokens of < 1% merged). With
16384 rows, moving 2% of the probability between the two most likely tokens (a 2% total-
variation shift, the hardest such shift to see) is detected with power > 0.95 on every setting
(`test_chi2_power_detects_a_two_percent_shift` computes it on the actual laws with
scipy.stats.ncx2).

Because exact sampling consumes the autoregressive key schedule, its output for a seed is the
autoregressive sample for that seed whatever the tree or heads (tested token for token below);
the statistical tests use a different seed per case so that their samples are independent.
"""

import dataclasses
from typing import Tuple

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from scipy import stats

from hydra_jax.checkpoint.hf import load_hf_model
from hydra_jax.decoding import acceptance as ss
from hydra_jax.decoding.drafting import heads_drafter
from hydra_jax.decoding.engine import DecodeEngine
from hydra_jax.decoding.state import StopCriteria
from hydra_jax.decoding.sampling import SamplingParams, process_logits
from hydra_jax.decoding.tree import load_tree
from hydra_jax.model.heads import HeadsConfig, base_lm_head_kernel, param_shapes
from hydra_jax.model.llama import LlamaModel
from hydra_jax.tools.testing import make_hf_model

V = 32
PROMPT = [5, 17, 9, 22]
NUM_ROWS = 16384
P_LEVEL = 1e-4
MIN_PROB = 0.01  # marginal cells below this are merged: fewer degrees of freedom, more power
# (temperature, top_k, top_p): two temperatures and a nucleus (with a top-k on top).
SETTINGS = [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 12, 0.8)]


@pytest.fixture(scope="module")
def hm(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_v32"))
  # weight_std 0.3: next-token entropy ~2.2 nats, top-1 ~0.37: neither uniform nor one-hot.
  make_hf_model(path, vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=2, num_kv_heads=1, weight_std=0.3, tokenizer=False)
  return load_hf_model(path, tokenizer=False)


def _heads(hm, arch, seed=1, scale=0.3):
  """Random non-zero heads, built from the param shapes (no init compile): every leaf is noise
  of `scale`, norms 1 + noise and LM heads the base's plus noise, so drafts often agree with
  the base model without being perfect."""
  cfg = HeadsConfig.for_base(hm.config, arch, num_heads=4, num_layers=2)
  shapes = param_shapes(cfg, hm.config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)  # numpy: no per-shape compiles
  base_lm = np.asarray(base_lm_head_kernel(hm.config, hm.params))
  out = []
  for path, leaf in leaves:
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    noise = scale * rng.standard_normal(leaf.shape)
    if name.endswith("scale"):
      noise = noise + 1.0
    elif "lm_head" in name and name.endswith("kernel"):
      noise = noise + base_lm
    out.append(jnp.asarray(noise, leaf.dtype))
  return cfg, jax.tree_util.tree_unflatten(treedef, out)


def sibling_rejection(probs_BxV: jax.Array, cand_BxK: jax.Array, valid_BxK: jax.Array,
                      keys_B: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """The multi-draft rejection recursion at one node, written out: the textbook reference that
  `acceptance.exact_accept` implements in closed form (see that module's docstring).

  probs: the base distribution p; cand: the point-mass drafts in the order they are tried;
  valid: which drafts exist. Returns (index of the accepted draft or -1, the token produced:
  the accepted draft or a sample of the residual). Its law equals drawing y ~ p and taking the
  first draft equal to y (module docstring), which is what `exact_accept` does.
  """
  k = cand_BxK.shape[1]
  sub = jax.vmap(lambda key: jax.random.split(key, k + 1))(keys_B)  # [B, K + 1]
  residual = probs_BxV.astype(jnp.float32)
  alive = jnp.ones(cand_BxK.shape[:1], bool)
  choice = jnp.full(cand_BxK.shape[:1], -1, jnp.int32)
  token = jnp.zeros(cand_BxK.shape[:1], jnp.int32)
  for i in range(k):
    x = cand_BxK[:, i]
    px = jnp.take_along_axis(residual, x[:, None], axis=1)[:, 0]
    u = jax.vmap(jax.random.uniform)(sub[:, i])
    accept = alive & valid_BxK[:, i] & (u < px)  # min(1, r(x) / q(x)) with q(x) = 1
    choice = jnp.where(accept, i, choice)
    token = jnp.where(accept, x, token)
    reject = alive & valid_BxK[:, i] & ~accept
    # r <- normalise(max(r - onehot(x), 0)): x's mass removed.
    removed = jnp.where(jnp.arange(residual.shape[1])[None, :] == x[:, None], 0.0, residual)
    total = jnp.sum(removed, axis=-1, keepdims=True)
    removed = jnp.where(total > 0, removed / jnp.where(total > 0, total, 1.0), residual)
    residual = jnp.where(reject[:, None], removed, residual)
    alive = alive & ~accept
  drawn = jax.vmap(jax.random.categorical)(sub[:, k], jnp.log(residual))
  token = jnp.where(alive, drawn.astype(jnp.int32), token)
  return choice, token


_ENGINES = {}


@dataclasses.dataclass
class _Run:
  tokens: np.ndarray  # [B, S] output buffer
  num_generated: np.ndarray  # [B]
  steps: np.ndarray  # [B] verify steps
  accepted: np.ndarray  # [B, max steps]: tokens emitted per step, 0-padded


def _generate(hm, heads, tree, prompts, max_new, accept, setting=(0.0, 0, 1.0), seed=0,
              drafter_factory=heads_drafter, cache_len=None, row_ids_B=None, **posterior):
  """One batch through the engine generate uses (engines cached: one compile per shape)."""
  cfg, params = heads
  key = (id(hm), cfg, tree, accept, drafter_factory)
  if key not in _ENGINES:
    _ENGINES[key] = DecodeEngine(hm.config, jnp.float32, cfg, tree, accept, drafter_factory)
  p = max(len(x) for x in prompts)
  toks = np.zeros((len(prompts), p), np.int32)
  for i, x in enumerate(prompts):
    toks[i, :len(x)] = x
  lens = np.asarray([len(x) for x in prompts], np.int32)
  row_ids_B = np.arange(len(prompts)) if row_ids_B is None else np.asarray(row_ids_B)
  cache_len = cache_len or p + max_new + tree.num_nodes + 1
  out = _ENGINES[key].run(hm.params, params, toks, lens, np.ones(len(prompts), bool), row_ids_B,
                          SamplingParams.make(*setting), StopCriteria.make(max_new), seed,
                          cache_len, **posterior)
  per_step = out.extra["accepted_per_step"]
  accepted = np.zeros((len(prompts), max(1, max(len(x) for x in per_step))), np.int32)
  for r, x in enumerate(per_step):
    accepted[r, :len(x)] = x
  return _Run(out.tokens, out.num_generated, out.steps, accepted)


# --- the exact autoregressive law, by enumeration -------------------------------------------


_process = jax.jit(process_logits)


def _probs(logits_XxV, setting):
  x = np.asarray(_process(logits_XxV, *setting), np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))  # exp(-inf) = 0 outside the kept set
  return e / e.sum(-1, keepdims=True)


_ENUM = {}


def _enumerated_logits(hm):
  """Raw base logits after PROMPT: l1 [V], l2 [t1, V], l3 [t1, t2, V] (all V^2 continuations
  in one full forward, no cache: nothing of the engine is reused)."""
  if id(hm) not in _ENUM:
    t1, t2 = np.meshgrid(np.arange(V), np.arange(V), indexing="ij")
    seqs = np.concatenate([np.tile(PROMPT, (V * V, 1)), t1.reshape(-1, 1), t2.reshape(-1, 1)],
                          1)
    pos = np.broadcast_to(np.arange(seqs.shape[1])[None, :], seqs.shape)
    logits, _, _ = jax.jit(LlamaModel(hm.config).apply)({"params": hm.params},
                                                        jnp.asarray(seqs), jnp.asarray(pos))
    logits, p = np.asarray(logits), len(PROMPT)
    # t2 is not read before position p + 1: rows t2 = 0 give P(t2 | t1).
    _ENUM[id(hm)] = (logits[0, p - 1], logits[::V, p], logits[:, p + 1].reshape(V, V, V))
  return _ENUM[id(hm)]


def _conditionals(hm, setting):
  """P1 [V], P2 [V, V] = P(t2 | t1), P3 [V, V, V] = P(t3 | t1, t2) after PROMPT."""
  l1, l2, l3 = _enumerated_logits(hm)
  return (_probs(l1[None], setting)[0], _probs(l2, setting),
          _probs(l3.reshape(V * V, V), setting).reshape(V, V, V))


def _joint(conds):
  p1, p2, p3 = conds
  return p1[:, None, None] * p2[:, :, None] * p3


def _chi2_pvalue(counts, probs, min_prob=0.0):
  """Goodness of fit, cells of < 5 expected counts or < min_prob merged into one; 0 if a cell
  of probability 0 (outside the nucleus) was hit."""
  counts, probs = np.ravel(counts).astype(np.float64), np.ravel(probs)
  if counts[probs <= 0].sum() > 0:
    return 0.0
  n = counts.sum()
  big = (probs * n >= 5) & (probs >= min_prob)
  obs, exp = list(counts[big]), list(probs[big] * n)
  rest_o, rest_e = counts[~big].sum(), probs[~big].sum() * n
  if rest_e >= 5:
    obs.append(rest_o)
    exp.append(rest_e)
  elif rest_e > 0:
    i = int(np.argmin(exp))
    obs[i] += rest_o
    exp[i] += rest_e
  obs, exp = np.asarray(obs), np.asarray(exp)
  return float(stats.chi2.sf(((obs - exp) ** 2 / exp).sum(), len(obs) - 1))


def _assert_law(out_BxC, conds, label):
  joint = _joint(conds)
  toks = np.asarray(out_BxC)[:, :3]
  counts = np.zeros((V, V, V))
  np.add.at(counts, (toks[:, 0], toks[:, 1], toks[:, 2]), 1)
  pvals = {"joint": _chi2_pvalue(counts, joint),
           "t2": _chi2_pvalue(counts.sum((0, 2)), joint.sum((0, 2)), MIN_PROB),
           "t3": _chi2_pvalue(counts.sum((0, 1)), joint.sum((0, 1)), MIN_PROB)}
  tv = 0.5 * np.abs(counts.sum((0, 1)) / len(toks) - joint.sum((0, 1))).sum()
  assert min(pvals.values()) > P_LEVEL, (label, pvals, tv)
  return pvals


def test_chi2_power_detects_a_two_percent_shift(hm):
  """The test statistic has the power the module docstring claims, on the real laws."""
  for setting in SETTINGS:
    joint = _joint(_conditionals(hm, setting))
    for marginal in (joint.sum((0, 2)), joint.sum((0, 1))):
      top = np.sort(marginal)[::-1][:2]  # 2% moved between the two largest cells
      kept = int(((marginal * NUM_ROWS >= 5) & (marginal >= MIN_PROB)).sum())
      df = kept  # kept cells + the merged rest - 1
      lam = NUM_ROWS * 0.02 ** 2 * (1 / top[0] + 1 / top[1])
      power = stats.ncx2.sf(stats.chi2.isf(P_LEVEL, df), df, lam)
      assert power > 0.95, (setting, df, lam, power)


# --- pure rules ------------------------------------------------------------------------------


def test_sibling_rejection_produces_p_and_accepts_x_i_with_prob_p_x_i():
  """The textbook recursion: accept child i w.p. p(x_i) (distinct), else the residual law."""
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.ones(8) * 0.7)
  cand = np.array([3, 1, 3, 6, 0])  # a duplicate (never accepted) and an invalid slot
  valid = np.array([True, True, True, True, False])
  n = 100_000
  choice, token = jax.jit(sibling_rejection)(
      jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, 8)),
      jnp.broadcast_to(jnp.asarray(cand, jnp.int32), (n, 5)),
      jnp.broadcast_to(jnp.asarray(valid), (n, 5)), jax.random.split(jax.random.key(3), n))
  choice, token = np.asarray(choice), np.asarray(token)
  assert (np.asarray(cand)[choice[choice >= 0]] == token[choice >= 0]).all()
  assert not np.isin(token[choice < 0], [3, 1, 6]).any()  # rejected drafts never come back
  assert _chi2_pvalue(np.bincount(token, minlength=8), p) > P_LEVEL
  expect = {0: p[3], 1: p[1], 2: 0.0, 3: p[6], 4: 0.0}
  for i, q in expect.items():
    assert abs((choice == i).mean() - q) < 5 * np.sqrt(q * (1 - q) / n) + 1e-12, (i, q)


def _random_case(tree, b, seed):
  """Logits [B, N, V] and tokens [B, N]; siblings are distinct (as top-k drafts are) and often
  include their parent's argmax, so long paths get accepted."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, tree.num_nodes, V)).astype(np.float32) * 2.0
  tokens = np.zeros((b, tree.num_nodes), np.int32)
  kids = ss.children_table(tree)
  for row in range(b):
    for u in range(tree.num_nodes):
      k = kids[u][kids[u] >= 0]
      if not len(k):
        continue
      perm = rng.permutation(V)
      if rng.random() < 0.7:  # put the argmax on a random sibling
        top, j = int(np.argmax(logits[row, u])), rng.integers(len(k))
        where = int(np.nonzero(perm == top)[0][0])
        perm[where], perm[j] = perm[j], top
      tokens[row, k] = perm[:len(k)]
  return jnp.asarray(logits), jnp.asarray(tokens)


def test_exact_and_typical_at_temperature_zero_are_greedy_accept():
  tree = load_tree("mc_sim_7b_63")
  logits, tokens = _random_case(tree, 64, 0)
  pred = jnp.argmax(logits, -1).astype(jnp.int32)
  a_g, path_g, last_g = ss.greedy_accept(tree, tokens, pred)
  params = ss.AcceptParams.make(SamplingParams.make(0.0))
  keys = jax.random.split(jax.random.key(0), (tree.depth + 1) * 64).reshape(tree.depth + 1, 64)
  a_e, path_e, last_e, bonus = jax.jit(lambda *x: ss.exact_accept(tree, *x))(
      tokens, logits, keys, params)
  a_t, path_t, last_t = jax.jit(lambda *x: ss.typical_accept(tree, *x))(tokens, logits, params)
  assert np.asarray(a_g).max() >= 2  # the accept path is exercised
  for a, path, last in ((a_e, path_e, last_e), (a_t, path_t, last_t)):
    np.testing.assert_array_equal(a, a_g)
    np.testing.assert_array_equal(last, last_g)
    for b in range(64):
      np.testing.assert_array_equal(path[b, :int(a_g[b]) + 1], path_g[b, :int(a_g[b]) + 1])
  np.testing.assert_array_equal(bonus, np.asarray(pred)[np.arange(64), np.asarray(last_g)])


def _typical_reference(tree, tokens, logits, temperature, top_p, eps, alpha):
  """Medusa's evaluate_posterior (typical branch), one row and one leaf path at a time."""
  out = []
  for b in range(tokens.shape[0]):
    probs = _probs(logits[b], (temperature, 0, top_p))  # [N, V]
    ent = -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1)), 0), -1)
    best = (-1, -np.inf, None)
    for path in np.asarray(tree.retrieve):
      nodes = [int(i) for i in path if i >= 0]
      acc, ll = 0, 0.0
      for parent, child in zip(nodes[:-1], nodes[1:]):
        q = probs[parent, tokens[b, child]]
        if not q > min(eps, alpha * np.exp(-ent[parent])):
          break
        acc, ll = acc + 1, ll + np.log(q)
      if (acc, ll) > best[:2] and (acc > best[0] or ll > best[1] + 1e-9):
        best = (acc, ll, nodes[acc])
    out.append((best[0], best[2]))
  return out


@pytest.mark.parametrize("temperature,top_p,eps,alpha", [(1.0, 1.0, 0.09, 0.3),
                                                          (0.7, 0.9, 0.05, 0.5)])
def test_typical_accept_matches_medusa_rule(temperature, top_p, eps, alpha):
  tree = load_tree("mc_sim_7b_63")
  logits, tokens = _random_case(tree, 32, 1)
  params = ss.AcceptParams.make(SamplingParams.make(temperature, 0, top_p), eps, alpha)
  a, _, last = jax.jit(lambda t, l, p: ss.typical_accept(tree, t, l, p))(tokens, logits, params)
  ref = _typical_reference(tree, np.asarray(tokens), np.asarray(logits), temperature, top_p,
                           eps, alpha)
  assert [(int(x), int(y)) for x, y in zip(a, last)] == ref
  assert max(r[0] for r in ref) >= 2


# --- the engine: exactness in distribution --------------------------------------------------


def test_exact_sampling_matches_autoregressive_law_real_heads(hm):
  """Medusa heads on the chain, two temperatures and a nucleus, one compile."""
  heads = _heads(hm, "medusa")
  tree = load_tree("chain_4")
  for i, setting in enumerate(SETTINGS):
    st = _generate(hm, heads, tree, [PROMPT] * NUM_ROWS, 3, "exact", setting, seed=11 + i)
    assert (np.asarray(st.num_generated) == 3).all()
    _assert_law(st.tokens, _conditionals(hm, setting), ("medusa", setting))


def test_exact_sampling_law_on_a_dynamic_tree(hm):
  """Hydra heads on a dynamic tree: the topology follows the draft each step, the law stays
  the base's (the sampler descends only where a base sample lands)."""
  heads = _heads(hm, "hydra")
  tree = load_tree("dynamic:6:3:2", num_heads=4)
  for i, setting in enumerate(SETTINGS):
    st = _generate(hm, heads, tree, [PROMPT] * NUM_ROWS, 3, "exact", setting, seed=21 + i)
    assert (np.asarray(st.num_generated) == 3).all()
    assert np.asarray(st.accepted).max() >= 2  # drafts were accepted, not only bonus tokens
    _assert_law(st.tokens, _conditionals(hm, setting), ("hydra dynamic", setting))


def _oracle_ranks(hm):
  """Token order by raw base logit: rank2 [t1, r] of token 2, rank3 [t1, t2, r] of token 3."""
  _, l2, l3 = _enumerated_logits(hm)
  return np.argsort(-l2, -1), np.argsort(-l3, -1), l3


def _oracle_factory(hm, tree):
  """A drafter that places the base model's own top tokens (raw-logit ranks) on the tree.

  Step 1 (root = token 1) knows the prefix exactly, so every child is its parent's true top-k;
  later steps rank by P(. | previous token) averaged over the unknown earlier token. Always a
  function of the past only, as exactness requires.
  """
  rank2, rank3, l3 = _oracle_ranks(hm)
  rank_bar = jnp.asarray(np.argsort(-l3.mean(0), -1), jnp.int32)  # [t2, r]
  rank2, rank3 = jnp.asarray(rank2, jnp.int32), jnp.asarray(rank3, jnp.int32)

  def factory(models, base_params, heads_params):
    def drafter(inp):
      first = inp.num_out_B == 1
      toks = [inp.root_B]
      for i in range(1, tree.num_nodes):
        par, r, d = int(tree.parents[i]), int(tree.ranks[i]), int(tree.depths[i])
        if d == 1:
          tok = jnp.where(first, rank2[inp.root_B, r], rank_bar[inp.root_B, r])
        elif d == 2:
          tok = jnp.where(first, rank3[inp.root_B, toks[par], r], rank_bar[toks[par], r])
        else:
          tok = rank3[toks[int(tree.parents[par])], toks[par], r]
        toks.append(tok)
      return jnp.stack(toks, axis=1)
    return drafter
  return factory


def _accept_probs(tree, conds, ranks_):
  """Closed-form P(step 1 accepts >= 1) and P(>= 2) for the oracle drafter."""
  p1, p2, p3 = conds
  rank2, rank3, _ = ranks_
  kids = ss.children_table(tree)
  ranks = np.asarray(tree.ranks)
  ge1 = ge2 = 0.0
  for t1 in range(V):
    for c in kids[0][kids[0] >= 0]:
      x = rank2[t1, ranks[c]]
      ge1 += p1[t1] * p2[t1, x]
      for g in kids[c][kids[c] >= 0]:
        ge2 += p1[t1] * p2[t1, x] * p3[t1, x, rank3[t1, x, ranks[g]]]
  return ge1, ge2


def test_exact_sampling_with_oracle_drafts_accepts_often_and_stays_exact(hm):
  """Drafts = the base model's top tokens, so the accept path (not the residual) is exercised;
  the accept rates equal their closed form and the token law is still autoregressive."""
  tree = load_tree("greedy_15")
  heads = _heads(hm, "hydra")
  factory = _oracle_factory(hm, tree)
  ranks = _oracle_ranks(hm)
  for i, setting in enumerate(SETTINGS[1:]):
    st = _generate(hm, heads, tree, [PROMPT] * NUM_ROWS, 3, "exact", setting, seed=21 + i,
                   drafter_factory=factory)
    conds = _conditionals(hm, setting)
    _assert_law(st.tokens, conds, ("oracle", setting))
    step1 = np.asarray(st.accepted)[:, 0] - 1  # nodes accepted by the first step
    ge1, ge2 = _accept_probs(tree, conds, ranks)
    assert ge1 > 0.8 and ge2 > 0.4, (ge1, ge2)  # this drafter really gets accepted
    for got, want in (((step1 >= 1).mean(), ge1), ((step1 >= 2).mean(), ge2)):
      assert abs(got - want) < 4.5 * np.sqrt(want * (1 - want) / NUM_ROWS), (setting, got, want)


# --- the engine: same random stream as autoregressive sampling ------------------------------


STREAM_PROMPTS = [[5, 17, 9, 22, 30, 1], [11, 12], [7, 7, 7], [2, 4, 8, 16, 31]]
STREAM_TOKENS = 24


_AR_ENGINES = {}


def _autoregressive(hm, setting, seed, cache_len):
  prompts = STREAM_PROMPTS
  toks = np.zeros((len(prompts), max(len(p) for p in prompts)), np.int32)
  for i, x in enumerate(prompts):
    toks[i, :len(x)] = x
  engine = _AR_ENGINES.setdefault(id(hm), DecodeEngine(hm.config))  # one compile
  out = engine.run(
      hm.params, None, toks, np.asarray([len(x) for x in prompts]), np.ones(len(prompts), bool),
      np.arange(len(prompts)), SamplingParams.make(*setting),
      StopCriteria.make(STREAM_TOKENS), seed, cache_len)
  return [out.tokens[b, :STREAM_TOKENS].tolist() for b in range(len(prompts))]


def _outputs(st):
  return [np.asarray(st.tokens[b, :int(st.num_generated[b])]).tolist()
          for b in range(st.tokens.shape[0])]


@pytest.fixture(scope="module")
def stream_case(hm):
  """Hydra++ heads (prefix layer: the most state to keep right) on a small grown tree."""
  return _heads(hm, "hydra++", seed=2), load_tree("greedy_15")


@pytest.mark.slow  # the accept functions' own greedy equality is tested above, by default
def test_temperature_zero_exact_and_typical_equal_greedy(hm, stream_case):
  heads, tree = stream_case
  cache_len = 64
  runs = {mode: _generate(hm, heads, tree, STREAM_PROMPTS, STREAM_TOKENS, mode, (0.0, 0, 1.0),
                          seed=3, cache_len=cache_len)
          for mode in ("greedy", "exact", "typical")}
  greedy = _outputs(runs["greedy"])
  assert all(len(o) == STREAM_TOKENS for o in greedy)
  assert np.asarray(runs["greedy"].accepted).max() >= 2
  for mode in ("exact", "typical"):
    assert _outputs(runs[mode]) == greedy, mode
    np.testing.assert_array_equal(runs[mode].accepted, runs["greedy"].accepted)
  assert greedy == _autoregressive(hm, (0.0, 0, 1.0), 0, cache_len)


@pytest.mark.parametrize("setting", [(0.8, 0, 1.0), (1.0, 12, 0.8)])
def test_exact_and_rejecting_typical_equal_autoregressive_stream(hm, stream_case, setting):
  """Same seed, same keys: exact sampling emits autoregressive sampling's very tokens, and so
  does typical acceptance with a threshold nothing passes (every step emits its bonus only)."""
  heads, tree = stream_case
  cache_len = 64
  ref = _autoregressive(hm, setting, 7, cache_len)
  exact = _generate(hm, heads, tree, STREAM_PROMPTS, STREAM_TOKENS, "exact", setting, seed=7,
                    cache_len=cache_len)
  assert _outputs(exact) == ref
  assert np.asarray(exact.accepted).max() >= 2  # speculation did accept tokens
  none = _generate(hm, heads, tree, STREAM_PROMPTS, STREAM_TOKENS, "typical", setting, seed=7,
                   cache_len=cache_len, posterior_threshold=1e9, posterior_alpha=1e9)
  assert _outputs(none) == ref
  steps = np.asarray(none.steps)
  assert (steps == STREAM_TOKENS - 1).all()  # one token per step: nothing was accepted
  typ = _generate(hm, heads, tree, STREAM_PROMPTS, STREAM_TOKENS, "typical", setting, seed=7,
                  cache_len=cache_len)
  assert np.asarray(typ.steps).sum() < steps.sum()  # the default threshold does accept


def test_rows_follow_their_id_not_their_batch_slot(hm, stream_case):
  heads, tree = stream_case
  setting = (1.0, 0, 1.0)
  run = lambda prompts, seed, rows=None: _outputs(_generate(
      hm, heads, tree, prompts, STREAM_TOKENS, "exact", setting, seed=seed, cache_len=64,
      row_ids_B=rows))
  full = run(STREAM_PROMPTS, 4)
  shuffled = run(STREAM_PROMPTS[::-1], 4, jnp.arange(len(STREAM_PROMPTS))[::-1])
  assert shuffled[::-1] == full
  assert run(STREAM_PROMPTS, 5) != full


def test_accept_modes_are_checked(hm, stream_case):
  heads, tree = stream_case
  with pytest.raises(ValueError, match="accept mode"):
    DecodeEngine(hm.config, jnp.float32, heads[0], tree, accept="nucleus")
  with pytest.raises(ValueError, match="autoregressive decoding samples by itself"):
    DecodeEngine(hm.config, jnp.float32, accept="exact")


# --- the full matrix (slow) ------------------------------------------------------------------


ARCHS = ["medusa", "hydra", "hydra++"]
MATRIX_TREES = ["mc_sim_7b_63", "chain_4", "greedy_7", "dynamic:8"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tree_name", MATRIX_TREES)
def test_exact_sampling_law_matrix(hm, arch, tree_name):
  heads = _heads(hm, arch, seed=3)
  tree = load_tree(tree_name)
  case = 3 * (ARCHS.index(arch) * len(MATRIX_TREES) + MATRIX_TREES.index(tree_name))
  for i, setting in enumerate(SETTINGS):
    st = _generate(hm, heads, tree, [PROMPT] * NUM_ROWS, 3, "exact", setting, seed=100 + case + i)
    _assert_law(st.tokens, _conditionals(hm, setting), (arch, tree_name, setting))
