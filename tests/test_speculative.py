"""The speculative engine is lossless: its greedy output equals transformers' greedy generate.

References we did not write: transformers' PyTorch `generate(do_sample=False)` on the same
random weights, and a fresh full forward of our base model over the accepted sequence.
Drafters: the real heads (random, non-zero weights), a perfect drafter that knows the greedy
continuation (full acceptance along a chosen path), and a noisy oracle (partial acceptance).
"""

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch

from hydra_jax.checkpoint.hf import load_hf_model
from hydra_jax.decoding import speculative as spec
from hydra_jax.decoding.acceptance import AcceptParams
from hydra_jax.decoding.drafting import SpecModels, heads_drafter
from hydra_jax.decoding.engine import ROW_MAJOR_MIN_BYTES, DecodeEngine, wants_row_major_copies
from hydra_jax.decoding.sampling import SamplingParams
from hydra_jax.decoding.state import STOP, StopCriteria
from hydra_jax.decoding.tree import compile_tree, load_tree
from hydra_jax.model.heads import SHARED_LM_KERNEL, HeadsConfig, init_heads, DraftHeads
from hydra_jax.model.llama import (REDUCE_MAX_ROWS, ROW_MAJOR_COPY, TIED_HEAD_COPY, LlamaModel,
                                   with_tied_head_copy)
from hydra_jax.tools.testing import make_hf_model, perturb_params



@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """llama (GQA, untied) and qwen2 (q/k/v bias, tied), each built once, on first use."""
  cache = {}

  def get(model_type):
    if model_type not in cache:
      path = str(tmp_path_factory.mktemp(model_type))
      torch_model = make_hf_model(path, model_type=model_type, vocab_size=256, hidden_size=64,
                                  intermediate_size=128, num_layers=2, num_heads=4,
                                  num_kv_heads=2, weight_std=0.15, tokenizer=False,
                                  tie_word_embeddings=model_type == "qwen2")
      cache[model_type] = (torch_model, load_hf_model(path, tokenizer=False))
    return cache[model_type]
  return get


@pytest.fixture(scope="module")
def base(bases):
  """The mechanics tests (oracle drafters, stops, caches) run on the llama base only."""
  return bases("llama")


PROMPTS = [[5, 17, 42, 9, 100, 7, 3 + 60], [11, 12], [200, 201, 202, 203, 204]]


def _hf_greedy(torch_model, prompt, n):
  with torch.no_grad():
    out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def _pad(prompts):
  p = max(len(x) for x in prompts)
  arr = np.zeros((len(prompts), p), np.int32)
  for i, x in enumerate(prompts):
    arr[i, :len(x)] = x
  return jnp.asarray(arr), jnp.asarray([len(x) for x in prompts], jnp.int32)


def _run(hm, heads_cfg, heads_params, tree, prompts, max_new, stop_ids=(),
         drafter_factory=heads_drafter, cache_len=128, row_major_copies=None):
  """The engine `generate` uses, on one batch: (BatchOutput, output token lists)."""
  engine = DecodeEngine(hm.config, jnp.float32, heads_cfg, tree, "greedy", drafter_factory,
                        row_major_copies=row_major_copies)
  toks, lens = _pad(prompts)
  b = len(prompts)
  out = engine.run(hm.params, heads_params, toks, lens, np.ones(b, bool), np.arange(b),
                   SamplingParams.make(), StopCriteria.make(max_new, (), stop_ids), 0, cache_len)
  return out, [out.tokens[r, :out.num_generated[r]].tolist() for r in range(b)]


def _first_state(hm, heads_cfg, heads_params, tree, prompts, max_new=50, cache_len=128):
  """spec_prefill's state (for step-by-step tests) and what spec_step needs with it."""
  models = SpecModels(hm.config, heads_cfg, tree)
  toks, lens = _pad(prompts)
  b = len(prompts)
  params, stop = AcceptParams.make(), StopCriteria.make(max_new)
  state = jax.jit(spec.spec_prefill, static_argnums=(0, 1))(
      models, cache_len, hm.params, heads_params, toks, lens, jnp.ones((b,), bool),
      jnp.arange(b, dtype=jnp.int32), jax.random.key(0), params, stop)
  return models, state, params, stop


