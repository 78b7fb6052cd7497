"""The jitted train step: only the heads move, the loss falls, sharded == unsharded."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import _multihost_worker as tiny
from hydra_jax.parallel import sharding
from hydra_jax.training import config_base, optimizer, step
from hydra_jax.training.errors import ConfigError


def _opt_cfg(**overrides):
  """The base config's optimizer section with `overrides`: the one table of defaults."""
  cfg = config_base.base_config().optimizer
  cfg.update(overrides)
  return cfg


_run = tiny.cached_run


@pytest.mark.parametrize("arch,loss", [("medusa", "hard"), ("hydra", "hard"),
                                       ("hydra++", "teacher")])
def test_steps_train_only_the_heads(arch, loss):
  out = _run(arch, (1, 1, 1), 8, loss, snapshot_at=3 if arch == "hydra++" else None)
  losses = np.asarray(out["losses"])
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0] - 0.05 * abs(losses[0]), losses  # a clear fall, not noise
  assert out["metrics"][-1]["grad_norm"] > 0
  assert out["metrics"][0]["lr"] == pytest.approx(tiny.OPT_CFG["lr"] / 2)  # warmup step 1 of 2
  assert int(out["state"].step) == 8

  # The base is an input, never updated: bit-identical after 8 donated steps.
  base_after = tiny.host_params(out["base"])
  base_before = tiny.host_params(out["base_before"])
  for key, value in base_before.items():
    np.testing.assert_array_equal(base_after[key], value, err_msg=key)
  # Every head leaf moved (zero-init ResBlocks included), and stayed finite.
  before, after = out["initial"], tiny.host_params(out["state"].params)
  assert before.keys() == after.keys()
  for key in before:
    assert np.all(np.isfinite(after[key])), key
    assert not np.array_equal(before[key], after[key]), f"{key} did not change"
  assert ("prefix_layer" in " ".join(after)) == (arch == "hydra++")


