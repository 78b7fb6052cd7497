"""Heads checkpoints: our orbax format, and the released PyTorch Hydra / Medusa layouts.

The released layouts are produced by torch modules built the way the public code builds them
(list-multiplied shared blocks, Dropout/Linear Sequentials, a transformers LlamaModel as the
prefix layer), and the loaded heads must give the logits those torch modules compute.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn as tnn  # noqa: E402

from hydra_jax.checkpoint import heads_io  # noqa: E402
from hydra_jax.checkpoint.hf import CheckpointError  # noqa: E402
from hydra_jax.checkpoint.heads_io import (HeadsCorruptError, base_weights_fingerprint,  # noqa: E402
                                           load_heads, read_heads_meta, save_heads,
                                           weights_difference)
from hydra_jax.model.config import ModelConfig, UnsupportedModelError  # noqa: E402
from hydra_jax.model.heads import DraftHeads, HeadsConfig, HeadsMismatchError, param_shapes  # noqa: E402

D, V, T, B = 32, 80, 6, 2
BASE = ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5)


def _random_params(cfg, seed=0):
  """Non-zero params of the right tree (no init compile: the IO tests need only the values)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                param_shapes(cfg, BASE))


def _tree_close(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


# --- our format ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["medusa", "hydra++"])
def test_save_load_round_trip(tmp_path, arch):
  cfg = HeadsConfig.for_base(BASE, arch, num_heads=2, num_layers=2, dropout=0.1)
  params = _random_params(cfg)
  save_heads(str(tmp_path / "h"), params, cfg, extra_meta={"step": 7})
  got_cfg, got = load_heads(str(tmp_path / "h"), BASE)
  assert got_cfg == cfg
  _tree_close(params, got)
  meta = read_heads_meta(str(tmp_path / "h"))
  assert meta["extra"] == {"step": 7} and meta["format_version"] == heads_io.FORMAT_VERSION
  assert meta["base"] == {"hidden_size": D, "vocab_size": V, "fingerprint": BASE.fingerprint(),
                          "config": None}
  # Without a base config the heads part is still checked; overwriting works.
  save_heads(str(tmp_path / "h"), params, cfg, base_cfg=BASE)
  _tree_close(params, load_heads(str(tmp_path / "h"))[1])

  other = BASE.replace(hidden_size=48, head_dim=12)
  with pytest.raises(HeadsMismatchError, match="hidden size 32 but the model has 48"):
    load_heads(str(tmp_path / "h"), other)
  with pytest.raises(HeadsMismatchError, match="vocab size 80 but the model has 100"):
    load_heads(str(tmp_path / "h"), BASE.replace(vocab_size=100))
  with pytest.raises(HeadsMismatchError, match="fingerprint"):
    load_heads(str(tmp_path / "h"), BASE.replace(num_layers=3))


def test_bad_directories_give_clear_errors(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    load_heads(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
  with pytest.raises(CheckpointError, match="hydra_lm_head.pt.*medusa_lm_head"):
    load_heads(str(tmp_path / "empty"))

  cfg = HeadsConfig.for_base(BASE, "hydra", num_heads=2, num_layers=1)
  params = _random_params(cfg)
  d = tmp_path / "h"
  save_heads(str(d), params, cfg)
  # Params of another shape than the config says.
  wrong = cfg.replace(num_heads=3)
  (d / "heads_config.json").write_text(json.dumps(dict(read_heads_meta(str(d)),
                                                       heads=wrong.to_dict())))
  with pytest.raises(CheckpointError, match="missing heads_2"):
    load_heads(str(d))
  save_heads(str(d), params, cfg)
  # Truncated / deleted array data.
  for root, _, files in os.walk(d / "params"):
    for f in files:
      if root != str(d / "params") or f in ("manifest.ocdbt", "_METADATA"):
        os.remove(os.path.join(root, f))
  with pytest.raises(CheckpointError, match="corrupt.*is missing"):  # caught by the checksums
    load_heads(str(d))
  # Heads without checksums: orbax's own error, one message (its noise silenced).
  meta = read_heads_meta(str(d))
  del meta["params_sha256"]
  (d / "heads_config.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="corrupt or partial"):
    load_heads(str(d))
  (d / "heads_config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="not valid JSON"):
    load_heads(str(d))


def _fake_base_params(seed=0, scale=0.02):
  """The two tensors the base-weights fingerprint reads, as a base model's param tree has them."""
  rng = np.random.default_rng(seed)
  return {"embed_tokens": {"embedding": (scale * rng.normal(size=(V, D))).astype(np.float32)},
          "lm_head": {"kernel": (scale * rng.normal(size=(D, V))).astype(np.float32)}}


def _saved(tmp_path, name="h", **kw):
  cfg = HeadsConfig.for_base(BASE, "hydra", num_heads=2, num_layers=1)
  params = _random_params(cfg)
  save_heads(str(tmp_path / name), params, cfg, base_cfg=BASE, **kw)
  return str(tmp_path / name), cfg, params


def _largest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def test_changed_params_files_are_refused(tmp_path):
  d, _, params = _saved(tmp_path)
  meta = read_heads_meta(d)
  assert meta["params_sha256"] and all(len(v) == 64 for v in meta["params_sha256"].values())
  _tree_close(params, load_heads(d, BASE)[1])
  target = _largest_file(os.path.join(d, "params"))
  original = open(target, "rb").read()
  # Random bytes over 4 KB of the array data: orbax alone would load changed values.
  with open(target, "r+b") as f:
    f.seek(min(64, max(0, len(original) - 4096)))
    f.write(np.random.default_rng(0).bytes(min(4096, len(original))))
  with pytest.raises(HeadsCorruptError, match=r"are corrupt: .* has changed .*re-export"):
    load_heads(d, BASE)
  with open(target, "wb") as f:
    f.write(original[:len(original) // 2])  # truncated
  with pytest.raises(HeadsCorruptError, match="has changed since the heads were saved"):
    load_heads(d, BASE)
  os.remove(target)
  with pytest.raises(HeadsCorruptError, match="is missing"):
    load_heads(d, BASE)


def test_heads_without_checksums_still_load(tmp_path):
  """Heads saved before the checksums existed load as before (without the check)."""
  d, _, params = _saved(tmp_path)
  meta = read_heads_meta(d)
  del meta["params_sha256"]
  with open(os.path.join(d, "heads_config.json"), "w") as f:
    json.dump(meta, f)
  _tree_close(params, load_heads(d, BASE)[1])


def test_heads_for_other_base_weights_are_refused(tmp_path, caplog):
  base = _fake_base_params(0)
  d, cfg, params = _saved(tmp_path, base_params=base)
  record = read_heads_meta(d)["base"]["weights"]
  assert record == base_weights_fingerprint(base)
  assert len(record["embed_tokens"]) == len(record["lm_head"]) == 16
  _tree_close(params, load_heads(d, BASE, base_params=base)[1])
  # The same base in bf16 (or re-exported in another dtype) is the same base.
  as_bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), base)
  load_heads(d, BASE, base_params=as_bf16)
  other = _fake_base_params(1)  # same shapes and config, other weights
  with pytest.raises(HeadsMismatchError, match="other base weights.*--allow-heads-mismatch"):
    load_heads(d, BASE, base_params=other)
  with caplog.at_level("WARNING", logger="hydra_jax.checkpoint"):
    _tree_close(params, load_heads(d, BASE, base_params=other, allow_mismatch=True)[1])
  assert any("loading them anyway" in r.message for r in caplog.records)
  # Without base params (or for heads saved without the record) nothing is compared.
  load_heads(d, BASE)
  d2, _, _ = _saved(tmp_path, "no_record")
  load_heads(d2, BASE, base_params=other)


def test_allow_mismatch_overrides_the_config_fingerprint_not_the_shapes(tmp_path):
  d, _, params = _saved(tmp_path)
  deeper = BASE.replace(num_layers=3)  # another architecture, same D and V
  with pytest.raises(HeadsMismatchError, match="fingerprint"):
    load_heads(d, deeper)
  _tree_close(params, load_heads(d, deeper, allow_mismatch=True)[1])
  with pytest.raises(HeadsMismatchError, match="hidden size 32 but the model has 48"):
    load_heads(d, BASE.replace(hidden_size=48, head_dim=12), allow_mismatch=True)


def test_shipped_heads_carry_checksums_and_the_embedded_base_weights():
  from hydra_jax.registry import embedded
  from hydra_jax.checkpoint.hf import load_hf_model
  base = load_hf_model(embedded.MODEL_DIR, tokenizer=False)
  dirs = embedded.heads_dirs()
  assert set(dirs) == set(embedded.HEAD_KINDS)
  current = base_weights_fingerprint(base.params)
  for kind, d in dirs.items():
    meta = read_heads_meta(d)
    assert meta["param_dtype"] == "bfloat16", kind
    assert meta["params_sha256"], kind
    assert weights_difference(meta["base"]["weights"], current) == 0.0, kind
    load_heads(d, base.config, base_params=base.params)  # files verified, weights match


# --- torch replicas of the released modules ------------------------------------------------


class ResBlock(tnn.Module):
  """As in the public code: y = res_connection(x) + SiLU(linear(x)); identity residual when square."""

  def __init__(self, hidden, num_condition=0):
    super().__init__()
    self.linear = tnn.Linear(hidden * (num_condition + 1), hidden)
    self.res_connection = (tnn.Linear(hidden * (num_condition + 1), hidden) if num_condition
                           else tnn.Identity())
    self.act = tnn.SiLU()

  def forward(self, x):
    return self.res_connection(x) + self.act(self.linear(x))


def _hf_llama_config(num_layers):
  from transformers import LlamaConfig
  return LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=num_layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                     max_position_embeddings=64, attn_implementation="eager")


class TorchHydra(tnn.Module):
  """The released Hydra head module (grounded), "mlp" or "prefix-mlp" layout."""

  def __init__(self, num_heads, num_layers, prefix, shared=True):
    super().__init__()
    self.prefix = prefix
    self.input_embed_fn = tnn.Embedding(V, D)

    def inner():
      if shared:
        return [ResBlock(D)] * (num_layers - 1)
      return [ResBlock(D) for _ in range(num_layers - 1)]

    if prefix:
      from transformers import LlamaModel
      self.prefix_embeding_layer = LlamaModel(_hf_llama_config(1))
      mlps = []
      for i in range(num_heads):
        blocks = inner()
        seq = [tnn.Dropout(0.2), ResBlock(D, i + 1)]
        for blk in blocks:
          seq += [tnn.Dropout(0.2), blk]
        mlps.append(tnn.Sequential(*seq))
      self.hydra_mlp = tnn.ModuleList(mlps)
      self.hydra_lm_head = tnn.ModuleList(
          [tnn.Sequential(tnn.Dropout(0.2), tnn.Linear(D, V)) for _ in range(num_heads)])
    else:
      self.hydra_mlp = tnn.ModuleList(
          [tnn.Sequential(ResBlock(D, i + 1), *inner()) for i in range(num_heads)])
      self.hydra_lm_head = tnn.ModuleList([tnn.Linear(D, V) for _ in range(num_heads)])
    with torch.no_grad():
      for p in self.parameters():
        p.copy_(0.2 * torch.randn_like(p))

  def forward(self, hidden, input_ids):
    g = hidden
    if self.prefix:
      g = self.prefix_embeding_layer(inputs_embeds=hidden).last_hidden_state
    e = self.input_embed_fn(input_ids)
    inputs = [g] + [torch.roll(e, shifts=-(i + 1), dims=1) for i in range(len(self.hydra_mlp))]
    return [lm(mlp(torch.cat(inputs[:i + 2], dim=-1)))
            for i, (mlp, lm) in enumerate(zip(self.hydra_mlp, self.hydra_lm_head))]


class TorchMedusa(tnn.Module):
  def __init__(self, num_heads, num_layers):
    super().__init__()
    self.heads = tnn.ModuleList([tnn.Sequential(*([ResBlock(D)] * num_layers),
                                                tnn.Linear(D, V, bias=False))
                                 for _ in range(num_heads)])
    with torch.no_grad():
      for p in self.parameters():
        p.copy_(0.2 * torch.randn_like(p))

  def forward(self, hidden):
    return [h(hidden) for h in self.heads]


def _write_hydra(directory, module, arch, num_heads, num_layers, state=None, **conf):
  os.makedirs(directory, exist_ok=True)
  state = module.state_dict() if state is None else state
  torch.save(state, os.path.join(directory, "hydra_lm_head.pt"))
  config = dict(hydra_num_heads=num_heads, hydra_num_layers=num_layers, hydra_head_arch=arch,
                grounded_heads=True, base_model_name_or_path="lmsys/vicuna-7b-v1.3", **conf)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)


def _inputs(seed=0):
  g = torch.Generator().manual_seed(seed)
  hidden = torch.randn(B, T, D, generator=g)
  ids = torch.randint(0, V, (B, T), generator=g)
  return hidden, ids


def _ours_training_logits(cfg, params, hidden, ids, embedding):
  e = jnp.take(jnp.asarray(embedding), jnp.asarray(ids.numpy()), axis=0)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  return DraftHeads(cfg, BASE).apply({"params": params}, jnp.asarray(hidden.numpy()), e, positions)


@pytest.mark.parametrize("arch,shared", [("mlp", True), ("prefix-mlp", True), ("mlp", False)])
def test_released_hydra_matches_torch(tmp_path, arch, shared):
  torch.manual_seed(0)
  k, layers = 3, 3
  module = TorchHydra(k, layers, prefix=arch == "prefix-mlp", shared=shared).eval()
  state = module.state_dict()
  if arch == "prefix-mlp":
    state["prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
  assert "input_embed_fn.weight" in state
  _write_hydra(str(tmp_path), module, arch, k, layers, state=state)
  cfg, params = load_heads(str(tmp_path), BASE)
  assert cfg.arch == ("hydra++" if arch == "prefix-mlp" else "hydra")
  assert (cfg.num_heads, cfg.num_layers, cfg.shared_inner) == (k, layers, shared)
  assert ("inner" in params["heads_0"]) == shared
  hidden, ids = _inputs()
  with torch.no_grad():
    want = module(hidden, ids)
  got = _ours_training_logits(cfg, params, hidden, ids, state["input_embed_fn.weight"].numpy())
  for i in range(k):
    valid = T - i - 1  # torch.roll wraps around; ours pads with zeros (masked in training)
    np.testing.assert_allclose(np.asarray(got[i][:, :valid]), want[i][:, :valid].numpy(),
                               rtol=1e-4, atol=1e-4, err_msg=f"head {i}")


def test_released_medusa_safetensors_and_pt_match_torch(tmp_path):
  from safetensors.torch import save_file
  torch.manual_seed(1)
  k, layers = 3, 2
  module = TorchMedusa(k, layers).eval()
  # The released files are the ModuleList's state_dict: keys "{i}.{j}.linear.weight", ...
  state = {name: t.clone().contiguous() for name, t in module.heads.state_dict().items()}
  hidden, _ = _inputs(1)
  with torch.no_grad():
    want = module(hidden)
  for fname in ("medusa_lm_head.safetensors", "medusa_lm_head.pt"):
    d = tmp_path / fname.split(".")[-1]
    d.mkdir()
    if fname.endswith(".pt"):
      torch.save(state, str(d / fname))
    else:
      save_file(state, str(d / fname))
    (d / "config.json").write_text(json.dumps({"medusa_num_heads": k, "medusa_num_layers": layers,
                                               "base_model_name_or_path": "x"}))
    cfg, params = load_heads(str(d), BASE)
    assert (cfg.arch, cfg.num_heads, cfg.num_layers, cfg.shared_inner) == ("medusa", k, layers,
                                                                          True)
    assert "lm_head" in params["heads_0"] and "bias" not in params["heads_0"]["lm_head"]
    model = DraftHeads(cfg, BASE)
    for i in range(k):
      got = model.apply({"params": params}, i, jnp.asarray(hidden.numpy()), None,
                        method=DraftHeads.head_logits)
      np.testing.assert_allclose(np.asarray(got), want[i].numpy(), rtol=1e-4, atol=1e-4)


def test_released_strict_key_checks(tmp_path):
  torch.manual_seed(2)
  module = TorchHydra(2, 3, prefix=False)
  good = module.state_dict()

  def load_with(state, name, **conf):
    d = tmp_path / name
    _write_hydra(str(d), module, "mlp", 2, 3, state=state, **conf)
    return load_heads(str(d), BASE)

  missing = dict(good)
  del missing["hydra_mlp.1.0.res_connection.bias"]
  with pytest.raises(CheckpointError, match=r"missing.*hydra_lm_head\.pt: hydra_mlp\.1\.0\.res_connection\.bias"):
    load_with(missing, "missing")
  extra = dict(good, **{"hydra_mlp.0.3.linear.weight": torch.zeros(D, D)})
  with pytest.raises(CheckpointError, match=r"unexpected tensor hydra_mlp\.0\.3\.linear\.weight in .*hydra_lm_head\.pt"):
    load_with(extra, "extra")
  shape = dict(good, **{"hydra_lm_head.1.bias": torch.zeros(V + 1)})
  with pytest.raises(CheckpointError, match=r"hydra_lm_head\.1\.bias in .*hydra_lm_head\.pt has shape \(81,\)"):
    load_with(shape, "shape")
  # Shared copies that differ load untied.
  untied = dict(good, **{"hydra_mlp.1.2.linear.bias": good["hydra_mlp.1.2.linear.bias"] + 1})
  cfg, params = load_with(untied, "untied")
  assert not cfg.shared_inner and "inner_1" in params["heads_1"]
  np.testing.assert_allclose(np.asarray(params["heads_1"]["inner_1"]["linear"]["bias"]),
                             untied["hydra_mlp.1.2.linear.bias"].numpy())
  with pytest.raises(UnsupportedModelError, match="grounded_heads=false"):
    d = tmp_path / "ungrounded"
    _write_hydra(str(d), module, "mlp", 2, 3, state=good)
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(conf, grounded_heads=False)))
    load_heads(str(d), BASE)
  load_with(good, "good")
  with pytest.raises(HeadsMismatchError, match="hidden size 32 but the model has 64"):
    load_heads(str(tmp_path / "good"), BASE.replace(hidden_size=64, head_dim=16))
  (tmp_path / "corrupt").mkdir()
  (tmp_path / "corrupt" / "hydra_lm_head.pt").write_bytes(b"not a torch file")
  (tmp_path / "corrupt" / "config.json").write_text(json.dumps(
      {"hydra_num_heads": 2, "hydra_num_layers": 3, "hydra_head_arch": "mlp"}))
  with pytest.raises(CheckpointError, match="corrupt"):
    load_heads(str(tmp_path / "corrupt"))


def test_pt_without_torch_says_install_torch(tmp_path, monkeypatch):
  import sys
  from hydra_jax.checkpoint.released import read_state_dict
  torch.save({"0.1.weight": torch.zeros(2, 2)}, str(tmp_path / "medusa_lm_head.pt"))
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
  with pytest.raises(CheckpointError, match="needs PyTorch"):
    read_state_dict(str(tmp_path / "medusa_lm_head.pt"))
