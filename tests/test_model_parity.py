"""The Flax decoder against transformers' PyTorch models, on tiny random checkpoints.

Every case builds a random HF model once per module (saved with `save_pretrained`, loaded
with our loader) and compares logits in f32: a full forward, prefill + step-by-step decode
through the KV cache with ragged (right-padded) prompts, jit against no-jit, causality, and
a bf16 compute-dtype run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hydra_jax.checkpoint.hf import load_hf_model  # noqa: E402
from hydra_jax.model import masks  # noqa: E402
from hydra_jax.model.kv_cache import init_cache  # noqa: E402
from hydra_jax.model.llama import LlamaModel  # noqa: E402
from hydra_jax.tools.testing import make_hf_model  # noqa: E402

# Parity bound: max |ours - torch| <= REL_TOL * max |torch logits|.
REL_TOL = 1e-4

# Llama-3 scaling with a tiny original context, so that test sequences (> 16) are "long" and
# most RoPE frequencies fall in the rescaled or interpolated bands.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    # GQA: 4 query heads share 2 kv heads.
    "llama_gqa": dict(model_type="llama", hidden_size=64, num_heads=4, num_kv_heads=2),
    # Llama-3 rope scaling, and multi-query attention (one kv head).
    "llama3_rope": dict(model_type="llama", hidden_size=64, num_heads=4, num_kv_heads=1,
                        rope_theta=50000.0, rope_scaling=LLAMA3_ROPE, seed=1),
    # Mistral with full attention (sliding_window=None), plain multi-head attention.
    "mistral": dict(model_type="mistral", hidden_size=48, num_heads=4, num_kv_heads=4,
                    intermediate_size=96, seed=2),
    # Qwen2: q/k/v biases and tied input/output embeddings.
    "qwen2": dict(model_type="qwen2", hidden_size=64, num_heads=4, num_kv_heads=2,
                  tie_word_embeddings=True, seed=3),
    # Linear rope scaling, and a head_dim that is not hidden_size / num_heads.
    "llama_linear_rope": dict(model_type="llama", hidden_size=32, num_heads=4, num_kv_heads=2,
                              head_dim=16, rope_scaling={"rope_type": "linear", "factor": 2.0},
                              seed=4),
}
# The four families the issue names; the decode test runs on these.
DECODE_CASES = ["llama_gqa", "llama3_rope", "mistral", "qwen2"]

BATCH, SEQ = 2, 40  # SEQ > 16 so that the Llama-3 scaling matters


@dataclasses.dataclass
class Case:
  name: str
  torch_model: Any
  config: Any
  params: Any
  model: LlamaModel
  forward: Callable  # jitted (params, tokens, positions) -> (logits, hidden)

  def torch_logits(self, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
      return self.torch_model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


class Zoo:
  """Builds each HF model on first use, once per module."""

  def __init__(self, root):
    self.root = root
    self.cases = {}

  def __getitem__(self, name: str) -> Case:
    if name not in self.cases:
      path = str(self.root / name)
      torch_model = make_hf_model(path, tokenizer=False, **CASES[name])
      loaded = load_hf_model(path, tokenizer=False)
      model = LlamaModel(loaded.config)

      @jax.jit
      def forward(params, tokens, positions):
        logits, hidden, _ = model.apply({"params": params}, tokens, positions)
        return logits, hidden

      self.cases[name] = Case(name, torch_model, loaded.config, loaded.params, model, forward)
    return self.cases[name]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  return Zoo(tmp_path_factory.mktemp("parity_models"))


def _tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, vocab, (batch, seq)).astype(np.int32)


def _positions(batch: int, seq: int) -> np.ndarray:
  return np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))


def _assert_close(ours, ref, rel=REL_TOL, what="logits"):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  scale = float(np.abs(ref).max())
  err = float(np.abs(ours - ref).max())
  assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel} x {scale:.3g}"


# --- full forward ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_full_forward_matches_transformers(zoo, name):
  case = zoo[name]
  tokens = _tokens(BATCH, SEQ, case.config.vocab_size)
  logits, hidden = case.forward(case.params, tokens, _positions(BATCH, SEQ))
  assert logits.dtype == jnp.float32
  _assert_close(logits, case.torch_logits(tokens))
  # The final hidden state (after the final norm) is what the draft heads read.
  with torch.no_grad():
    ref_hidden = case.torch_model.model(torch.from_numpy(tokens.astype(np.int64)))
  _assert_close(hidden, ref_hidden.last_hidden_state.numpy(), what="hidden")


def test_config_read_from_checkpoint(zoo):
  """The loader picked up what makes each case special (else parity would be vacuous)."""
  assert zoo["llama_gqa"].config.num_kv_heads == 2
  cfg = zoo["llama3_rope"].config
  assert cfg.rope_scaling_dict["rope_type"] == "llama3" and cfg.rope_theta == 50000.0
  assert cfg.num_kv_heads == 1
  cfg = zoo["qwen2"].config
  assert cfg.tie_word_embeddings and cfg.attention_bias
  assert "lm_head" not in zoo["qwen2"].params
  assert "bias" in zoo["qwen2"].params["layers_0"]["self_attn"]["qkv_proj"]
  assert zoo["mistral"].config.model_type == "mistral"
  cfg = zoo["llama_linear_rope"].config
  assert cfg.head_dim == 16 and cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}


def test_llama3_scaling_changes_logits(zoo):
  """Dropping the rope scaling must break parity beyond 16 tokens: the case tests it."""
  case = zoo["llama3_rope"]
  tokens = _tokens(1, SEQ, case.config.vocab_size, seed=5)
  plain = LlamaModel(case.config.replace(rope_scaling=None))
  wrong = jax.jit(lambda p: plain.apply({"params": p}, tokens, _positions(1, SEQ))[0])(
      case.params)
  ref = case.torch_logits(tokens)
  scale = np.abs(ref).max()
  # Positions 0 and 1 hardly rotate; far positions must disagree clearly.
  assert np.abs(np.asarray(wrong)[:, 17:] - ref[:, 17:]).max() > 100 * REL_TOL * scale


# --- KV cache: prefill then one token at a time ---------------------------------------------


@pytest.mark.parametrize("name", DECODE_CASES)
def test_prefill_then_decode_equals_full_forward(zoo, name):
  """Batch 2 with different prompt lengths (right padded), then teacher-forced decoding.

  Every step's logits must equal the full forward at the same position, both ours and
  transformers'. The short row's padding sits in its cache beyond its length after prefill,
  so this also checks that the mask hides it and the next writes overwrite it.
  """
  case = zoo[name]
  cfg = case.config
  prompt_lens = np.array([5, 11], np.int32)
  new_tokens, slots = 12, 32
  total = prompt_lens + new_tokens  # [17, 23]
  seqs = _tokens(BATCH, int(total.max()), cfg.vocab_size, seed=7)
  # Right padding: row 0 is pad after its own end. Causality makes the padded full forward
  # the reference for every row's own positions.
  for b in range(BATCH):
    seqs[b, total[b]:] = cfg.pad_token_id
  full, _ = case.forward(case.params, seqs, _positions(BATCH, seqs.shape[1]))
  full = np.asarray(full)
  ref = case.torch_logits(seqs)

  model = case.model

  @jax.jit
  def run(params, tokens, positions, cache):
    mask = masks.cache_causal_mask(cache.lengths, tokens.shape[1], cache.max_len)
    logits, _, cache = model.apply({"params": params}, tokens, positions, cache, mask)
    return logits, cache

  prompt = seqs[:, :prompt_lens.max()].copy()
  for b in range(BATCH):
    prompt[b, prompt_lens[b]:] = cfg.pad_token_id
  cache = init_cache(cfg, BATCH, slots)
  logits, cache = run(case.params, prompt, _positions(BATCH, prompt.shape[1]), cache)
  cache = cache.with_lengths(prompt_lens)
  for b in range(BATCH):
    n = prompt_lens[b]
    _assert_close(np.asarray(logits)[b, :n], full[b, :n], rel=1e-5, what=f"prefill row {b}")
    _assert_close(np.asarray(logits)[b, :n], ref[b, :n], what=f"prefill row {b} vs torch")

  for step in range(new_tokens):
    pos = np.asarray(cache.lengths)  # each row's next position
    tok = seqs[np.arange(BATCH), pos][:, None]
    logits, cache = run(case.params, tok, pos[:, None], cache)
    cache = cache.with_lengths(cache.lengths + 1)
    expected = full[np.arange(BATCH), pos]
    _assert_close(np.asarray(logits)[:, 0], expected, rel=1e-5, what=f"decode step {step}")
    _assert_close(np.asarray(logits)[:, 0], ref[np.arange(BATCH), pos],
                  what=f"decode step {step} vs torch")
  np.testing.assert_array_equal(np.asarray(cache.lengths), total)


# --- jit vs no-jit, causality, bf16 ---------------------------------------------------------


def test_jit_matches_no_jit(zoo):
  case = zoo["llama_gqa"]
  tokens = _tokens(BATCH, 16, case.config.vocab_size, seed=3)
  positions = _positions(BATCH, 16)
  jitted, _ = case.forward(case.params, tokens, positions)
  with jax.disable_jit():
    eager = case.model.apply({"params": case.params}, tokens, positions)[0]
  _assert_close(eager, jitted, rel=1e-5, what="eager vs jit")


def test_causality_gradient_is_exactly_zero_for_later_tokens(zoo):
  """d logits[t] / d embedding(x_s) == 0 exactly for s > t, and != 0 for s <= t.

  The tokens are distinct, so each embedding-table row belongs to one position; the model
  is untied, so the table only enters through the input embeddings.
  """
  case = zoo["llama_gqa"]
  seq = 12
  tokens = np.random.RandomState(0).permutation(case.config.vocab_size)[:seq]
  tokens = tokens.astype(np.int32)[None, :]
  w = jnp.asarray(np.random.RandomState(1).randn(case.config.vocab_size), jnp.float32)

  @jax.jit
  def grad_table(params, t):
    def f(table):
      p = dict(params, embed_tokens={"embedding": table})
      logits = case.model.apply({"params": p}, tokens, _positions(1, seq))[0]
      return jnp.sum(jnp.take(logits[0], t, axis=0) * w)
    return jax.grad(f)(params["embed_tokens"]["embedding"])

  for t in (0, 4, seq - 1):
    g = np.asarray(grad_table(case.params, t))[tokens[0]]  # [T, D], row s = position s
    assert np.all(g[t + 1:] == 0.0), f"logits at {t} depend on later tokens"
    assert np.all(np.abs(g[:t + 1]).max(axis=-1) > 0), f"logits at {t} ignore earlier tokens"


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_compute_is_finite_and_close(zoo, param_dtype):
  case = zoo["llama_gqa"]
  tokens = _tokens(BATCH, 24, case.config.vocab_size, seed=11)
  positions = _positions(BATCH, 24)
  params = jax.tree.map(lambda x: x.astype(param_dtype), case.params)
  model = LlamaModel(case.config, dtype=jnp.bfloat16, param_dtype=param_dtype)
  logits, hidden, _ = jax.jit(lambda p: model.apply({"params": p}, tokens, positions))(params)
  # bf16 products accumulate in f32, and activations stay f32 between them.
  assert logits.dtype == jnp.float32 and hidden.dtype == jnp.float32
  logits = np.asarray(logits)
  assert np.all(np.isfinite(logits))
  ref = case.torch_logits(tokens)
  # bf16 keeps ~3 significant digits; a few % of the logit scale is the expected error.
  _assert_close(logits, ref, rel=5e-2, what="bf16 logits")
  agree = np.mean(logits.argmax(-1) == ref.argmax(-1))
  assert agree >= 0.9, f"bf16 greedy tokens agree with f32 on only {agree:.0%} of positions"

