"""Autoregressive decoding against transformers' PyTorch `generate(do_sample=False)`.

Tiny random models (llama with GQA, qwen2 with q/k/v bias and tied embeddings) are built once
per module; every batch shape here compiles once and is reused by the later tests.
"""

import dataclasses

import numpy as np
import pytest
import torch

from hydra_jax.decoding.engine import TRACE_COUNTS
from hydra_jax.decoding.api import (DecodeInputError, encode_prompts, generate, get_engine,
                                    load_model)
from hydra_jax.tools.testing import SIMPLE_CHAT_TEMPLATE, make_hf_model, make_tokenizer

MAX_NEW = 16
EOS = 2


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llama"))
  torch_model = make_hf_model(path, "llama", num_heads=4, num_kv_heads=2, seed=1)
  return torch_model, load_model(path)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("qwen2"))
  # Tied random embeddings echo the input at std 0.1; 0.2 gives varied continuations.
  torch_model = make_hf_model(path, "qwen2", num_heads=4, num_kv_heads=2, seed=2,
                              tie_word_embeddings=True, weight_std=0.2)
  return torch_model, load_model(path)


def _hf_greedy(torch_model, ids, max_new, eos=(EOS,)):
  with torch.no_grad():
    out = torch_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                               max_new_tokens=max_new, do_sample=False,
                               eos_token_id=list(eos), pad_token_id=3)
  return out[0, len(ids):].tolist()


def _expected_reason(hf_ids, max_new, stop):
  if hf_ids and hf_ids[-1] == EOS:
    return "eos"
  if hf_ids and hf_ids[-1] in stop:
    return "stop"
  assert len(hf_ids) == max_new
  return "length"


def _prompts(seed, lengths, vocab=512):
  rng = np.random.default_rng(seed)
  return [rng.integers(4, vocab, n).tolist() for n in lengths]


def _stop_id_from(continuation):
  """A token that first appears a few steps into the continuation: stopping there is early."""
  for i in range(3, len(continuation) - 2):
    if continuation[i] not in continuation[:i] and continuation[i] != EOS:
      return continuation[i]
  pytest.skip("greedy continuation too repetitive to pick a stop id")


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_greedy_matches_transformers(which, request):
  torch_model, model = request.getfixturevalue(which)
  prompts = _prompts(10, [7, 13, 3, 10])
  if which == "llama":
    prompts[1] = "First Citizen: Before we proceed"  # a text prompt through the tokenizer
  stop = _stop_id_from(_hf_greedy(torch_model, _prompts(10, [7])[0], MAX_NEW))

  # Batch 3 with prompts of different lengths (the last batch padded with 2 dummy rows),
  # then batch 1; each row against HF on its own unpadded prompt.
  for batch_size in (3, 1):
    results = generate(model, prompts, MAX_NEW, stop_ids=[stop], batch_size=batch_size)
    assert len(results) == len(prompts)
    for r in results:
      hf = _hf_greedy(torch_model, r.prompt_ids, MAX_NEW, eos=(EOS, stop))
      assert r.output_ids == hf, (batch_size, r.prompt_ids)
      assert r.new_tokens == len(hf)
      assert r.finish_reason == _expected_reason(hf, MAX_NEW, {stop})
      assert r.steps == r.new_tokens - 1  # the first token comes from the prefill logits
    assert results[0].finish_reason == "stop" and results[0].new_tokens < MAX_NEW  # early stop
    assert results[0].prompt_ids == prompts[0]
    assert isinstance(results[1].text, str)


