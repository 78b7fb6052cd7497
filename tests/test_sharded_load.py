"""Loading straight into shards equals the unsharded loader, reading only each device's slices.

Reference: hf.load_params / gguf.load_gguf_model (whole tensors, one device), themselves
checked against transformers elsewhere (test_checkpoint, test_gguf).
"""

import collections
import warnings

import jax
import numpy as np
import pytest

from hydra_jax.checkpoint import sharded_load
from hydra_jax.checkpoint.hf import CheckpointError, load_hf_model
from hydra_jax.parallel.mesh import decode_shardings, make_decode_mesh
from hydra_jax.tools.testing import make_hf_model

MESHES = ("data=1,tensor=8", "data=2,tensor=4", "data=4,tensor=2")


def _assert_same(ref_params, params, what):
  ref = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(ref_params))
  got = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(params))
  assert set(ref) == set(got), what
  for k in ref:
    assert got[k].dtype == ref[k].dtype, (what, k)
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=f"{what} {k}")


def _load(path, spec, **kw):
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="decode mesh: some dimensions")
    return sharded_load.load_model_sharded(path, make_decode_mesh(spec), tokenizer=False, **kw)


@pytest.mark.parametrize("model_type,kw", [
    ("llama", dict(num_heads=8, num_kv_heads=4)),  # kv heads split on tensor=2 / 4
    ("qwen2", dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True, torch_dtype="bfloat16")),
])
def test_safetensors_sharded_equals_unsharded(tmp_path, model_type, kw):
  path = str(tmp_path)
  make_hf_model(path, model_type, vocab_size=256, hidden_size=64, intermediate_size=128,
                num_layers=2, tokenizer=False, **kw)
  dtype = "bfloat16" if kw.get("torch_dtype") else "float32"
  import jax.numpy as jnp
  ref = load_hf_model(path, param_dtype=jnp.dtype(dtype), tokenizer=False)
  for spec in MESHES:
    m = _load(path, spec, param_dtype=jnp.dtype(dtype))
    _assert_same(ref.params, m.params, f"{model_type} {spec}")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      want, _ = decode_shardings(m.config, make_decode_mesh(spec), jnp.dtype(dtype))
    for x, s in zip(jax.tree_util.tree_leaves(m.params), jax.tree_util.tree_leaves(want)):
      assert x.sharding == s


class _CountingSource(sharded_load.SafetensorsSource):
  def __init__(self, path):
    super().__init__(path)
    self.reads = collections.defaultdict(list)

  def read(self, key, box):
    block = super().read(key, box)
    self.reads[key].append(block.size)
    return block


def test_each_device_reads_only_its_slices(tmp_path):
  path = str(tmp_path)
  make_hf_model(path, "llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                num_layers=1, num_heads=8, num_kv_heads=8, tokenizer=False)
  cfg = load_hf_model(path, tokenizer=False).config
  mesh = make_decode_mesh("data=1,tensor=8")
  source = _CountingSource(path)
  shardings, _ = decode_shardings(cfg, mesh)
  params = sharded_load.load_params_sharded(source, cfg, shardings)
  full = {e[1]: int(np.prod(e[2])) for e in source.entries}
  for key in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.up_proj.weight",
              "model.layers.0.mlp.down_proj.weight"):
    # 8 reads of an eighth each: the tensor is read once in all, never whole.
    assert source.reads[key] == [full[key] // 8] * 8, (key, source.reads[key])
  assert source.reads["model.norm.weight"] == [64]  # replicated: read once, shared by replicas
  assert params["lm_head"]["kernel"].addressable_shards[0].data.shape == (64, 32)


def test_index_is_checked_before_reading(tmp_path):
  from safetensors.numpy import load_file, save_file
  path = str(tmp_path)
  make_hf_model(path, "llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                num_layers=1, num_heads=4, num_kv_heads=2, tokenizer=False)
  tensors = load_file(f"{path}/model.safetensors")
  del tensors["model.layers.0.mlp.up_proj.weight"]
  save_file(tensors, f"{path}/model.safetensors")
  with pytest.raises(CheckpointError, match="missing tensor.*up_proj"):
    _load(path, "data=2,tensor=4")
  tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((128, 63), np.float32)
  save_file(tensors, f"{path}/model.safetensors")
  with pytest.raises(CheckpointError, match=r"up_proj.weight .* has shape \(128, 63\)"):
    _load(path, "data=2,tensor=4")


@pytest.mark.parametrize("arch,qtype", [("llama", "Q8_0"), ("llama", "F16"), ("qwen2", "Q8_0")])
def test_gguf_sharded_equals_unsharded(tmp_path, arch, qtype):
  tg = pytest.importorskip("test_gguf")
  from hydra_jax.checkpoint.gguf import load_gguf_model
  cfg = tg.hf_config(vocab_size=256, num_heads=8, num_kv_heads=4, tie=arch == "qwen2")
  state = tg.random_state(cfg, seed=3, bias=arch == "qwen2")
  q = getattr(tg.Q, qtype)
  path = tg.write_gguf(str(tmp_path / "m.gguf"), cfg, state, arch=arch,
                       qtype_of=lambda name, arr: q)
  ref = load_gguf_model(path, tokenizer=False)
  for spec in MESHES:
    _assert_same(ref.params, _load(path, spec).params, f"{arch} {qtype} {spec}")