def _heads(hm, arch, seed=1, **kw):
  layers = 2 if arch != "hydra++" else 2
  cfg = HeadsConfig.for_base(hm.config, arch, num_heads=4, num_layers=layers, **kw)
  params = init_heads(cfg, hm.config, hm.params, jax.random.PRNGKey(seed))
  return cfg, perturb_params(params, seed, 0.05)


DRAFT_VOCAB = tuple(range(0, 256, 3))  # 86 of the 256 tokens: most greedy tokens fall outside


_SLOW = pytest.mark.slow  # cases another default case covers (same kind, model or option)


@pytest.mark.parametrize("model_type,arch,tree_name,batch,lm", [
    ("llama", "medusa", "mc_sim_7b_63", 3, {}),
    pytest.param("llama", "hydra", "mc_sim_7b_63", 3, {}, marks=_SLOW),
    pytest.param("llama", "hydra++", "mc_sim_7b_63", 3, {}, marks=_SLOW),
    ("llama", "hydra", "chain_4", 1, {}),
    pytest.param("qwen2", "medusa", "greedy_15", 1, {}, marks=_SLOW),
    ("qwen2", "hydra", "mc_sim_7b_63", 3, {}), ("qwen2", "hydra++", "greedy_31", 3, {}),
    # Drafting options: lossless whatever the heads propose (verification is full-vocabulary).
    ("llama", "hydra++", "greedy_15", 3, dict(lm_head="base", draft_vocab=DRAFT_VOCAB)),
    ("qwen2", "medusa", "greedy_7", 3, dict(lm_head="own", draft_vocab=DRAFT_VOCAB)),
    pytest.param("llama", "hydra", "greedy_7", 3, dict(lm_head="base"), marks=_SLOW),
    # Dynamic trees: the topology chosen per step and per row from the heads' scores.
    ("llama", "medusa", "dynamic:8", 3, {}), ("llama", "hydra++", "dynamic:16", 3, {}),
    ("qwen2", "hydra", "dynamic:6:3:2", 3, dict(lm_head="base", draft_vocab=DRAFT_VOCAB))])
def test_lossless_with_real_heads(bases, model_type, arch, tree_name, batch, lm):
  torch_model, hm = bases(model_type)
  cfg, params = _heads(hm, arch, **lm)
  n = 12
  prompts = PROMPTS[:batch]
  refs = [_hf_greedy(torch_model, p, n) for p in prompts]
  st, outs = _run(hm, cfg, params, load_tree(tree_name, num_heads=4), prompts, n)
  assert outs == refs


@pytest.mark.parametrize("model_type,arch,tree_name,batch", [
    ("qwen2", "hydra++", "greedy_7", 1),  # 8 verify rows, tied head read from the embedding
    ("llama", "hydra", "chain_4", 3),  # 3 x 5 rows, padded to 16
    pytest.param("llama", "medusa", "dynamic:8", 2, marks=_SLOW)])
