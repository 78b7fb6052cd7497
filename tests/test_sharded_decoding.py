"""Sharded decoding on 8 fake CPU devices: the tokens of the unsharded run and of transformers.

References we did not write: transformers' PyTorch greedy `generate` on the same random
weights, and our own unsharded run (for sampling, where transformers draws differently).
Models: llama (GQA, Llama-3 rope scaling; 2 kv heads, so tensor=4 / 8 replicate them), qwen2
(q/k/v bias, tied embeddings) and mistral (4 kv heads of 8 query heads: split on tensor=2 / 4).
Batches of 3 prompts of different lengths, so data=2 / 8 pad them with rows that start done.

The default suite runs a representative subset; `-m slow` runs the whole matrix (3 models x
4 meshes x AR and the three head kinds on mc_sim_7b_63, and exact sampling on every mesh).
"""

import warnings

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh

from hydra_jax.decoding import collectives
from hydra_jax.decoding import api
from hydra_jax.decoding.api import DecodeInputError, generate, load_model
from hydra_jax.parallel.mesh import MeshError, make_decode_mesh
from hydra_jax.model.heads import HeadsConfig, init_heads
from hydra_jax.tools.testing import make_hf_model, perturb_params

MESHES = ("data=2,tensor=2", "data=1,tensor=8", "data=2,tensor=4", "data=8,tensor=1")
MODES = ("ar", "medusa", "hydra", "hydra++")
PROMPTS = [[5, 17, 42, 9, 100, 7, 63], [11, 12], [200, 201, 202, 203, 204]]
MAX_NEW = 12
EOS = 2

