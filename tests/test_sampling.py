"""Sampling knobs against closed-form numpy: softmax(logits / T), exact top-k and nucleus sets.

The statistical tests draw 20k samples with a fixed seed and compare frequencies to the
closed-form distribution with a chi-square test at the 0.1% level (and a TV bound).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax.decoding.sampling import (ARGMAX_BLOCK, SamplingParams, process_logits, sample,
                                         vocab_argmax)

NUM_DRAWS = 20_000

# Jitted once: the knobs are traced, so every parametrization below reuses one compile.
_process = jax.jit(process_logits)
_sample = jax.jit(sample)


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _nucleus_np(logits, temperature, top_k, top_p):
  """The kept set in float64: top-k by logit, then the smallest prefix with mass >= p."""
  scaled = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-scaled)
  if top_k > 0:
    order = order[:top_k]
  probs = _softmax(scaled[order])
  n = int(np.searchsorted(np.cumsum(probs), top_p) + 1) if top_p < 1 else len(order)
  return set(order[:min(n, len(order))].tolist())


def _chi2_critical(df, z=3.090):
  """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: the 99.9% level)."""
  return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _draw(logits_V, temperature, top_k, top_p, seed=0):
  logits = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32)[None, :], (NUM_DRAWS, len(logits_V)))
  toks = _sample(logits, jax.random.key(seed), temperature, top_k, top_p)
  return np.bincount(np.asarray(toks), minlength=len(logits_V))


def _assert_matches(counts, expected_probs):
  support = expected_probs > 0
  assert counts[~support].sum() == 0, "sampled a token outside the kept set"
  exp = expected_probs[support] * counts.sum()
  chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
  df = int(support.sum()) - 1
  assert chi2 < _chi2_critical(df), (chi2, df)
  tv = 0.5 * np.abs(counts / counts.sum() - expected_probs).sum()
  assert tv < 0.02, tv


LOGITS = np.array([1.2, -0.3, 0.5, 2.0, -1.5, 0.0, 0.9, -0.7])


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.8])
def test_frequencies_match_softmax_over_temperature(temperature):
  counts = _draw(LOGITS, temperature, 0, 1.0)
  _assert_matches(counts, _softmax(LOGITS / temperature))


def test_top_k_and_top_p_frequencies_match_renormalised_nucleus():
  temperature, top_k, top_p = 1.3, 5, 0.8
  kept = sorted(_nucleus_np(LOGITS, temperature, top_k, top_p))
  assert 1 < len(kept) < top_k  # both filters bite
  expected = np.zeros(len(LOGITS))
  expected[kept] = _softmax(LOGITS[kept] / temperature)
  _assert_matches(_draw(LOGITS, temperature, top_k, top_p, seed=1), expected)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("top_k", [0, 7])
def test_process_logits_keeps_exactly_the_nucleus(temperature, top_k, top_p):
  logits = np.random.default_rng(0).normal(0, 2, (6, 64)).astype(np.float32)
  out = np.asarray(_process(jnp.asarray(logits), temperature, top_k, top_p))
  for row in range(logits.shape[0]):
    kept = set(np.flatnonzero(np.isfinite(out[row])).tolist())
    assert kept == _nucleus_np(logits[row], temperature, top_k, top_p)
    idx = sorted(kept)
    np.testing.assert_allclose(out[row, idx], logits[row, idx] / temperature, rtol=1e-6)


def test_top_p_never_samples_outside_the_nucleus():
  logits = np.random.default_rng(1).normal(0, 1.5, (64,)).astype(np.float32)
  kept = _nucleus_np(logits, 1.0, 0, 0.6)
  counts = _draw(logits, 1.0, 0, 0.6, seed=2)
  assert set(np.flatnonzero(counts).tolist()) <= kept
  assert len(set(np.flatnonzero(counts).tolist())) == len(kept)  # and all of it is reachable


def test_filters_off_is_plain_temperature_scaling():
  logits = np.random.default_rng(2).normal(0, 1, (3, 50)).astype(np.float32)
  out = np.asarray(_process(jnp.asarray(logits), 0.8, 0, 1.0))
  np.testing.assert_allclose(out, logits / 0.8, rtol=1e-6)


def test_greedy_and_top_k_1_are_argmax():
  logits = jnp.asarray(np.random.default_rng(3).normal(0, 1, (16, 100)), jnp.float32)
  argmax = np.argmax(np.asarray(logits), axis=-1)
  key = jax.random.key(0)
  np.testing.assert_array_equal(_sample(logits, key, 0.0), argmax)
  np.testing.assert_array_equal(_sample(logits, key, 1.0, top_k=1), argmax)
  # At temperature 0 the processed distribution is the point mass on the argmax.
  point = np.asarray(_process(logits, 0.0, 0, 1.0))
  np.testing.assert_array_equal(np.argmax(point, -1), argmax)
  assert (np.isfinite(point).sum(-1) == 1).all()


def test_same_key_same_draws_and_per_row_keys():
  logits = jnp.zeros((4, 1000), jnp.float32)
  key = jax.random.key(5)
  a, b = _sample(logits, key, 1.0), _sample(logits, key, 1.0)
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(_sample(logits, jax.random.key(6), 1.0)) != np.asarray(a)).any()
  # A batch of per-row keys: row r's draw depends only on its own key.
  keys = jax.random.split(jax.random.key(7), 4)
  full = np.asarray(_sample(logits, keys, 1.0))
  alone = np.asarray(_sample(logits[1:2], keys[1:2], 1.0))
  assert full[1] == alone[0]


def test_changing_knobs_does_not_recompile():
  fn = jax.jit(lambda logits, key, s: sample(logits, key, s.temperature, s.top_k, s.top_p))
  logits = jnp.zeros((2, 32), jnp.float32)
  for t, k, p in [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.2, 0, 0.3), (0.5, 3, 0.9)]:
    fn(logits, jax.random.key(0), SamplingParams.make(t, k, p))
  assert fn._cache_size() == 1


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0),
                                 dict(top_p=1.5)])
def test_bad_knobs_are_refused(bad):
  with pytest.raises(ValueError, match=next(iter(bad))):
    SamplingParams.make(**bad)


@pytest.mark.parametrize("vocab", [7, ARGMAX_BLOCK, 3 * ARGMAX_BLOCK, 1000, 49152])
def test_vocab_argmax_is_numpys_argmax(vocab):
  """The blocked argmax picks what numpy's argmax picks: the first maximal index, also for
  ties across and inside blocks, rows of -inf, a vocabulary that is not a block multiple, and
  NaN (ranked highest, the first one wins)."""
  rng = np.random.default_rng(vocab)
  rows = [rng.standard_normal(vocab).astype(np.float32) for _ in range(3)]
  tie = np.zeros(vocab, np.float32)  # all equal: index 0
  late = np.full(vocab, -1.0, np.float32)
  late[[vocab - 1, vocab // 2]] = 5.0  # the same max twice: the earlier one
  rows += [tie, late, np.full(vocab, -np.inf, np.float32)]
  nan = rng.standard_normal(vocab).astype(np.float32)
  nan[[vocab - 1, max(vocab // 3, 1)]] = np.nan
  rows.append(nan)
  x = np.stack(rows)
  got = np.asarray(jax.jit(vocab_argmax)(jnp.asarray(x)))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
  # any leading shape, as the verify's [B, N, V] logits
  np.testing.assert_array_equal(np.asarray(vocab_argmax(jnp.asarray(x.reshape(1, 7, vocab)))),
                                np.argmax(x, axis=-1)[None])
