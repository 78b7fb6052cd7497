"""tie_check: a difference from AR greedy is a bf16 near-tie or a real mismatch.

The references we did not write: transformers' Llama run in bf16 is a second, independent
bf16 implementation of the same weights. Where its greedy output parts from ours, both are
correct bf16 argmaxes, so every such difference must be judged a tie. A token that is not the
argmax (the runner-up where the base is sure) must be judged real, in bf16 and in f32, and in
f32 nothing is ever a tie (the rounding is 0). Our own speculative decoding in bf16 may part
from our bf16 AR only at ties.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hydra_jax.decoding import api
from hydra_jax.decoding.tie_check import (CHUNK_SIZES, TIE_FACTOR, TieChecker,
                                          reproduction_sizes)
from hydra_jax.model.heads import HeadsConfig, init_heads
from hydra_jax.model.llama import TIED_HEAD_COPY
from hydra_jax.tools.bench import first_difference
from hydra_jax.tools.testing import make_hf_model

VOCAB = 512
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tie") / "model")
  # weight_std 0.1: logits spread ~0.5, so a few hundred greedy tokens meet some near-ties.
  torch_model = make_hf_model(path, vocab_size=VOCAB, weight_std=0.1, tokenizer=False,
                              max_position_embeddings=256)
  rng = np.random.default_rng(0)
  prompts = [[int(t) for t in rng.integers(4, VOCAB, size=int(rng.integers(3, 12)))]
             for _ in range(16)]
  model = api.load_model(path, dtype="bfloat16", tokenizer=False)
  ar = api.generate(model, prompts, NEW_TOKENS, mode="ar", batch_size=8, stop_ids=[])
  return dict(path=path, torch_model=torch_model, prompts=prompts, model=model, ar=ar,
              checker=TieChecker(model.config, model.params, "bfloat16"))


def _torch_greedy(torch_model, prompt, n):
  with torch.no_grad():
    out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def test_a_second_bf16_implementation_parts_from_ours_only_at_ties(setup):
  torch_bf16 = setup["torch_model"].to(torch.bfloat16)
  judged = []
  for prompt, ar in zip(setup["prompts"], setup["ar"]):
    theirs = _torch_greedy(torch_bf16, prompt, len(ar.output_ids))
    at = first_difference(theirs, ar.output_ids)
    if at is not None:
      judged.append(setup["checker"].classify(prompt, ar.output_ids, theirs, at))
  # Measured on the AMD EPYC and Xeon machines: 6 of 16 outputs part; at least one must, or
  # this test checks nothing.
  assert judged, "transformers' bf16 greedy never parted from ours: make the test bigger"
  for d in judged:
    assert d.rounding > 0
    assert d.tie, d
    # The first differing token is the AR argmax here, so the gap is the top-2 margin.
    assert d.gap == pytest.approx(d.top2_margin, abs=1e-6)


def _runner_up_at_a_sure_position(checker, prompt, output_ids):
  """(position, runner-up token) where the base's top-2 margin is largest."""
  best = None
  for p in range(0, len(output_ids), 4):
    prefix = list(prompt) + list(output_ids[:p])
    tokens = np.zeros((1, 128), np.int32)
    tokens[0, :len(prefix)] = prefix
    logits = np.asarray(checker._run(checker.params, tokens, len(prefix) - 1), np.float64)
    order = np.argsort(-logits)
    margin = logits[order[0]] - logits[order[1]]
    if best is None or margin > best[0]:
      best = (margin, p, int(order[1]))
  return best[1], best[2]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_wrong_token_is_a_real_mismatch(setup, dtype):
  model = setup["model"] if dtype == "bfloat16" else api.load_model(
      setup["path"], dtype=dtype, tokenizer=False)
  # Chunks of 2-4 tokens (not CHUNK_SIZES): each size compiles once, and none may reproduce.
  checker = TieChecker(model.config, model.params, dtype, chunk_sizes=(2, 4))
  prompt = setup["prompts"][0]
  ar = (setup["ar"][0] if dtype == "bfloat16" else
        api.generate(model, [prompt], NEW_TOKENS, mode="ar", stop_ids=[])[0])
  p, runner_up = _runner_up_at_a_sure_position(checker, prompt, ar.output_ids)
  wrong = list(ar.output_ids[:p]) + [runner_up]
  d = checker.classify(prompt, ar.output_ids, wrong, p, verify_tokens=3)
  assert (d.position, d.ar_token, d.spec_token) == (p, ar.output_ids[p], runner_up)
  assert d.gap == pytest.approx(d.top2_margin) and d.gap > 0
  assert not d.tie and d.gap > TIE_FACTOR * d.rounding
  assert d.reproduced_by_chunk is None  # no forward of any chunk size picks the runner-up
  if dtype == "float32":
    assert d.rounding == 0.0
  # An output that merely stops earlier has no token to judge.
  assert checker.classify(prompt, ar.output_ids, ar.output_ids[:p], p) is None