_MODEL_KW = {
    "llama": dict(num_heads=4, num_kv_heads=2,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                  rope_theta=500000.0),
    "qwen2": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
    "mistral": dict(num_heads=8, num_kv_heads=4),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(torch model, our HFModel, heads by kind), each model built once, on first use."""
  cache = {}

  def get(model_type):
    if model_type not in cache:
      path = str(tmp_path_factory.mktemp(model_type))
      torch_model = make_hf_model(path, model_type, vocab_size=256, hidden_size=64,
                                  intermediate_size=128, num_layers=2, weight_std=0.15,
                                  tokenizer=False, **_MODEL_KW[model_type])
      cache[model_type] = (torch_model, load_model(path, tokenizer=False), {})
    return cache[model_type]
  return get


def _heads(hm, kinds, arch):
  """Random heads with every leaf perturbed (zero-initialised blocks would compute nothing)."""
  if arch not in kinds:
    cfg = HeadsConfig.for_base(hm.config, arch, num_heads=4, num_layers=2)
    params = init_heads(cfg, hm.config, hm.params, jax.random.PRNGKey(1))
    kinds[arch] = (cfg, perturb_params(params, 2, 0.05))
  return kinds[arch]


def _hf_greedy(torch_model, ids, n):
  with torch.no_grad():
    out = torch_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                               max_new_tokens=n, do_sample=False, eos_token_id=[EOS],
                               pad_token_id=3)
  return out[0, len(ids):].tolist()


_RUNS = {}


def _mesh(spec):
  """A mesh over the first data x tensor devices (data=2,tensor=2 uses 4 of the 8; the string
  form alone must name them all)."""
  if spec is None:
    return None
  sizes = dict((a, int(n)) for a, n in (p.split("=") for p in spec.split(",")))
  return make_decode_mesh(spec, devices=jax.devices()[:sizes["data"] * sizes["tensor"]])


def _decode(models, model_type, mode, mesh=None, prompts=PROMPTS, **kw):
  """Output ids per prompt of `generate` (memoised: the unsharded references are shared)."""
  key = (model_type, mode, mesh, str(prompts), tuple(sorted(kw.items())))
  mesh = _mesh(mesh)
  if key not in _RUNS:
    _, hm, kinds = models(model_type)
    heads = None if mode == "ar" else _heads(hm, kinds, mode)
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message="decode mesh: some dimensions")
      results = generate(hm, prompts, MAX_NEW, heads=heads, tree="mc_sim_7b_63", mesh=mesh, **kw)
    _RUNS[key] = [r.output_ids for r in results]
  return _RUNS[key]


def _check_tokens(models, model_type, mode, mesh):
  torch_model = models(model_type)[0]
  sharded = _decode(models, model_type, mode, mesh)
  assert sharded == _decode(models, model_type, mode)
  assert sharded == [_hf_greedy(torch_model, p, MAX_NEW) for p in PROMPTS]


@pytest.mark.parametrize("model_type,mode,mesh", [
    ("llama", "ar", "data=2,tensor=2"), ("llama", "hydra++", "data=2,tensor=4")])
def test_sharded_greedy_tokens(models, model_type, mode, mesh):
  _check_tokens(models, model_type, mode, mesh)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_sharded_greedy_tokens_matrix(models, model_type, mode, mesh):
  _check_tokens(models, model_type, mode, mesh)


def test_sharded_prefill_is_traced_once_per_shape(models):
  """The prefill's trace gives both the program and the state's shape (whose shardings the
  loop takes): one trace per new shape, not one for the shape and one for the program."""
  from hydra_jax.decoding.engine import TRACE_COUNTS
  _, hm, _ = models("llama")
  before = TRACE_COUNTS["prefill"]
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="decode mesh: some dimensions")
    out = generate(hm, PROMPTS[:2], 4, batch_size=2, cache_len=96, mesh=_mesh("data=2,tensor=2"))
  assert TRACE_COUNTS["prefill"] - before == 1
  assert [r.output_ids for r in out] == [o[:4] for o in _decode(models, "llama", "ar")[:2]]


def _check_exact_sampling(models, mesh):
  kw = dict(temperature=0.8, top_p=0.9, seed=7, accept="exact")
  sharded = _decode(models, "llama", "hydra", mesh, **kw)
  assert sharded == _decode(models, "llama", "hydra", **kw)
  assert any(len(set(o)) > 3 for o in sharded)  # really sampled, not a stuck greedy loop


def test_exact_sampling_same_on_a_mesh(models):
  _check_exact_sampling(models, "data=2,tensor=4")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_exact_sampling_same_on_every_mesh(models, mesh):
  _check_exact_sampling(models, mesh)


# --- what a step communicates ------------------------------------------------------------------


def _weight_views(shape):
  """A weight's shape and every view of it a matmul may read (adjacent dims merged, and the
  2-D transposes), without size-1 dims."""
  shape = tuple(d for d in shape if d > 1)
  views = {shape}
  for i in range(len(shape)):
    for j in range(i + 2, len(shape) + 1):
      merged = shape[:i] + (int(np.prod(shape[i:j])),) + shape[j:]
      views.add(merged)
  return views | {v[::-1] for v in views if len(v) == 2}


def _dims(shape_text):
  inner = shape_text[shape_text.index("[") + 1:shape_text.index("]")]
  return tuple(int(d) for d in inner.split(",") if d and int(d) > 1)


def _assert_no_weight_gathers(found, params, heads_params=None):
  weights = [x.shape for x in jax.tree_util.tree_leaves((params, heads_params)) if x.ndim >= 2]
  views = set().union(*(_weight_views(s) for s in weights))
  for c in found:  # in the loop, or hoisted out of it (a whole copy kept on every device)
    if c.op == "all-gather" and c.where != "branch":
      assert _dims(c.shape) not in views, f"the decode loop all-gathers a whole weight: {c}"


@pytest.mark.parametrize("mode", ["ar", "hydra++"])
def test_step_collectives_are_tensor_parallel_activations(models, mode):
  """mistral on data=2,tensor=4, one row per data shard: a step all-reduces activations and
  never gathers a weight or a KV cache, in the loop or before it."""
  _, hm, kinds = models("mistral")
  prompts = PROMPTS[:2]
  assert _decode(models, "mistral", mode, "data=2,tensor=4", prompts) == _decode(
      models, "mistral", mode, prompts=prompts)
  heads_cfg, heads_params = (None, None) if mode == "ar" else _heads(hm, kinds, mode)
  mesh = _mesh("data=2,tensor=4")
  [engine] = [e for e in api._ENGINES.values()
              if e.mesh == mesh and e.cfg == hm.config and e.speculative == (mode != "ar")
              and (mode == "ar" or e.models.heads_cfg == heads_cfg)]
  found = engine.loop_collectives()
  _assert_no_weight_gathers(found, hm.params, heads_params)
  cfg = hm.config
  cache_rows = 2 * cfg.num_kv_heads
  for c in found:
    assert cache_rows not in _dims(c.shape) or cfg.head_dim not in _dims(c.shape), c
  every_step = [c for c in found if c.where in ("body", "condition")]
  d = cfg.hidden_size
  activation_reduces = [c for c in every_step if c.op == "all-reduce" and _dims(c.shape)[-1:] == (d,)]
  if mode == "ar":
    # Per layer: attention out and MLP out (row-parallel o_proj / down_proj) + the
    # vocab-sharded embedding lookup; one row per device of [1, D].
    assert len(activation_reduces) == 2 * cfg.num_layers + 1
    assert all(c.bytes == d * 4 for c in activation_reduces)
    others = [c for c in every_step if c not in activation_reduces]
    assert sum(c.bytes for c in others) <= 256, collectives.markdown_table(others)
  else:
    assert len(activation_reduces) >= 2 * cfg.num_layers + 1
    assert collectives.step_bytes(found) < 64 * (d + cfg.vocab_size) * 4 * 4


# --- bad meshes --------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh,match", [
    ("data=3,tensor=2", "uses 6 devices but there are 8"),
    ("data=2,pipeline=4", "unknown axis 'pipeline'"),
    ("fsdp=8", "fsdp would all-gather every weight"),
    ("data=2,tensor", "is not AXIS=SIZE"),
    ("data=2,data=4", "given twice"),
    ("data=0,tensor=8", "sizes must be >= 1"),
])
def test_bad_meshes_are_refused(models, mesh, match):
  hm = models("llama")[1]
  with pytest.raises(DecodeInputError, match=match):
    generate(hm, PROMPTS, 4, mesh=mesh)


def test_one_device_mesh_is_refused(models):
  hm = models("llama")[1]
  one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))
  with pytest.raises(DecodeInputError, match="one device"):
    generate(hm, PROMPTS, 4, mesh=one)
  with pytest.raises(MeshError, match="only one device"):
    make_decode_mesh("data=1,tensor=1", devices=jax.devices()[:1])
  fsdp = Mesh(np.asarray(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  with pytest.raises(DecodeInputError, match="fsdp=8"):
    generate(hm, PROMPTS, 4, mesh=fsdp)


def test_decode_cli_bad_mesh_exits_2_with_one_line(capsys):
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "decode.py")
  spec = importlib.util.spec_from_file_location("decode_cli_mesh", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for bad in ("data=3,tensor=3", "data=2,model=4"):
    code = module.main(["--model", "/nonexistent", "--prompt", "x", "--max-new-tokens", "2",
                        "--mesh", bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("decode.py: error: mesh"), err