def test_lossless_with_row_major_copies(bases, model_type, arch, tree_name, batch):
  """Verify forwards that multiply-and-reduce over row-major kernel copies (what f32 CPU
  decoding of a model bigger than the cache runs) decode what transformers' greedy does."""
  if jax.default_backend() != "cpu":
    pytest.skip("row-major copies are a CPU layout")
  torch_model, hm = bases(model_type)
  cfg, params = _heads(hm, arch)
  prompts = PROMPTS[:batch]
  refs = [_hf_greedy(torch_model, p, 12) for p in prompts]
  _, outs = _run(hm, cfg, params, load_tree(tree_name, num_heads=4), prompts, 12,
                 row_major_copies=True)
  assert outs == refs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tied_lm_head_copy_gives_the_same_logits(bases, dtype):
  """On a CPU the engine hands a tied model an [E, V] copy of its embedding (a faster XLA:CPU
  GEMM layout for products of >= 2 rows, LlamaModel.logits), made once per set of weights.
  The reference: transformers' logits of the same tied model. Which rows read the copy is
  checked with a zero copy: every product of >= 2 rows, and one row only in bf16."""
  torch_model, hm = bases("qwen2")  # tied
  cfg, _ = _heads(hm, "hydra")
  tree = load_tree("greedy_7", num_heads=4)
  engine = DecodeEngine(hm.config, jnp.float32, cfg, tree)
  on_cpu = jax.default_backend() == "cpu"
  assert engine.copy_tied_head == on_cpu
  assert not DecodeEngine(bases("llama")[1].config).copy_tied_head  # untied: nothing to copy
  assert not DecodeEngine(hm.config).copy_tied_head  # f32 AR: one row, the embedding itself
  assert DecodeEngine(hm.config, jnp.bfloat16).copy_tied_head == on_cpu  # bf16 rows are two
  copy = engine.run_params(hm.params)
  if on_cpu:
    np.testing.assert_array_equal(copy[TIED_HEAD_COPY],
                                  np.asarray(hm.params["embed_tokens"]["embedding"]).T)
    # made once per set of weights, for every engine that decodes them
    again = DecodeEngine(hm.config, jnp.float32, cfg, tree).run_params(hm.params)
    assert again[TIED_HEAD_COPY] is copy[TIED_HEAD_COPY]
  assert engine.run_params(copy) is copy
  # Sizing (abstract_args -> lower) traces what `run` passes, the copy included.
  assert (TIED_HEAD_COPY in engine.abstract_args(1, 8)[0]) == on_cpu
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), hm.params)
  model = LlamaModel(hm.config, dtype=dtype, param_dtype=dtype)
  logits = jax.jit(lambda p, t: model.apply({"params": p}, t, jnp.arange(t.shape[1])[None])[0])
  tol = 1e-4 if dtype == jnp.float32 else 5e-2
  for t in (1, 8):
    tokens = jnp.asarray(np.random.default_rng(t).integers(0, 256, (1, t)), jnp.int32)
    tied, copied = logits(params, tokens), logits(with_tied_head_copy(hm.config, params), tokens)
    np.testing.assert_allclose(copied, tied, rtol=1e-5 if dtype == jnp.float32 else 2e-2,
                               atol=1e-5 if dtype == jnp.float32 else 2e-2)
    with torch.no_grad():
      ref = torch_model(torch.tensor(np.asarray(tokens))).logits.float().numpy()
    np.testing.assert_allclose(copied, ref, rtol=tol, atol=tol)
    zero = logits({**params, TIED_HEAD_COPY: jnp.zeros_like(params["embed_tokens"]["embedding"].T)},
                  tokens)
    reads_copy = t > 1 or dtype != jnp.float32
    assert bool(jnp.all(zero == 0)) == reads_copy, (t, dtype)


