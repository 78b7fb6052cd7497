"""Trees fitted to the heads and the hardware (hydra_jax.decoding.tree_fit).

The calibration's teacher-forced ranks are checked against the speculative engine itself: a
greedy step started at position t accepts exactly the longest tree path whose ranks equal the
calibrated ranks[t]. Tree growing is checked against brute force over all trees, the hardware
fit against the argmax over an injected latency table, and --tree auto end to end.
"""

import itertools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax.checkpoint.heads_io import save_heads
from hydra_jax.decoding import api, dtype_choice, tree_calibration, tree_fit
from hydra_jax.decoding import speculative as spec
from hydra_jax.decoding import tree as tree_lib
from hydra_jax.decoding.acceptance import AcceptParams
from hydra_jax.decoding.drafting import SpecModels, heads_drafter
from hydra_jax.decoding.state import StopCriteria
from hydra_jax.decoding.tree import compile_tree, expected_accept_length, load_tree
from hydra_jax.model.heads import HeadsConfig, init_heads
from hydra_jax.tools.testing import make_hf_model, perturb_params

# A small vocabulary, so that random heads rank the true token anywhere in 0..31: the ranks
# (and so the accept lengths) vary from position to position.
VOCAB = 32
PROMPTS = [[5, 9, 11, 4], [7, 30, 12, 8, 21, 6, 17], [13, 14, 15]]
MAX_NEW = 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("tree_fit")
  model_dir = str(root / "model")
  # No EOS within reach of the prompts' continuations: eos is token 31 (still a valid id).
  make_hf_model(model_dir, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=2, num_kv_heads=1, weight_std=0.3, tokenizer=False, eos_token_id=31,
                seed=1)
  model = api.load_model(model_dir, tokenizer=False)
  heads = {}
  for i, arch in enumerate(("medusa", "hydra++")):
    cfg = HeadsConfig.for_base(model.config, arch, num_heads=3, num_layers=1)
    params = perturb_params(init_heads(cfg, model.config, model.params, jax.random.PRNGKey(i)), i, 0.3)
    heads[arch] = (cfg, params)
  return dict(root=root, model_dir=model_dir, model=model, heads=heads)


def _accept_from_ranks(tree, ranks_K):
  """Longest tree path whose ranks equal the true tokens' ranks: what greedy accepts."""
  return max([0] + [len(p) for p in tree.paths if tuple(ranks_K[:len(p)]) == p])


@pytest.mark.parametrize("arch", ["medusa", "hydra++"])
def test_calibrated_ranks_predict_every_speculative_step(setup, arch):
  model = setup["model"]
  cfg, params = setup["heads"][arch]
  cal = tree_calibration.calibrate(model, (cfg, params), PROMPTS, max_new_tokens=MAX_NEW)
  ar = api.generate(model, PROMPTS, MAX_NEW)
  seqs = [p + r.output_ids for p, r in zip(PROMPTS, ar)]
  assert cal.num_positions == sum(len(s) - len(p) - 1 for s, p in zip(seqs, PROMPTS))

  # acc by direct counting over positions: prefix within the top-10, then the rank's share.
  direct = np.zeros_like(cal.acc)
  for d in range(cfg.num_heads):
    rows = [r for r in cal.ranks if r[d] >= 0 and all(0 <= x < 10 for x in r[:d])]
    for r in range(10):
      direct[d, r] = sum(row[d] == r for row in rows) / max(len(rows), 1)
    assert cal.eligible[d] == len(rows)
  np.testing.assert_allclose(cal.acc, direct)
  assert 0.05 < cal.acc[0].sum() < 0.95  # random heads over 32 tokens: varied ranks

  # Replay: one greedy speculative step from every position whose 3 depths are known, all
  # positions as rows of one batch, with a tree fitted to these accuracies.
  tree = compile_tree(tree_fit.fit_tree(cal.acc, 24), name="fit")
  starts, rows = [], []
  i = 0
  for s, p in zip(seqs, PROMPTS):
    for t in range(len(p) - 1, len(s) - 2):
      if t + cfg.num_heads + 1 < len(s):
        starts.append((s, t))
        rows.append(cal.ranks[i])
      i += 1
  assert i == cal.num_positions
  b, width, cache_len = len(starts), 48, 96
  prompt = np.zeros((b, width), np.int32)
  lens = np.array([t + 1 for _, t in starts], np.int32)
  for r, (s, t) in enumerate(starts):
    prompt[r, :t + 1] = s[:t + 1]
  models = SpecModels(model.config, cfg, tree)

  @jax.jit
  def one_step(base, hp, prompt, lens):
    stop, accept_params = StopCriteria.make(100), AcceptParams.make()
    state = spec.spec_prefill(models, cache_len, base, hp, prompt, lens, jnp.ones((b,), bool),
                              jnp.arange(b, dtype=jnp.int32), jax.random.key(0), accept_params,
                              stop)
    drafter = heads_drafter(models, base, hp)
    return spec.spec_step(models, base, hp, drafter, state, accept_params, stop)

  state = one_step(model.params, params, jnp.asarray(prompt), jnp.asarray(lens))
  got = np.asarray(state.spec.accepted_BxS[:, 0]) - 1
  want = np.array([_accept_from_ranks(tree, row) for row in rows])
  np.testing.assert_array_equal(got, want)
  assert len(set(want.tolist())) >= 2, "the replay should see several accept lengths"
  # The replay estimate is the engine's mean accept length over these steps, exactly.
  assert tree_calibration.replay_accept_length(tree, np.stack(rows)) == pytest.approx(1 + got.mean())
  out = np.asarray(state.tokens)
  for r, (s, t) in enumerate(starts):  # and the emitted tokens are the greedy ones
    assert out[r, :want[r] + 2].tolist() == s[t + 1:t + want[r] + 3]