def test_our_speculative_bf16_output_parts_from_ar_only_at_ties(setup):
  model = setup["model"]
  hcfg = HeadsConfig.for_base(model.config, "hydra", num_heads=2, num_layers=1)
  heads = init_heads(hcfg, model.config, model.params, jax.random.PRNGKey(1))
  spec = api.generate(model, setup["prompts"], NEW_TOKENS, heads=(hcfg, heads), tree="greedy_7",
                      batch_size=8, stop_ids=[])
  for prompt, ar, sp in zip(setup["prompts"], setup["ar"], spec):
    at = first_difference(sp.output_ids, ar.output_ids)
    if at is not None:
      d = setup["checker"].classify(prompt, ar.output_ids, sp.output_ids, at)
      assert d.tie, d


def test_chunked_decode_is_the_full_forward_in_f32(setup):
  """The reproduction's decode (the generated tokens forwarded k at a time over a KV cache)
  computes the model: in f32 its logits equal the full forward's for every chunk size."""
  model = api.load_model(setup["path"], dtype="float32", tokenizer=False)
  checker = TieChecker(model.config, model.params, "float32")
  prompt = list(setup["prompts"][1])
  prefix = prompt + list(setup["ar"][1].output_ids[:20])
  tokens = np.zeros((1, 128), np.int32)
  tokens[0, :len(prefix)] = prefix
  full = np.asarray(checker._run(checker.run_params, tokens, len(prefix) - 1))
  for k in (1, 3, 7, max(CHUNK_SIZES), 20):
    np.testing.assert_allclose(checker.chunked_logits(len(prompt), prefix, k), full, atol=2e-4,
                               err_msg=str(k))
  with pytest.raises(ValueError, match="chunk size 21"):
    checker.chunked_logits(len(prompt), prefix, 21)


def test_the_reproduction_tries_the_verify_size_first_and_a_bounded_few():
  """One compile per chunk size: the method's own verify size first (the row count that
  picked the speculative token), then CHUNK_SIZES, never k = 1 (that is AR) nor past the
  generated tokens, each once."""
  assert reproduction_sizes(100, verify_tokens=5) == [5, 2, 4, 8, 16]
  assert reproduction_sizes(100, verify_tokens=8) == [8, 2, 4, 16]
  assert reproduction_sizes(100, verify_tokens=64) == [64, 2, 4, 8, 16]
  assert reproduction_sizes(6, verify_tokens=8) == [2, 4]
  assert reproduction_sizes(100, verify_tokens=1) == [2, 4, 8, 16]
  assert reproduction_sizes(1) == []
  assert len(reproduction_sizes(10 ** 6, verify_tokens=7)) <= len(CHUNK_SIZES) + 1


def test_the_checks_forwards_round_as_the_verify_does_through_a_tied_head_copy(tmp_path):
  """On a CPU a bf16 speculative verify computes a tied model's LM head through its [E, V]
  copy (DecodeEngine.copy_tied_head); the checker's forwards, which stand for it, must read
  the same copy (a zero copy zeroes their logits), its f32 reference the embedding."""
  path = str(tmp_path / "tied")
  make_hf_model(path, vocab_size=VOCAB, tie_word_embeddings=True, tokenizer=False)
  model = api.load_model(path, dtype="bfloat16", tokenizer=False)
  checker = TieChecker(model.config, model.params, "bfloat16", chunk_sizes=(2,))
  if jax.default_backend() != "cpu":
    assert checker.run_params is model.params
    return
  copy = checker.run_params[TIED_HEAD_COPY]
  np.testing.assert_array_equal(np.asarray(copy),
                                np.asarray(model.params["embed_tokens"]["embedding"]).T)
  prefix = list(range(4, 20))
  tokens = np.zeros((1, 128), np.int32)
  tokens[0, :len(prefix)] = prefix
  assert np.any(np.asarray(checker._run(checker.run_params, tokens, len(prefix) - 1)) != 0)
  checker.run_params = {**checker.run_params, TIED_HEAD_COPY: jnp.zeros_like(copy)}
  assert np.all(np.asarray(checker._run(checker.run_params, tokens, len(prefix) - 1)) == 0)
  assert np.all(checker.chunked_logits(8, prefix, 2) == 0)
