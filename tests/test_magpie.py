"""Magpie data set: shards written atomically, verified, continued, deduplicated across runs."""

import json
import os
import random
import shutil

import pytest

from hydra_jax.tools.testing import SIMPLE_CHAT_TEMPLATE, make_hf_model
from hydra_jax.training import data as data_lib
from hydra_jax.training import magpie

# Every run shares these shapes, so the decoder compiles once for the whole module.
RUN = dict(shard_queries=4, answer_tokens=8, query_tokens=8, batch_size=4, min_chars=4, seed=0)


class Killed(Exception):
  """Stands for the process dying (a kill, a crash) at the point a test chooses."""


def _chat_model(path, seed):
  """A tiny random chat model that ends sampled user turns now and then (p(EOS) of a few % per
  token at temperature 1) while its greedy answers rarely start with EOS: the residual stream's
  dimension 0 is a constant that only the EOS row of the LM head reads."""
  import torch
  m = make_hf_model(path, vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, max_position_embeddings=256,
                    chat_template=SIMPLE_CHAT_TEMPLATE, seed=seed, weight_std=0.3)
  with torch.no_grad():
    m.model.embed_tokens.weight[:, 0] = 1.0
    for layer in m.model.layers:
      layer.self_attn.o_proj.weight[0] = 0.0
      layer.mlp.down_proj.weight[0] = 0.0
    m.lm_head.weight[2] = 0.0
    m.lm_head.weight[2, 0] = 20.0
  m.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  from hydra_jax.decoding import api
  path = _chat_model(str(tmp_path_factory.mktemp("chat")), seed=3)
  return path, api.load_model(path)


@pytest.fixture(scope="module")
def one_shot(model, tmp_path_factory):
  """12 queries in 3 shards, written by one uninterrupted run."""
  out = str(tmp_path_factory.mktemp("one_shot") / "data")
  manifest = magpie.write_magpie(model[1], out, num_queries=12, **RUN)
  return out, manifest


def _shard_bytes(out):
  return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))
          if magpie.SHARD_RE.match(f)}


def _questions(out):
  qs = []
  for f in sorted(_shard_bytes(out)):
    for line in open(os.path.join(out, f), encoding="utf-8"):
      qs.append(json.loads(line)["conversations"][0]["value"])
  return qs


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_one_shot_layout_and_manifest(one_shot):
  out, manifest = one_shot
  shards = _shard_bytes(out)
  assert sorted(shards) == [magpie.shard_name(i) for i in range(3)]
  assert [s["file"] for s in manifest["shards"]] == sorted(shards)
  assert manifest == json.load(open(os.path.join(out, magpie.MANIFEST)))
  assert manifest["totals"]["queries"] == 12
  seeds = [s["seed"] for s in manifest["shards"]]
  assert len(set(seeds)) == 3 and seeds[0] == magpie.shard_seed(0, 0)
  for s in manifest["shards"]:
    lines = shards[s["file"]].decode().splitlines()
    assert len(lines) == s["conversations"] and 0 < s["answer_tokens"] <= 8 * s["queries"]
  keys = [magpie.normalize_query(q) for q in _questions(out)]
  assert len(keys) == len(set(keys)) == manifest["totals"]["conversations"]


def test_second_run_adds_shards_without_repeating_a_question(model, one_shot, tmp_path):
  out = _copy(one_shot[0], tmp_path / "data")
  before = _shard_bytes(out)
  manifest = magpie.write_magpie(model[1], out, num_queries=20, max_shards=1, **RUN)
  assert len(manifest["shards"]) == 4  # a session's budget: one shard, then stop
  manifest = magpie.write_magpie(model[1], out, num_queries=20, **RUN)
  after = _shard_bytes(out)
  assert len(after) == 5 and all(after[f] == b for f, b in before.items())
  assert manifest["totals"]["queries"] == 20
  keys = [magpie.normalize_query(q) for q in _questions(out)]
  assert len(keys) == len(set(keys))


def test_questions_are_deduplicated_across_runs_and_shards(model, tmp_path, monkeypatch):
  # The model is made to repeat itself: every round samples from 10 questions, spelled with
  # other cases and spacing, so only the deduplication keeps each one to a single shard.
  pool = [f"Why is {k} odd?" for k in range(10)]

  def candidates(model_, prefix, rows, *, seed, **kw):
    rng = random.Random(seed)
    out = []
    for _ in range(6):
      q = rng.choice(pool)
      out.append(rng.choice([q, q.upper(), "  " + q.replace(" ", "   ") + "\n"]).strip())
    return out

  monkeypatch.setattr(magpie, "_query_candidates", candidates)
  out = str(tmp_path / "data")
  run = dict(RUN, shard_queries=3)
  magpie.write_magpie(model[1], out, num_queries=6, **run)
  assert len(_shard_bytes(out)) == 2
  manifest = magpie.write_magpie(model[1], out, num_queries=10, **run)
  # Asked: the questions of the conversations, and those whose answer came back empty.
  asked = _questions(out) + [q for s in manifest["shards"] for q in s["unanswered"]]
  keys = sorted(magpie.normalize_query(q) for q in asked)
  assert keys == sorted(magpie.normalize_query(q) for q in pool)
  assert manifest["totals"]["queries"] == 10 and len(manifest["shards"]) == 4
  # Nothing new is left to ask: the next shard stops the run instead of repeating a question.
  manifest = magpie.write_magpie(model[1], out, num_queries=12, max_rounds=3, **run)
  assert len(manifest["shards"]) == 4