def test_sampling_same_seed_same_output_and_top_k_1_is_greedy(llama):
  _, model = llama
  prompts = _prompts(11, [5, 9, 12])
  kw = dict(batch_size=3, temperature=1.5)
  a = generate(model, prompts, MAX_NEW, seed=7, **kw)
  b = generate(model, prompts, MAX_NEW, seed=7, **kw)
  c = generate(model, prompts, MAX_NEW, seed=8, **kw)
  assert [r.output_ids for r in a] == [r.output_ids for r in b]
  assert [r.output_ids for r in a] != [r.output_ids for r in c]
  greedy = generate(model, prompts, MAX_NEW, batch_size=3)
  top1 = generate(model, prompts, MAX_NEW, batch_size=3, temperature=1.0, top_k=1, seed=3)
  assert [r.output_ids for r in top1] == [r.output_ids for r in greedy]


def test_second_call_does_not_recompile(llama):
  _, model = llama
  engine = get_engine(model)
  generate(model, _prompts(12, [6, 11, 2]), 20, batch_size=3)
  traces, compiled = dict(TRACE_COUNTS), len(engine._compiled)
  # Another max_new_tokens, other prompts of the same padded length, other knobs and stop ids.
  out = generate(model, _prompts(13, [15, 1, 8]), 37, batch_size=3, temperature=0.8,
                 top_p=0.9, top_k=20, seed=4, stop_ids=[5, 6, 7])
  assert dict(TRACE_COUNTS) == traces and len(engine._compiled) == compiled
  assert all(r.compile_s == 0.0 for r in out)
  # A new shape (batch 2) compiles once, and traces the prefill and the loop once each.
  generate(model, _prompts(14, [6, 11]), 20, batch_size=2)
  new = {k: TRACE_COUNTS[k] - traces.get(k, 0) for k in ("prefill", "loop")}
  assert new == {"prefill": 1, "loop": 1} and len(engine._compiled) == compiled + 1


def test_cache_full_and_max_new_tokens_exact(llama):
  torch_model, model = llama
  cache_len = 32
  prompts = _prompts(14, [10, 25, 31])
  results = generate(model, prompts, 100, cache_len=cache_len, batch_size=3, stop_ids=[])
  for r in results:
    room = cache_len - len(r.prompt_ids)  # prompt + output never exceed the cache
    hf = _hf_greedy(torch_model, r.prompt_ids, room)
    assert r.output_ids == hf
    assert r.finish_reason == ("eos" if hf[-1] == EOS else "cache_full")
  assert results[2].new_tokens == 1 and results[2].steps == 0

  # max_new_tokens is honoured exactly, down to 1 (a prefill-only answer).
  # (Same prompts, so the same compiled shapes.)
  for n in (1, 5):
    for r in generate(model, prompts, n, cache_len=cache_len, batch_size=3)[:2]:
      hf = _hf_greedy(torch_model, r.prompt_ids, n)
      assert r.output_ids == hf and r.new_tokens == len(hf) <= n
      assert r.finish_reason == _expected_reason(hf, n, set())


def test_chat_template_prompt(llama):
  _, model = llama
  tok = make_tokenizer(512, SIMPLE_CHAT_TEMPLATE)
  chat_model = dataclasses.replace(model, tokenizer=tok)
  [ids] = encode_prompts(chat_model, "hear me speak", chat=True)
  assert ids == tok("USER: hear me speak ASSISTANT:", add_special_tokens=False)["input_ids"]
  with pytest.raises(DecodeInputError, match="no chat template"):
    generate(model, "hear me speak", 4, chat=True)


def _emit_reference(prompt_len, n, new, count, max_new, cache_len, eos, stop, reserve=1):
  """The stop rules one token at a time, in plain Python. A row is out of room when its
  output fills the cache, or when the next step's `reserve` cache writes (from the last
  token's slot, prompt + output - 1) would not fit."""
  out = []
  for tok in new[:count]:
    if n + len(out) >= max_new or prompt_len + n + len(out) >= cache_len:
      break
    out.append(tok)
    if tok in eos or tok in stop:
      return out, "eos" if tok in eos else "stop"
  total = n + len(out)
  no_room = prompt_len + total >= cache_len or prompt_len + total - 1 + reserve > cache_len
  reason = "length" if total >= max_new else "cache_full" if no_room else "running"
  return out, reason