@pytest.mark.parametrize("arch", ["medusa", "hydra++"])
def test_decoded_accept_lengths_are_the_steps_speculative_decoding_takes(setup, arch):
  """The walk over the calibrated ranks predicts every step of a real greedy decode, in order
  (and so its tau), where the mean over all positions (replay) does not."""
  model = setup["model"]
  cfg, params = setup["heads"][arch]
  cal = tree_calibration.calibrate(model, (cfg, params), PROMPTS, max_new_tokens=MAX_NEW)
  assert cal.offsets.tolist()[-1] == cal.num_positions and len(cal.offsets) == len(PROMPTS) + 1
  tree = compile_tree(tree_fit.fit_tree_replay(cal.ranks, 12), name="fit")
  results = api.generate(model, PROMPTS, MAX_NEW, heads=(cfg, params), tree=tree)
  ar = api.generate(model, PROMPTS, MAX_NEW)
  assert [r.output_ids for r in results] == [r.output_ids for r in ar]
  engine = [int(a) for r in results for a in r.extra["accepted_per_step"]]
  walked = tree_calibration.decoded_accept_lengths(tree, cal.ranks, cal.offsets)
  assert walked == engine
  assert len(set(walked)) >= 2, "the walk should see several accept lengths"
  assert tree_calibration.decoded_accept_length(tree, cal.ranks, cal.offsets) == pytest.approx(
      sum(engine) / len(engine))


def _all_trees(depth, topk, n):
  nodes = [p for d in range(1, depth + 1) for p in itertools.product(range(topk), repeat=d)]
  for subset in itertools.combinations(nodes, n):
    chosen = set(subset)
    if all(len(p) == 1 or p[:-1] in chosen for p in subset):
      yield [list(p) for p in subset]


def test_fit_tree_maximises_expected_accept_length_by_brute_force():
  rng = np.random.default_rng(0)
  for trial in range(3):
    acc = rng.dirichlet(np.ones(4), size=2)[:, :3]  # [depth 2, top-3], rows sum < 1
    for n in range(1, 6):
      fitted = tree_fit.fit_tree(acc, n)
      assert len(fitted) == n
      best = max(expected_accept_length(t, acc) for t in _all_trees(2, 3, n))
      assert expected_accept_length(fitted, acc) == pytest.approx(best, abs=1e-12)