def test_sharded_equals_unsharded():
  """3 steps on one device vs a (2, 2, 2) mesh of 8: same losses and params (f32)."""
  single = _run("hydra++", (1, 1, 1), 8, "teacher", snapshot_at=3)
  sharded = _run("hydra++", (2, 2, 2), 3, "teacher")
  np.testing.assert_allclose(sharded["losses"], single["losses"][:3], rtol=1e-5)
  got = tiny.host_params(sharded["state"].params)
  for key, want in single["snapshot"].items():
    # Adam normalises each element's update, so where a gradient is near zero, f32
    # reduction-order noise becomes update noise: allow 1% of one step (lr 1e-2) per element,
    # and a 1e-5 relative error per leaf. A sharding bug moves elements by a whole step.
    np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-4, err_msg=key)
    rel = np.linalg.norm(got[key] - want) / np.linalg.norm(want)
    assert rel <= 1e-5, (key, rel)

  # Placement follows the rules: params, optimizer moments mirror them, scalars replicated.
  state = sharded["state"]
  head = state.params["heads_1"]
  assert head["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert head["first"]["kernel"].sharding.spec == P("fsdp", None, "tensor")
  assert head["lm_head"]["bias"].sharding.spec == P("tensor")
  attn = state.params["prefix_layer"]["self_attn"]
  assert attn["qkv_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert attn["o_proj"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
  adam = state.opt_state[1].inner_state[0]  # (clip, inject(adamw)) -> (adam, decay, lr)
  assert adam.mu["heads_1"]["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert adam.nu["prefix_layer"]["self_attn"]["o_proj"]["kernel"].sharding.spec == P(
      "tensor", None, "fsdp")
  assert adam.count.sharding.spec == P()
  assert state.step.sharding.spec == P()
  base = sharded["base"]
  assert base["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert base["layers_0"]["mlp"]["down_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
  assert len(head["lm_head"]["kernel"].sharding.device_set) == 8


def test_eval_step_counts():
  """Eval sums: counts equal the masked targets per head; accuracies are bounded by them."""
  cfg, heads_cfg = tiny.tiny_model_cfg(), tiny.tiny_heads_cfg("hydra++")
  out = _run("hydra++", (1, 1, 1), 8, "teacher", snapshot_at=3)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  eval_step = step.build_eval_step(cfg, heads_cfg, tiny.TRAIN_CFG, mesh, out["shardings"],
                                   jax.tree.map(lambda x: x.sharding, out["base"]))
  batch = tiny.global_batch()
  raw = eval_step(out["state"].params, out["base"], sharding.make_global_batch(batch, mesh))
  ranks = {k: np.asarray(v) for k, v in raw.items() if k.startswith("rank_counts")}
  sums = {k: float(v) for k, v in raw.items() if k not in ranks}
  for k in range(heads_cfg.num_heads):
    want = batch["loss_mask"][:, k + 2:].sum()
    assert sums[f"count_head_{k}"] == want
    for name in ("top1_data", "top5_data", "top1_base", "top5_base"):
      assert 0 <= sums[f"{name}_head_{k}"] <= want
    assert sums[f"top1_data_head_{k}"] <= sums[f"top5_data_head_{k}"]
    assert sums[f"top1_base_head_{k}"] <= sums[f"top5_base_head_{k}"]
    assert sums[f"soft_sum_head_{k}"] > 0 and sums[f"hard_sum_head_{k}"] > 0
    counts = ranks[f"rank_counts_base_head_{k}"]  # exact per-rank hits of the base token
    assert counts[0] == sums[f"top1_base_head_{k}"]
    assert counts[:5].sum() == sums[f"top5_base_head_{k}"] and counts.sum() <= want
  # After training on this batch the heads have learned something about the base.
  assert sums["top5_base_head_0"] > 0


def test_bad_train_config():
  cfg, heads_cfg = tiny.tiny_model_cfg(), tiny.tiny_heads_cfg("hydra")
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="train.loss"):
    step.build_train_step(cfg, heads_cfg, dict(loss="kl"), None, mesh, None)
  with pytest.raises(ValueError, match="dtype"):
    step.build_train_step(cfg, heads_cfg, dict(base_dtype="int8"), None, mesh, None)


def test_lr_schedule_closed_form():
  cfg = _opt_cfg(lr=1e-3, warmup_steps=4, final_lr_multiplier=0.33, grad_accum_steps=2)
  schedule = optimizer.make_lr_schedule(cfg, total_steps=24)  # 12 optimizer updates
  got = np.array([float(schedule(c)) for c in range(14)])
  want = []
  for c in range(14):
    if c < 4:
      want.append(1e-3 * (c + 1) / 4)
    else:
      frac = min(1.0, (c - 4) / 8)
      want.append(0.33e-3 + (1e-3 - 0.33e-3) * 0.5 * (1 + np.cos(np.pi * frac)))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[4] == pytest.approx(1e-3) and got[12] == pytest.approx(0.33e-3)


def test_weight_decay_skips_biases_and_norms():
  """Zero gradients: Adam moves nothing, so the update is the decay alone."""
  params = {"blk": {"kernel": np.full((3, 4), 2.0, np.float32),
                    "bias": np.full((4,), 2.0, np.float32)},
            "norm": {"scale": np.full((4,), 2.0, np.float32)},
            "vec": np.full((5,), 2.0, np.float32)}
  opt = optimizer.make_optimizer(_opt_cfg(lr=0.1, weight_decay=0.5, clip_norm=1.0,
                                          warmup_steps=0), 10)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, state = opt.update(zeros, opt.init(params), params)
  np.testing.assert_allclose(updates["blk"]["kernel"], -0.1 * 0.5 * 2.0 * np.ones((3, 4)))
  for leaf in (updates["blk"]["bias"], updates["norm"]["scale"], updates["vec"]):
    np.testing.assert_array_equal(leaf, 0.0)
  assert float(optimizer.current_lr(state)) == pytest.approx(0.1)


def test_grad_accumulation_equals_mean_gradient():
  params = {"w": np.array([[1.0, -2.0], [0.5, 3.0]], np.float32), "b": np.ones(2, np.float32)}
  g1 = jax.tree.map(lambda p: 0.3 * p + 0.1, params)
  g2 = jax.tree.map(lambda p: -0.7 * p + 0.2, params)
  cfg = dict(lr=0.05, weight_decay=0.1, clip_norm=0.5, warmup_steps=0)
  accum = optimizer.make_optimizer(_opt_cfg(**cfg, grad_accum_steps=2), 20)
  plain = optimizer.make_optimizer(_opt_cfg(**cfg), 10)
  state = accum.init(params)
  u1, state = accum.update(g1, state, params)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(u1))  # first micro-step
  u2, _ = accum.update(g2, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want, _ = plain.update(mean, plain.init(params), params)
  for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_partial_sections_take_the_base_defaults_and_refuse_typos():
  """A dict with some fields gets the rest from base_config(), the only table of defaults."""
  base = config_base.base_config()
  full = config_base.section("optimizer", {"lr": 0.5})
  assert full == dict(base.optimizer.to_dict(), lr=0.5)
  assert config_base.section("train", None) == base.train.to_dict()
  # The schedule of a partial dict is the schedule of the full base section.
  part = optimizer.make_lr_schedule({"lr": 2e-3}, 400)
  whole = optimizer.make_lr_schedule(_opt_cfg(lr=2e-3), 400)
  for c in (0, 50, 99, 100, 250, 399):
    assert float(part(c)) == float(whole(c))
  with pytest.raises(ConfigError, match=r"unknown optimizer field 'lrr' \(did you mean lr\?\)"):
    optimizer.make_optimizer({"lrr": 1e-3}, 10)
  with pytest.raises(ConfigError, match="unknown train field 'los'"):
    step.build_train_step(tiny.tiny_model_cfg(), tiny.tiny_heads_cfg("hydra"), {"los": "hard"},
                          None, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), None)


def test_no_module_declares_its_own_defaults():
  import inspect
  from hydra_jax.training import data
  for module in (step, optimizer, data):
    src = inspect.getsource(module)
    assert "DEFAULTS" not in src and "cfg_get" not in src, module.__name__
  assert data.default_data_config().to_dict() == config_base.base_config().data.to_dict()


def test_draft_vocabulary_teacher_in_training_equals_the_full_vocabulary_path():
  """With a draft vocabulary, training computes the base's teacher logits over the draft
  columns only; evaluation computes all V (it needs the base's argmax). Both must give the
  same soft (teacher) sums for the same params and batch."""
  import jax.numpy as jnp
  from hydra_jax.model.heads import DraftHeads, init_heads
  from hydra_jax.model.llama import LlamaModel
  model_cfg = tiny.tiny_model_cfg()
  draft = tuple(int(i) for i in np.random.default_rng(1).permutation(256)[:48])
  heads_cfg = tiny.tiny_heads_cfg("hydra++", dropout=0.0, draft_vocab=draft)
  base_params = jax.tree_util.tree_map(jnp.asarray, tiny.tiny_base_params())
  heads_params = init_heads(heads_cfg, model_cfg, base_params, jax.random.PRNGKey(2))
  base_model = LlamaModel(model_cfg, dtype=jnp.float32)
  heads_model = DraftHeads(heads_cfg, model_cfg, dtype=jnp.float32, param_dtype=jnp.float32)
  batch = {k: jnp.asarray(v) for k, v in tiny.global_batch().items()}

  def sums(evaluation):
    return jax.jit(lambda h, b, x: step._forward_sums(
        base_model, heads_model, h, b, x, num_heads=heads_cfg.num_heads, chunk=6,
        teacher=True, evaluation=evaluation))(heads_params, base_params, batch)

  train, full = sums(False), sums(True)
  assert "base_top1" not in train and "base_top1" in full
  for key in ("weight", "hard", "top1", "soft"):
    np.testing.assert_allclose(np.asarray(train[key]), np.asarray(full[key]), rtol=1e-5,
                               err_msg=key)
  assert float(np.min(np.asarray(train["soft"]))) > 0