@pytest.mark.parametrize("base", ["qwen2", "llama"])  # tied, untied
def test_row_major_copies_give_the_same_logits(bases, base):
  """On a CPU, f32 speculative decoding hands the model a row-major copy [O, I] of every kernel
  (a tied head's is the embedding itself) when the weights outgrow the cache, made once per
  set of weights, which products of 2-16 rows multiply-and-reduce (llama.dense). The
  references: numpy's transpose of each kernel, and transformers' logits of the same model.
  Which products read the copies is checked with zero copies: every one of 2-16 rows, none of
  1 or 17."""
  torch_model, hm = bases(base)
  cfg, _ = _heads(hm, "hydra")
  tree = load_tree("greedy_7", num_heads=4)
  on_cpu = jax.default_backend() == "cpu"
  big = dataclasses.replace(hm.config, num_layers=64, hidden_size=512, intermediate_size=1024)
  assert 4 * big.num_params > ROW_MAJOR_MIN_BYTES > 4 * hm.config.num_params
  assert wants_row_major_copies(big, jnp.float32, True) == on_cpu
  assert not wants_row_major_copies(hm.config, jnp.float32, True)  # in cache: the GEMM wins
  assert not wants_row_major_copies(big, jnp.float32, False)  # autoregressive: one-row GEMVs
  assert not wants_row_major_copies(big, jnp.bfloat16, True)  # bf16: YNNPACK's GEMMs
  assert not DecodeEngine(hm.config, jnp.float32, cfg, tree).row_major_copies
  engine = DecodeEngine(hm.config, jnp.float32, cfg, tree, row_major_copies=True)
  ready = engine.run_params(hm.params)
  layer = hm.params["layers_0"]
  ready_layer = ready["layers_0"]
  np.testing.assert_array_equal(ready_layer["self_attn"]["o_proj"][ROW_MAJOR_COPY],
                                np.asarray(layer["self_attn"]["o_proj"]["kernel"]).reshape(
                                    -1, hm.config.hidden_size).T)
  for path in (("self_attn", "qkv_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj")):
    kernel = np.asarray(layer[path[0]][path[1]]["kernel"])
    np.testing.assert_array_equal(ready_layer[path[0]][path[1]][ROW_MAJOR_COPY],
                                  kernel.reshape(kernel.shape[0], -1).T)
  if hm.config.tie_word_embeddings:
    assert ready["embed_tokens"][ROW_MAJOR_COPY] is hm.params["embed_tokens"]["embedding"]
  else:
    np.testing.assert_array_equal(ready["lm_head"][ROW_MAJOR_COPY],
                                  np.asarray(hm.params["lm_head"]["kernel"]).T)
  again = DecodeEngine(hm.config, jnp.float32, cfg, load_tree("greedy_15", num_heads=4),
                       row_major_copies=True)
  assert again.run_params(hm.params)["layers_1"]["mlp"]["down_proj"][ROW_MAJOR_COPY] is (
      ready["layers_1"]["mlp"]["down_proj"][ROW_MAJOR_COPY])  # made once per set of weights
  assert engine.run_params(ready) is ready
  sized = engine.abstract_args(1, 8)[0]  # sizing traces the copies too
  assert sized["layers_0"]["mlp"]["gate_up_proj"][ROW_MAJOR_COPY].shape == (
      2 * hm.config.intermediate_size, hm.config.hidden_size)

  model = LlamaModel(hm.config)
  logits = jax.jit(lambda p, t: model.apply({"params": p}, t, jnp.arange(t.shape[1])[None])[0])
  zeros = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if path[-1].key == ROW_MAJOR_COPY else x, ready)
  for t in (1, 2, 5, 8, 13, REDUCE_MAX_ROWS, REDUCE_MAX_ROWS + 1):
    tokens = jnp.asarray(np.random.default_rng(t).integers(0, 256, (1, t)), jnp.int32)
    plain, reduced = logits(hm.params, tokens), logits(ready, tokens)
    np.testing.assert_allclose(reduced, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
      ref = torch_model(torch.tensor(np.asarray(tokens))).logits.float().numpy()
    np.testing.assert_allclose(reduced, ref, rtol=1e-4, atol=1e-4)
    reads_copies = 2 <= t <= REDUCE_MAX_ROWS
    assert bool(jnp.all(logits(zeros, tokens) == 0)) == reads_copies, t


@pytest.mark.parametrize("base", ["qwen2", "llama"])  # tied, untied
def test_the_shared_draft_lm_kernel_is_made_once_outside_jit(bases, base):
  """Heads on the base's LM head restricted to a draft vocabulary read its [D, V'] columns:
  the engine makes them once per set of weights outside jit (with_shared_lm_kernel), equal to
  the base LM head's columns as numpy takes them, shared by every engine, and the drafter
  reads them (with a zero kernel the drafts follow the heads' LM bias alone)."""
  _, hm = bases(base)
  cfg, heads = _heads(hm, "hydra", lm_head="base", draft_vocab=DRAFT_VOCAB)
  tree = load_tree("greedy_7", num_heads=4)
  engine = DecodeEngine(hm.config, jnp.float32, cfg, tree)
  ready = engine.run_heads_params(hm.params, heads)
  lm = (np.asarray(hm.params["embed_tokens"]["embedding"]).T if hm.config.tie_word_embeddings
        else np.asarray(hm.params["lm_head"]["kernel"]))
  np.testing.assert_array_equal(ready[SHARED_LM_KERNEL], lm[:, list(DRAFT_VOCAB)])
  again = DecodeEngine(hm.config, jnp.float32, cfg, load_tree("greedy_15", num_heads=4))
  assert again.run_heads_params(hm.params, heads)[SHARED_LM_KERNEL] is ready[SHARED_LM_KERNEL]
  assert engine.run_heads_params(hm.params, ready) is ready
  assert (SHARED_LM_KERNEL in engine.abstract_args(1, 8, heads)[1])
  own, _ = _heads(hm, "hydra", lm_head="own", draft_vocab=DRAFT_VOCAB)  # own LM heads: none
  assert engine.run_heads_params(hm.params, heads) is not heads
  assert DecodeEngine(hm.config, jnp.float32, own, tree).run_heads_params(hm.params, heads) is heads
  models = SpecModels(hm.config, cfg, tree, jnp.float32)
  root = jnp.asarray([5], jnp.int32)
  context = jnp.asarray(np.random.default_rng(0).standard_normal((1, hm.config.hidden_size)),
                        jnp.float32)
  draft = lambda hp: np.asarray(heads_drafter(models, hm.params, hp)(
      spec.DraftInputs(root_B=root, context_BxE=context, num_out_B=jnp.zeros(1, jnp.int32),
                       step=jnp.zeros((), jnp.int32))))
  np.testing.assert_array_equal(draft(ready), draft(heads))  # same columns, same drafts
  zero = draft({**ready, SHARED_LM_KERNEL: jnp.zeros_like(ready[SHARED_LM_KERNEL])})
  assert not np.array_equal(zero, draft(heads))


def _leaf(tree, i):
  """The i-th full-depth leaf path of the tree (i = -1: the last, far from the first)."""
  return [list(p) for p in tree.paths if len(p) == tree.depth][i]


def _oracle_factory(continuation, path, corrupt_every=0):
  """A drafter that places the true greedy continuation on one leaf path of the tree.

  continuation[b, i] is the i-th new token of row b. With corrupt_every=c > 0, the token at
  depth (step % D) + 1 is wrong on steps divisible by c, so acceptance stops there.
  """
  cont = jnp.asarray(continuation)

  def factory(models, base_params, heads_params):
    tree = models.tree
    nodes = [0]
    for d in range(1, len(path) + 1):
      nodes.append(tree.paths.index(tuple(path[:d])) + 1)
    b = cont.shape[0]

    def drafter(inp):
      tokens = jnp.zeros((b, tree.num_nodes), jnp.int32) + 1
      for d in range(1, len(nodes)):
        idx = jnp.clip(inp.num_out_B - 1 + d, 0, cont.shape[1] - 1)
        true = cont[jnp.arange(b), idx]
        if corrupt_every:
          bad = (inp.step % corrupt_every == 0) & (inp.step % tree.depth + 1 == d)
          true = jnp.where(bad, (true + 1) % models.base_cfg.vocab_size, true)
        tokens = tokens.at[:, nodes[d]].set(true)
      return tokens
    return drafter
  return factory


def test_perfect_drafter_accepts_full_depth(base):
  torch_model, hm = base
  cfg, params = _heads(hm, "hydra")
  n = 21
  refs = [_hf_greedy(torch_model, p, n + 8) for p in PROMPTS]
  cont = np.asarray([r for r in refs])
  tree = load_tree("mc_sim_7b_63")
  last_leaf = _leaf(tree, -1)
  for path in ([0] * tree.depth, last_leaf):
    st, outs = _run(hm, cfg, params, tree, PROMPTS, n, drafter_factory=_oracle_factory(cont, path))
    assert outs == [r[:n] for r in refs]
    for b in range(len(PROMPTS)):
      # 1 prefill token, then 5 per step: 4 steps give 21 tokens.
      assert st.steps[b] == 4
      assert st.extra["accepted_per_step"][b] == [tree.depth + 1] * 4


def test_noisy_oracle_partial_acceptance_is_lossless(base):
  torch_model, hm = base
  cfg, params = _heads(hm, "hydra++")
  n = 20
  refs = [_hf_greedy(torch_model, p, n + 8) for p in PROMPTS]
  tree = load_tree("mc_sim_7b_63")
  st, outs = _run(hm, cfg, params, tree, PROMPTS, n,
                  drafter_factory=_oracle_factory(np.asarray(refs), _leaf(tree, 1), corrupt_every=2))
  assert outs == [r[:n] for r in refs]
  assert len(set(st.extra["accepted_per_step"][0])) > 1  # several accept lengths happened


def test_next_logits_equal_full_forward_after_non_first_path(base):
  torch_model, hm = base
  cfg, params = _heads(hm, "hydra")
  tree = load_tree("mc_sim_7b_63")
  refs = [_hf_greedy(torch_model, p, 12) for p in PROMPTS]
  last_leaf = _leaf(tree, -1)
  models, state, accept_params, stop = _first_state(hm, cfg, params, tree, PROMPTS)
  drafter = _oracle_factory(np.asarray(refs), last_leaf)(models, hm.params, params)
  # Jitted, here and below: run eagerly, each op compiles on its own (seconds on 2 cores).
  state = jax.jit(lambda s: spec.spec_step(models, hm.params, params, drafter, s, accept_params,
                                           stop))(state)
  assert (np.asarray(state.spec.accepted_BxS)[:, 0] == tree.depth + 1).all()
  # One more plain decode step on the compacted cache vs a fresh full forward.
  model = LlamaModel(hm.config)
  from hydra_jax.model.masks import cache_causal_mask
  cache = state.cache
  logits, _, _ = jax.jit(model.apply)({"params": hm.params}, state.last_token[:, None],
                                      cache.lengths[:, None], cache,
                                      cache_causal_mask(cache.lengths, 1, cache.max_len))
  forward = jax.jit(lambda ids, pos: model.apply({"params": hm.params}, ids, pos))
  for b, prompt in enumerate(PROMPTS):
    seq = prompt + np.asarray(state.tokens[b, :int(state.num_generated[b])]).tolist()
    full, _, _ = forward(jnp.asarray([seq]), jnp.arange(len(seq))[None, :])
    np.testing.assert_allclose(np.asarray(logits[b, 0]), np.asarray(full[0, -1]), atol=1e-4)


def test_hydra_pp_decoding_head_logits_equal_training_forward(base):
  torch_model, hm = base
  cfg, params = _heads(hm, "hydra++")
  tree = load_tree("mc_sim_7b_63")
  refs = [_hf_greedy(torch_model, p, 30) for p in PROMPTS]
  # max_new_tokens 100: no truncation, every committed token is also emitted.
  models, st, accept_params, stop = _first_state(hm, cfg, params, tree, PROMPTS, max_new=100)
  drafter = _oracle_factory(np.asarray(refs), _leaf(tree, -1), corrupt_every=3)(
      models, hm.params, params)
  step = jax.jit(lambda s: spec.spec_step(models, hm.params, params, drafter, s, accept_params,
                                          stop))
  for _ in range(4):
    st = step(st)
  assert len(set(np.asarray(st.spec.accepted_BxS)[0, :4].tolist())) > 1
  heads = DraftHeads(cfg, hm.config)
  model = LlamaModel(hm.config)
  emb = hm.params["embed_tokens"]["embedding"]
  # The training forward, jitted (eager ops compile one by one, seconds on 2 cores).
  @jax.jit
  def training_context(ids, pos):
    _, hidden, _ = model.apply({"params": hm.params}, ids, pos)
    return heads.apply({"params": params}, hidden, pos, None, None, True, method="context")[0]

  first_head_logits = jax.jit(lambda context, path: heads.apply(
      {"params": params}, 0, context, path, True, method="head_logits"))
  for b, prompt in enumerate(PROMPTS):
    out = np.asarray(st.tokens[b, :int(st.num_generated[b])]).tolist()
    # committed context = prompt + all emitted tokens but the last (the next root)
    seq = prompt + out[:-1]
    assert int(st.cache.lengths[b]) == len(seq)
    g_full = training_context(jnp.asarray([seq]), jnp.arange(len(seq))[None, :])
    context = st.spec.context_BxE
    np.testing.assert_allclose(np.asarray(context[b]), np.asarray(g_full[0, -1]), atol=2e-5)
    root = jnp.asarray([out[-1]])
    path = jnp.take(emb, root, axis=0)[:, None, :]
    dec = first_head_logits(context[b:b + 1], path)
    full = first_head_logits(g_full[:, -1], path)
    np.testing.assert_allclose(np.asarray(dec), np.asarray(full), atol=1e-4)


def test_per_row_stop_and_max_tokens(base):
  torch_model, hm = base
  cfg, params = _heads(hm, "medusa")
  n = 16
  refs = [_hf_greedy(torch_model, p, n) for p in PROMPTS]
  stop = refs[1][5]  # row 1 stops at its 6th token (maybe others earlier, also fine)
  st, outs = _run(hm, cfg, params, load_tree("mc_sim_7b_63"), PROMPTS, n, stop_ids=[stop])
  for r, o in zip(refs, outs):
    expect = r[:r.index(stop) + 1] if stop in r else r
    assert o == expect
  assert int(st.finish[1]) == STOP


def test_tree_deeper_than_heads_is_refused(base):
  _, hm = base
  cfg = HeadsConfig.for_base(hm.config, "hydra", num_heads=2, num_layers=1)
  params = init_heads(cfg, hm.config, hm.params, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="draft heads"):
    _run(hm, cfg, params, load_tree("chain_4"), PROMPTS[:1], 4)