def test_fit_tree_replay_maximises_replay_accept_length_by_brute_force():
  rng = np.random.default_rng(2)
  ranks = np.minimum(rng.geometric(0.45, size=(300, 2)) - 1, 3)  # rank 3 = miss (top-3)
  ranks[:5, 1] = -1  # sequence ends: depth 2 unknown
  for n in range(1, 7):
    fitted = tree_fit.fit_tree_replay(ranks, n, max_topk=3)
    assert len(fitted) == n
    best = max(tree_calibration.replay_accept_length(t, ranks) for t in _all_trees(2, 3, n))
    assert tree_calibration.replay_accept_length(fitted, ranks) == pytest.approx(best, abs=1e-12)
  # More nodes than distinct prefixes: still a valid tree of the requested size.
  assert len(compile_tree(tree_fit.fit_tree_replay(ranks[:3], 7, max_topk=3)).paths) == 7


def test_hardware_fit_takes_the_argmax_of_expected_tokens_per_second():
  acc = tree_calibration.accuracy_from_ranks(
      np.random.default_rng(1).geometric(0.5, size=(4000, 3)) - 1, 10)[0]
  sizes = (4, 8, 16, 32, 64)
  direct = {s: expected_accept_length(compile_tree(tree_fit.fit_tree(acc, s - 1)), acc)
            for s in sizes}
  ref = load_tree("mc_sim_7b_63")
  ref_tau = expected_accept_length([list(p) for p in ref.paths if len(p) <= 3], acc)
  tables = [{4: 1.0, 8: 1.0, 16: 1.0, 32: 1.0, 64: 1.0},  # free verify: the biggest tree
            {s: 0.5 + s / 16 for s in sizes},  # costly verify: an interior optimum
            {s: 1.0 + (s > 8) * 10.0 for s in sizes}]  # a cliff after 8
  for table in tables:
    fit = tree_fit.fit_to_hardware(None, None, acc, sizes, references=["mc_sim_7b_63"],
                                   step_times={**table, "mc_sim_7b_63": 1e-3},
                                   ar_step_time=0.25)
    want = max(sizes, key=lambda s: direct[s] / table[s])
    assert fit.tree.num_nodes == want
    assert fit.tree.paths == compile_tree(tree_fit.fit_tree(acc, want - 1)).paths
    row = fit.chosen
    assert row["expected_tau"] == pytest.approx(direct[want])
    assert row["expected_speedup"] == pytest.approx(direct[want] / table[want] * 0.25)
    refs = [r for r in fit.rows if r["reference"]]  # timed and tabled, never chosen
    assert len(refs) == 1 and not refs[0]["chosen"]
    assert refs[0]["expected_tau"] == pytest.approx(ref_tau)
  fit = tree_fit.fit_to_hardware(None, None, acc, sizes, max_nodes=16,
                                 step_times=tables[0], ar_step_time=1.0)
  assert [r["size"] for r in fit.rows] == [4, 8, 16] and fit.tree.num_nodes == 16
  # Depth caps: one candidate per (size, cap), without duplicates; each deeper level costs.
  trees = tree_fit.candidate_trees(acc, (2, 4, 8), depths=(1, 2, 3))
  for t in trees:
    size, cap = (int(x) for x in t.name[len("fit_"):].split("_d"))
    assert t.num_nodes == size and t.depth <= cap
    assert t.paths == compile_tree(tree_fit.fit_tree(acc[:cap], size - 1)).paths
  assert len({t.paths for t in trees}) == len(trees) and trees[0].name == "fit_2_d1"
  times = {t.name: 1.0 + 0.01 * t.num_nodes + 0.5 * t.depth for t in trees}
  fit = tree_fit.fit_to_hardware(None, None, acc, (2, 4, 8), depths=(1, 2, 3),
                                 step_times=times, ar_step_time=1.0)
  want = max(trees, key=lambda t: expected_accept_length(t, acc) / times[t.name])
  assert fit.tree.name == want.name
  # Dynamic trees compete with their measured tau: chosen when they pay, tabled either way.
  dyn = [(load_tree("dynamic:8:3:3"), 3.5), (load_tree("dynamic:4:3:2:0.25"), 2.5)]
  for dyn_ms, won in ((1.0, "dynamic:8:3:3"), (100.0, want.name)):
    fit = tree_fit.fit_to_hardware(None, None, acc, (2, 4, 8), depths=(1, 2, 3),
                                   step_times={**times, **{t.name: dyn_ms for t, _ in dyn}},
                                   ar_step_time=1.0, dynamic=dyn)
    assert fit.tree.name == won
    rows = {r["name"]: r for r in fit.rows}
    assert rows["dynamic:8:3:3"]["dynamic"] and rows["dynamic:8:3:3"]["expected_tau"] == 3.5
    assert rows["dynamic:4:3:2:0.25"]["expected_speedup"] == pytest.approx(2.5 / dyn_ms)
  # With the calibration's offsets, static trees are scored by the decoded walk (the scale of
  # the dynamic trees' measured tau), whichever method grew them; replay tau is still tabled.
  # Easy stretches (every depth rank 0) and hard ones (misses), 20 positions each: a step
  # crosses an easy stretch 4 tokens at a time, so it holds fewer steps than positions.
  ranks = np.where((np.arange(600) // 20 % 2 == 0)[:, None], 0,
                   np.random.default_rng(2).geometric(0.3, size=(600, 3)) - 1 + 2)
  offsets = [0, 200, 450, 600]
  fit = tree_fit.fit_to_hardware(None, None, acc, (2, 4, 8), step_times=tables[1] | {2: 0.5},
                                 ar_step_time=1.0, ranks=ranks, method="replay",
                                 offsets=offsets)
  for r in fit.rows:
    tree = compile_tree(r["paths"])
    assert r["expected_tau"] == pytest.approx(
        tree_calibration.decoded_accept_length(tree, ranks, offsets))
    assert r["replay_tau"] == pytest.approx(tree_calibration.replay_accept_length(tree, ranks))
    assert r["expected_tau"] < r["replay_tau"]  # the walk skips what a long accept covers
  assert [t.name for t in tree_fit.dynamic_specs((5, 16), (1.0, 0.25), 3)] == [
      "dynamic:5:3:2", "dynamic:5:3:2:0.25", "dynamic:16:3:4", "dynamic:16:3:4:0.25"]


def test_resolve_tree_auto(setup, tmp_path, caplog):
  """tree.resolve_tree: the one place trees are resolved (generate, decode.py, demo, bench)."""
  assert tree_lib.resolve_tree("greedy_15", str(tmp_path)) == load_tree("greedy_15")
  with pytest.raises(tree_lib.TreeError, match="draft heads"):
    tree_lib.resolve_tree("chain_4", str(tmp_path), num_heads=2)
  with pytest.raises(tree_lib.TreeError, match="rank 9 but only the top-4"):
    tree_lib.resolve_tree("mc_sim_7b_63", None, num_heads=4, max_topk=4)  # a 4-token vocab
  with caplog.at_level(logging.WARNING, logger="hydra_jax.decoding"):
    fallback = tree_lib.resolve_tree("auto", str(tmp_path), num_heads=2)
  assert "tree_auto.json does not exist" in caplog.text and "mc_sim_7b_63" in caplog.text
  want = [p for p in load_tree("mc_sim_7b_63").paths if len(p) <= 2]
  assert list(fallback.paths) == sorted(want, key=lambda p: (len(p), p))
  assert tree_lib.resolve_tree("auto", None).name == "mc_sim_7b_63"  # heads given as arrays
  with open(tmp_path / "tree_auto.json", "w") as f:
    json.dump({"name": "mine", "paths": [[0], [1], [0, 0]], "table": []}, f)
  stored = tree_lib.resolve_tree("auto", str(tmp_path), num_heads=2)
  assert stored.name == "mine" and stored.paths == ((0,), (1,), (0, 0))


def _saved_heads_and_prompts(setup, tmp_path, arch):
  """The heads of `arch` saved to a directory, the calibration prompts to a JSONL file."""
  cfg, params = setup["heads"][arch]
  heads_dir = str(tmp_path / "heads")
  save_heads(heads_dir, params, cfg, base_cfg=setup["model"].config)
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
  return heads_dir, str(prompts)


def _fit_cli(setup, heads_dir, prompts, *flags):
  """tree_fit's command line on the test heads, with quick timings; the written JSON."""
  out = os.path.join(heads_dir, "tree_auto.json")
  assert tree_fit.main(["--model", setup["model_dir"], "--heads", heads_dir, "--prompts", prompts,
                        "--out", out, "--max-new-tokens", str(MAX_NEW), "--references",
                        "--depths", "--iters", "2", "--repeats", "1", *flags]) == 0
  with open(out) as f:
    return json.load(f)


def test_cli_writes_a_tree_that_generate_uses_with_tree_auto(setup, tmp_path):
  model = setup["model"]
  cfg, params = setup["heads"]["hydra++"]
  heads_dir, prompts = _saved_heads_and_prompts(setup, tmp_path, "hydra++")
  saved = _fit_cli(setup, heads_dir, prompts, "--sizes", "4", "8", "--dynamic-sizes")
  acc = np.asarray(saved["acc"])
  cal = tree_calibration.calibrate(model, (cfg, params), PROMPTS, max_new_tokens=MAX_NEW)
  np.testing.assert_allclose(acc, cal.acc)
  assert [r["size"] for r in saved["table"]] == [4, 8]
  best = max(saved["table"], key=lambda r: r["expected_tokens_per_s"])
  assert best["chosen"] and saved["size"] == best["size"]
  assert saved["paths"] == tree_fit.fit_tree_replay(cal.ranks, best["size"] - 1)
  assert all(r["step_ms"] > 0 for r in saved["table"]) and saved["ar_step_ms"] > 0

  ar = api.generate(model, PROMPTS, 12)
  sp = api.generate(model, PROMPTS, 12, heads=heads_dir, tree="auto")
  assert [r.output_ids for r in sp] == [r.output_ids for r in ar]
  used = [k[3] for k in api._ENGINES if k[2] == cfg]
  assert compile_tree(saved["paths"]) in used

  # With only a dynamic candidate besides size 2, whichever wins is written so that
  # --tree auto decodes with it, losslessly.
  saved = _fit_cli(setup, heads_dir, prompts, "--sizes", "2", "--dynamic-sizes", "6",
                   "--dynamic-temperatures", "0.5")
  rows = {r["name"]: r for r in saved["table"]}
  assert set(rows) == {"fit_2", "dynamic:6:3:2:0.5"} and rows["dynamic:6:3:2:0.5"]["dynamic"]
  tree = tree_lib.resolve_tree("auto", heads_dir, num_heads=3)
  chosen = next(r for r in rows.values() if r["chosen"])
  assert tree.dynamic == chosen["dynamic"] and (not tree.dynamic or tree.name == chosen["name"])
  sp = api.generate(model, PROMPTS, 12, heads=heads_dir, tree="auto")
  assert [r.output_ids for r in sp] == [r.output_ids for r in ar]


@pytest.mark.slow  # two fits and four decode-rate runs: 40 s on 2 cores
def test_dtype_auto_fits_a_tree_per_dtype_and_decoding_uses_the_faster(setup, tmp_path):
  cfg = setup["heads"]["medusa"][0]
  heads_dir, prompts = _saved_heads_and_prompts(setup, tmp_path, "medusa")
  out = os.path.join(heads_dir, "tree_auto.json")
  saved = _fit_cli(setup, heads_dir, prompts, "--sizes", "2", "4", "--dynamic-sizes", "--dtype",
                   "auto")
  record = saved["dtype_auto"]
  rates = {dt: saved["by_dtype"][dt]["expected_tokens_per_s"] for dt in ("float32", "bfloat16")}
  assert record["expected_tokens_per_s"] == pytest.approx(rates)
  decoded = record["decoded_tokens_per_s"]  # chosen on the decode loop, not the step timer
  assert set(decoded) == set(record["decoded_ar_tokens_per_s"]) == {"float32", "bfloat16"}
  assert record["choice"] == max(decoded, key=decoded.get) == saved["dtype"]
  assert saved["paths"] == saved["by_dtype"][record["choice"]]["paths"]
  for dt in ("float32", "bfloat16"):  # each dtype's own timings chose its tree
    table = saved["by_dtype"][dt]["table"]
    best = max(table, key=lambda r: r["expected_tokens_per_s"])
    assert best["chosen"] and best["paths"] == saved["by_dtype"][dt]["paths"]
  assert dtype_choice.resolve_dtype("auto", heads_dir)[0] == record["choice"]

  # Make the two entries differ and bf16 the choice: auto then loads bf16 with its tree, an
  # explicit dtype gets that dtype's tree, and no dtype gets the top level (the choice).
  saved["by_dtype"]["float32"]["paths"] = [[0]]
  saved["by_dtype"]["bfloat16"]["paths"] = [[0], [1], [0, 0]]
  saved["paths"], saved["dtype_auto"]["choice"] = [[0], [1], [0, 0]], "bfloat16"
  with open(out, "w") as f:
    json.dump(saved, f)
  assert dtype_choice.resolve_dtype("auto", heads_dir)[0] == "bfloat16"
  assert tree_lib.resolve_tree("auto", heads_dir, 3, dtype="float32").paths == ((0,),)
  assert tree_lib.resolve_tree("auto", heads_dir, 3, dtype="bfloat16").num_nodes == 4
  assert tree_lib.resolve_tree("auto", heads_dir, 3).num_nodes == 4
  bf16 = api.load_model(setup["model_dir"], tokenizer=False,
                        dtype=dtype_choice.resolve_dtype("auto", heads_dir)[0])
  api.generate(bf16, PROMPTS[:1], 4, heads=heads_dir, tree="auto")
  used = [k[3] for k in api._ENGINES if k[1] == "bfloat16" and k[2] == cfg]
  assert compile_tree([[0], [1], [0, 0]]).paths in [t.paths for t in used]
  # A fit measured on another device is not trusted: the platform's default, and why.
  saved["dtype_auto"]["device"] = "gpu:NVIDIA H200"
  with open(out, "w") as f:
    json.dump(saved, f)
  dtype, why = dtype_choice.resolve_dtype("auto", heads_dir)
  assert dtype == "float32" and "gpu:NVIDIA H200" in why
  assert dtype_choice.resolve_dtype("auto", str(tmp_path))[0] == "float32"  # no fit at all
  assert dtype_choice.platform_default("gpu") == dtype_choice.platform_default("tpu") == \
      "bfloat16"
  assert dtype_choice.resolve_dtype("bfloat16", heads_dir) == ("bfloat16", "as requested")


SHIPPED = os.path.join(os.path.dirname(api.__file__), "..", "assets", "tiny_shakespeare", "heads")


@pytest.mark.parametrize("kind", ["medusa", "hydra", "hydra_pp"])
def test_shipped_heads_have_a_fitted_tree(kind):
  heads_dir = os.path.join(SHIPPED, kind)
  if not os.path.isdir(heads_dir):
    pytest.skip(f"no shipped heads at {heads_dir}")
  with open(os.path.join(heads_dir, "tree_auto.json")) as f:
    saved = json.load(f)
  tree = tree_lib.resolve_tree("auto", heads_dir, num_heads=4)
  chosen = [r for r in saved["table"] if r["chosen"]]
  assert len(chosen) == 1
  if "dynamic" in saved:
    assert tree.dynamic and tree.name == saved["dynamic"] == chosen[0]["name"]
  else:
    assert [list(p) for p in tree.paths] == saved["paths"] and tree.name == saved["name"]
    assert chosen[0]["paths"] == saved["paths"]
  assert chosen[0]["expected_tokens_per_s"] == max(
      r["expected_tokens_per_s"] for r in saved["table"] if not r["reference"])
  for dt, entry in saved.get("by_dtype", {}).items():  # one fit per dtype (--dtype auto)
    tree = tree_lib.resolve_tree("auto", heads_dir, num_heads=4, dtype=dt)
    assert (tree.name == entry["dynamic"] if "dynamic" in entry
            else [list(p) for p in tree.paths] == entry["paths"])
  if "dtype_auto" in saved:
    rates = saved["dtype_auto"]["decoded_tokens_per_s"]
    assert saved["dtype_auto"]["choice"] == saved["dtype"] == max(rates, key=rates.get)