def test_later_query_rounds_sample_only_what_is_missing(model, monkeypatch, tmp_path):
  """Round 1 samples batch_size * 8 rows (or what the last shard's yield says is needed);
  round 2 only the missing queries over round 1's yield, with a 1.25 margin, in whole
  batches."""
  asked = []

  def half_new(model_, prefix, rows, *, seed, **kw):
    asked.append(rows)
    return [f"Question {seed} {i}?" for i in range(rows // 2)]  # yield 0.5, all distinct

  monkeypatch.setattr(magpie, "_query_candidates", half_new)
  queries, _, _ = magpie.sample_queries(model[1], 20, batch_size=4, seed=0)
  # round 1: 32 rows -> 16 queries; 4 missing / 0.5 * 1.25 = 10 rows -> 12 (whole batches)
  assert asked == [32, 12] and len(queries) == 20
  asked.clear()
  queries, _, _ = magpie.sample_queries(model[1], 40, batch_size=4, seed=0)
  # 24 missing / 0.5 * 1.25 = 60 rows: capped at a full round (32), then 8 missing -> 20 -> 20
  assert asked == [32, 32, 20] and len(queries) == 40
  asked.clear()
  queries, rows, found = magpie.sample_queries(model[1], 8, batch_size=4, seed=0,
                                               expected_yield=0.5)
  # a known yield sizes round 1: 8 / 0.5 * 1.25 = 20 rows -> 10 found, 8 kept
  assert asked == [20] and len(queries) == 8 and (rows, found) == (20, 10)
  # A data set records each shard's yield; the next shard's first round is sized by it.
  asked.clear()
  manifest = magpie.write_magpie(model[1], str(tmp_path / "data"), num_queries=6,
                                 **dict(RUN, shard_queries=3))
  assert [s["query_yield"] for s in manifest["shards"]] == [0.5, 0.5]
  assert asked == [32, 8]  # shard 0: a full round; shard 1: 3 / 0.5 * 1.25 = 7.5 -> 8 rows


def test_interrupted_runs_resume_to_the_one_shot_shards(model, one_shot, tmp_path, monkeypatch):
  out = str(tmp_path / "data")
  real_distill, real_write = magpie.self_distill, magpie._write_json_atomic
  calls = {"distill": 0, "write": 0}

  def dies_answering_shard_1(*a, **kw):
    calls["distill"] += 1
    result = real_distill(*a, **kw)  # the shard's temporary file is written, then the run dies
    if calls["distill"] == 2:
      raise Killed
    return result

  monkeypatch.setattr(magpie, "self_distill", dies_answering_shard_1)
  with pytest.raises(Killed):
    magpie.write_magpie(model[1], out, num_queries=12, **RUN)
  assert sorted(_shard_bytes(out)) == ["shard-00000.jsonl"]
  assert any(f.endswith(".tmp") for f in os.listdir(out))
  assert magpie.read_manifest(out)["totals"]["queries"] == 4  # shard 0 verifies

  def dies_before_the_manifest_of_shard_2(*a, **kw):
    calls["write"] += 1
    if calls["write"] == 2:  # this run writes the manifest after shard 1, then after shard 2
      raise Killed
    return real_write(*a, **kw)

  monkeypatch.setattr(magpie, "self_distill", real_distill)
  monkeypatch.setattr(magpie, "_write_json_atomic", dies_before_the_manifest_of_shard_2)
  with pytest.raises(Killed):
    magpie.write_magpie(model[1], out, num_queries=12, **RUN)
  assert "shard-00002.jsonl" in _shard_bytes(out)  # written, but not in the manifest
  assert len(magpie.read_manifest(out)["shards"]) == 2

  monkeypatch.setattr(magpie, "_write_json_atomic", real_write)
  manifest = magpie.write_magpie(model[1], out, num_queries=12, **RUN)
  assert _shard_bytes(out) == _shard_bytes(one_shot[0])
  assert not any(f.endswith(".tmp") for f in os.listdir(out))
  strip = lambda m: [{k: v for k, v in s.items() if not k.endswith("_seconds")}
                     for s in m["shards"]]
  assert strip(manifest) == strip(one_shot[1])


def test_edited_shard_and_other_model_or_settings_are_refused(model, one_shot, tmp_path):
  from hydra_jax.decoding import api
  out = _copy(one_shot[0], tmp_path / "edited")
  shard = os.path.join(out, "shard-00001.jsonl")
  raw = bytearray(open(shard, "rb").read())
  raw[10] = ord("X") if raw[10] != ord("X") else ord("Y")
  open(shard, "wb").write(bytes(raw))
  with pytest.raises(magpie.MagpieDataError, match="shard-00001.jsonl does not match its sha256"):
    magpie.write_magpie(model[1], out, num_queries=16, **RUN)
  os.remove(shard)
  with pytest.raises(magpie.MagpieDataError, match="is missing: restore it, or delete"):
    magpie.read_manifest(out)

  out = _copy(one_shot[0], tmp_path / "other")
  other = api.load_model(_chat_model(str(tmp_path / "other_model"), seed=4))
  with pytest.raises(magpie.MagpieDataError, match="other model weights.*--allow-mismatch"):
    magpie.write_magpie(other, out, num_queries=16, **RUN)
  with pytest.raises(magpie.MagpieDataError, match=r"answer_tokens=8 \(now 9\)"):
    magpie.write_magpie(model[1], out, num_queries=16, **dict(RUN, answer_tokens=9))
  with pytest.raises(magpie.MagpieDataError, match=r"query_temperature=1.0 \(now 0.7\)"):
    magpie.write_magpie(model[1], out, num_queries=16, temperature=0.7, **RUN)
  assert _shard_bytes(out) == _shard_bytes(one_shot[0])  # nothing was touched
  # Accepted on request, and the new shard says what wrote it.
  manifest = magpie.write_magpie(other, out, num_queries=16, allow_mismatch=True, **RUN)
  assert len(manifest["shards"]) == 4
  assert "written_with" in manifest["shards"][3] and "written_with" not in manifest["shards"][0]


def test_cli_exits_2_with_one_line(model, one_shot, tmp_path, capsys):
  path = model[0]
  rc = magpie.main(["--model", path, "--out", str(tmp_path / "data.jsonl"), "--num-queries", "4"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1
  assert err.startswith("magpie: error:") and f"--out {tmp_path / 'data'}" in err

  out = _copy(one_shot[0], tmp_path / "data")
  argv = ["--model", path, "--out", out, "--query-tokens", "8", "--answer-tokens", "8",
          "--min-chars", "4"]
  assert magpie.main(argv + ["--num-queries", "12", "--temperature", "0.5"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "query_temperature=1.0 (now 0.5)" in err
  assert magpie.main(argv + ["--num-queries", "12"]) == 0  # all there already: nothing to do
  assert json.loads(capsys.readouterr().out.splitlines()[0])["queries"] == 12
  with pytest.raises(SystemExit) as e:
    magpie.main(["--model", path, "--out", out])  # no target
  assert e.value.code == 2


def test_training_reads_the_directory(model, one_shot, tmp_path):
  from transformers import AutoTokenizer
  out = one_shot[0]
  files = data_lib.expand_paths(out)
  assert [os.path.basename(f) for f in files] == [magpie.shard_name(i) for i in range(3)]
  cfg = data_lib.default_data_config()
  cfg.update(path=out, template="chat_template", eval_fraction=0.0)
  tok = AutoTokenizer.from_pretrained(model[0])
  train, _, stats = data_lib.build_datasets(cfg, tok, 64, 2, seed=0, process_index=0,
                                            process_count=1, max_len=256)
  assert stats["skipped"] == {}
  assert train.num_examples == one_shot[1]["totals"]["conversations"]
  assert next(train)["loss_mask"].sum() > 0
  (tmp_path / "empty").mkdir()
  with pytest.raises(data_lib.DataFileNotFoundError, match="without shard-"):
    data_lib.expand_paths(str(tmp_path / "empty"))


def test_heads_answer_the_same(model, one_shot, tmp_path, monkeypatch):
  """Speculative answers (random Medusa heads) write the bytes of autoregressive ones."""
  import jax
  from hydra_jax.checkpoint.heads_io import save_heads
  from hydra_jax.decoding import api
  from hydra_jax.model.heads import HeadsConfig, init_heads
  hm = model[1]
  heads_dir = str(tmp_path / "heads")
  cfg = HeadsConfig.for_base(hm.config, "medusa", num_heads=2, num_layers=1)
  save_heads(heads_dir, init_heads(cfg, hm.config, hm.params, jax.random.PRNGKey(0)), cfg,
             base_cfg=hm.config)
  real_generate, accept_lengths = api.generate, []

  def generate(*a, **kw):
    results = real_generate(*a, **kw)
    accept_lengths.extend(r.extra["accept_length"] for r in results if "accept_length" in r.extra)
    return results

  monkeypatch.setattr(api, "generate", generate)
  out = str(tmp_path / "data")
  manifest = magpie.write_magpie(hm, out, num_queries=4, heads=heads_dir, tree="greedy_7", **RUN)
  assert len(accept_lengths) == manifest["totals"]["queries"]  # every answer was speculative
  assert manifest["shards"][0]["decoding"] == "speculative"
  assert _shard_bytes(out)["shard-00000.jsonl"] == _shard_bytes(one_shot[0])["shard-00000.jsonl"]
