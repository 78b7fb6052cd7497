"""Meshes, logical-axis rules, param / optimizer-state shardings and the global batch."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import _multihost_worker as tiny
from hydra_jax.model.heads import init_heads
from hydra_jax.parallel import sharding
from hydra_jax.training import optimizer


def test_make_mesh_shapes_and_errors():
  assert dict(sharding.make_mesh((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh((-1, 2, 1)).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert dict(sharding.make_mesh((1, -1, 1)).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  four = jax.devices()[:4]
  assert dict(sharding.make_mesh((1, 2, -1), devices=four).shape)["tensor"] == 2
  with pytest.raises(ValueError, match="multiple of 3 devices"):
    sharding.make_mesh((3, -1, 1))
  with pytest.raises(ValueError, match="uses 4 devices but there are 8"):
    sharding.make_mesh((2, 2, 1))
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh((-1, -1, 2))
  with pytest.raises(ValueError, match="3 entries"):
    sharding.make_mesh((8, 1))


def test_logical_rules():
  mesh = sharding.make_mesh((2, 2, 2))
  spec = sharding.logical_to_mesh_spec
  assert spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert spec(("batch", None)) == P(("data", "fsdp"))
  assert spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor")
  assert spec(("head_in", "mlp")) == P("fsdp", "tensor")
  assert spec(("unknown_axis",)) == P()
  # One mesh axis for two dims of one array is a rules bug: raise, naming it.
  bad_rules = (("head_in", "tensor"),) + sharding.LOGICAL_RULES
  with pytest.raises(ValueError, match="mesh axis 'tensor' would shard both"):
    spec(("head_in", "mlp"), bad_rules)
  # A dim the mesh axes do not divide is replicated, with a warning naming the array.
  with pytest.warns(UserWarning, match="kv: dim 1 .*not divisible"):
    got = spec(("embed", "kv_heads"), shape=(8, 3), mesh=mesh, name="kv")
  assert got == P("fsdp")
  # Size-1 mesh axes shard nothing and are left out of the spec.
  assert spec(("vocab", "embed"), shape=(8, 8), mesh=sharding.make_mesh((1, 8, 1))) == P(
      None, "fsdp")


def test_base_and_head_param_shardings():
  mesh = sharding.make_mesh((2, 2, 2))
  cfg = tiny.tiny_model_cfg()
  base = sharding.base_param_shardings(cfg, mesh)
  assert base["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
  assert base["lm_head"]["kernel"].spec == P("fsdp", "tensor")
  assert base["layers_1"]["self_attn"]["qkv_proj"]["kernel"].spec == P("fsdp", "tensor")
  assert base["layers_1"]["self_attn"]["o_proj"]["kernel"].spec == P("tensor", None, "fsdp")
  assert base["layers_0"]["mlp"]["gate_up_proj"]["kernel"].spec == P("fsdp", None, "tensor")
  assert base["norm"]["scale"].spec == P("fsdp")
  # Every arch's declared axes resolve without collisions.
  base_abstract = jax.eval_shape(lambda: tiny.tiny_base_params())
  for arch in ("medusa", "hydra", "hydra++"):
    boxed = jax.eval_shape(lambda b: init_heads(tiny.tiny_heads_cfg(arch), cfg, b,
                                                jax.random.PRNGKey(0), boxed=True),
                           base_abstract)
    shard = sharding.logical_to_sharding(boxed, mesh)
    assert shard["heads_1"]["lm_head"]["kernel"].spec == P("fsdp", "tensor")
    if arch != "medusa":
      assert shard["heads_1"]["first"]["kernel"].spec == P("fsdp", None, "tensor")
      assert shard["heads_1"]["lm_head"]["bias"].spec == P("tensor")


def test_shard_base_params_places_by_rules():
  mesh = sharding.make_mesh((2, 2, 2))
  host = tiny.tiny_base_params()
  placed = sharding.shard_base_params(host, mesh)  # sizes read off the params
  emb = placed["embed_tokens"]["embedding"]
  assert emb.sharding.spec == P("tensor", "fsdp")
  assert emb.addressable_shards[0].data.shape == (128, 16)
  np.testing.assert_array_equal(np.asarray(emb), host["embed_tokens"]["embedding"])
  broken = dict(host)
  del broken["norm"]
  with pytest.raises(ValueError, match="missing \\['norm/scale'\\]"):
    sharding.shard_base_params(broken, mesh, model_cfg=tiny.tiny_model_cfg())


def test_opt_state_mirrors_params():
  mesh = sharding.make_mesh((2, 2, 2))
  params = {"blk": {"kernel": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 4), jnp.float32),
                                                      ("embed", "mlp")),
                    "bias": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4,), jnp.float32),
                                                    ("mlp",))}}
  param_sh = sharding.logical_to_sharding(params, mesh)
  opt = optimizer.make_optimizer(dict(lr=1e-3, grad_accum_steps=2), 10)
  abstract = jax.eval_shape(opt.init, nn.unbox(params))
  sh = sharding.opt_state_shardings(opt, abstract, param_sh, mesh)
  assert sh.acc_grads["blk"]["kernel"].spec == P("fsdp", "tensor")  # MultiSteps accumulator
  adam = sh.inner_opt_state[1].inner_state[0]
  assert adam.mu["blk"]["kernel"].spec == P("fsdp", "tensor")
  assert adam.nu["blk"]["bias"].spec == P("tensor")
  assert adam.count.spec == P() and sh.mini_step.spec == P()
  assert sh.inner_opt_state[1].hyperparams["learning_rate"].spec == P()


def test_make_global_batch():
  mesh = sharding.make_mesh((2, 2, 2))
  batch = tiny.global_batch()
  out = sharding.make_global_batch(batch, mesh)
  for key, value in batch.items():
    assert out[key].shape == value.shape and out[key].dtype == value.dtype
    assert out[key].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(out[key]), value)
  # 4 batch shards of 2 rows, each held by the 2 "tensor" devices.
  assert {s.data.shape for s in out["tokens"].addressable_shards} == {(2, tiny.SEQ)}
  with pytest.raises(ValueError, match="multiple of 4"):
    sharding.make_global_batch({k: v[:6] for k, v in batch.items()}, mesh)


def test_no_warnings_for_divisible_tiny_model():
  mesh = sharding.make_mesh((2, 2, 2))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sharding.base_param_shardings(tiny.tiny_model_cfg(), mesh)