@pytest.mark.parametrize("reserve", [1, 5])
def test_emit_tokens_multi_token_rules(reserve):
  """Several tokens per row at once (what a speculative step emits) against the plain rules;
  reserve 5: the rows of a speculative loop whose verify writes a 5-node tree."""
  import jax
  import jax.numpy as jnp
  from hydra_jax.decoding.state import DecodeState, FINISH_REASONS, StopCriteria, emit_tokens
  from hydra_jax.model.kv_cache import init_cache
  from hydra_jax.model.config import ModelConfig
  rng = np.random.default_rng(0)
  b, m, cache_len, max_new = 64, 4, 24, 10
  eos, stop = (2,), (5, 6)
  cfg = ModelConfig(vocab_size=8, hidden_size=4, intermediate_size=4, num_layers=1, num_heads=1,
                    num_kv_heads=1, head_dim=4)
  prompt_len = rng.integers(1, 20, b)
  n = np.minimum(rng.integers(0, 8, b), cache_len - prompt_len - 1)
  new = rng.integers(0, 8, (b, m))
  count = rng.integers(0, m + 1, b)
  prev = rng.integers(10, 20, (b, cache_len))  # earlier output must survive
  zeros = jnp.zeros((b,), jnp.int32)
  state = DecodeState(step=jnp.zeros((), jnp.int32), done=jnp.zeros((b,), bool),
                      tokens=jnp.asarray(prev, jnp.int32), num_generated=jnp.asarray(n, jnp.int32),
                      steps_per_row=zeros, finish=zeros, last_token=zeros,
                      prompt_lengths=jnp.asarray(prompt_len, jnp.int32), row_ids=zeros,
                      cache=init_cache(cfg, b, cache_len), rng=jax.random.key(0))
  crit = StopCriteria.make(max_new, eos, stop)
  out = emit_tokens(state, jnp.asarray(new), jnp.asarray(count), crit, reserve)
  for r in range(b):
    kept, reason = _emit_reference(prompt_len[r], n[r], new[r].tolist(), count[r], max_new,
                                   cache_len, eos, stop, reserve)
    got_n = int(out.num_generated[r])
    assert got_n == n[r] + len(kept)
    assert np.asarray(out.tokens[r, n[r]:got_n]).tolist() == kept
    np.testing.assert_array_equal(out.tokens[r, :n[r]], prev[r, :n[r]])
    np.testing.assert_array_equal(out.tokens[r, got_n:], prev[r, got_n:])
    assert FINISH_REASONS[int(out.finish[r])] == reason
    assert bool(out.done[r]) == (reason != "running")
    if kept:
      assert int(out.last_token[r]) == kept[-1]


def test_bad_input_is_a_clear_error(llama):
  _, model = llama
  with pytest.raises(DecodeInputError, match="prompt 1 is empty"):
    generate(model, ["hello", ""], 4)
  with pytest.raises(DecodeInputError, match="prompt 0 is empty"):
    generate(model, [[]], 4)
  with pytest.raises(DecodeInputError, match="--cache-len"):
    generate(model, [list(range(4, 40))], 4, cache_len=32)  # 36 tokens, 32 slots
  with pytest.raises(DecodeInputError, match="max_position_embeddings"):
    generate(model, [[5] * 600], 4)  # the model has 512 positions
  with pytest.raises(DecodeInputError, match="max_position_embeddings"):
    generate(model, [[5, 6]], 4, cache_len=1024)
  with pytest.raises(DecodeInputError, match="outside the vocabulary"):
    generate(model, [[5, 512]], 4)
  with pytest.raises(DecodeInputError, match="max_new_tokens"):
    generate(model, [[5, 6]], 0)
  with pytest.raises(DecodeInputError, match="top_p"):
    generate(model, [[5, 6]], 4, top_p=0.0)
