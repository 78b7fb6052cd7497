"""hydra_jax.tools.bench end to end on a tiny random model with random Medusa and Hydra++ heads.

The reference for "lossless" is our autoregressive greedy decoding, which the benchmark runs
itself; here it is also recomputed independently with generate(mode="ar") and compared with
the outputs the benchmark recorded. The accept statistics are checked against identities
that hold for any heads (tau = 1 + sum of accept@d; the histogram is a distribution).
"""

import json

import jax
import numpy as np
import pytest

from hydra_jax.tools import bench
from hydra_jax.checkpoint.heads_io import save_heads
from hydra_jax.checkpoint.hf import export_hf
from hydra_jax.decoding import api
from hydra_jax.model.config import ModelConfig
from hydra_jax.model.heads import HeadsConfig, param_shapes
from hydra_jax.model.llama import init_params
from hydra_jax.tools.testing import SIMPLE_CHAT_TEMPLATE, make_tokenizer


def _random_heads(cfg, model, seed, scale=0.05):
  """Small random weights, LM heads = the base's plus noise (some drafts get accepted).

  Built from the shapes in numpy: no init jit to compile, which keeps the test fast.
  """
  rng = np.random.default_rng(seed)
  lm = np.asarray(model.params["lm_head"]["kernel"])

  def leaf(path, x):
    noise = scale * rng.standard_normal(x.shape).astype(np.float32)
    names = [getattr(p, "key", "") for p in path]
    if names[-2:] == ["lm_head", "kernel"]:
      return lm + noise
    return (np.ones(x.shape, np.float32) if names[-1] == "scale" else noise)

  return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg, model.config))


# Medusa (cartesian drafting) and Hydra++ (sequential drafting + prefix layer) cover both
# drafters; plain Hydra runs the same code as Hydra++ minus the prefix layer.
ARCHS = ("medusa", "hydra++")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("bench")
  model_dir = str(root / "model")
  # A random Llama written with our exporter (no torch import: the test stays fast).
  tok = make_tokenizer(256, chat_template=SIMPLE_CHAT_TEMPLATE)
  cfg = ModelConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                    bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
                    pad_token_id=tok.pad_token_id)
  export_hf(init_params(cfg, jax.random.PRNGKey(0)), cfg, model_dir, tokenizer=tok)
  model = api.load_model(model_dir)
  heads = {}
  for i, arch in enumerate(ARCHS):
    hcfg = HeadsConfig.for_base(model.config, arch, num_heads=2, num_layers=2)
    heads[arch] = str(root / arch.replace("+", "p"))
    save_heads(heads[arch], _random_heads(hcfg, model, 10 + i), hcfg, base_cfg=model.config)
  prompts = root / "mt_bench.jsonl"  # MT-Bench's shape: two turns per question
  prompts.write_text("".join(json.dumps({"question_id": i, "turns": t}) + "\n" for i, t in enumerate(
      [["ROMEO: What light through yonder window", "And then?"],
       ["To be, or not to be", "Say it again."]])))
  return dict(root=root, model_dir=model_dir, model=model, heads=heads, prompts=str(prompts))


def test_bench_runs_and_reports(setup, capsys):
  out = setup["root"] / "out"
  argv = ["--model", setup["model_dir"], "--prompts", setup["prompts"], "--turns", "all",
          "--prompt-format", "chat", "--tree", "greedy_7", "--batch-size", "1",
          "--max-new-tokens", "12", "--repeats", "1", "--out", str(out),
          "--heads"] + [f"{a}={d}" for a, d in setup["heads"].items()]
  assert bench.main(argv) == 0
  printed = capsys.readouterr().out
  assert (out / "results.png").stat().st_size > 1000
  assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  md = (out / "results.md").read_text()
  assert md.strip() in printed and "| method |" in md
  report = json.loads((out / "results.json").read_text())

  rows = {r["name"]: r for r in report["methods"]}
  assert list(rows) == ["autoregressive", *ARCHS]
  assert report["setup"]["num_prompts"] == 2 and report["setup"]["max_new_tokens"] == 12
  ar = rows["autoregressive"]
  assert ar["tau"] == 1.0 and ar["speedup"] == pytest.approx(1.0)
  for name in ARCHS:
    r = rows[name]
    for key in ("tau", "tokens_per_s", "speedup", "accept_rates", "accept_hist", "lossless",
                "new_tokens", "steps", "time_s", "tree", "tree_nodes", "step_cost_vs_ar"):
      assert key in r, (name, key)
    assert r["lossless"] is True, r["mismatches"]
    assert r["new_tokens"] == ar["new_tokens"] == 4 * 12  # 2 questions x 2 turns
    assert r["tree"] == "greedy_7" and r["tree_nodes"] == 8 and len(r["accept_rates"]) == 2
    assert 1.0 <= r["tau"] <= 3.0
    assert r["tau"] == pytest.approx(1.0 + sum(r["accept_rates"]))
    assert sum(r["accept_hist"].values()) == pytest.approx(1.0)
    assert r["accept_rates"][0] >= r["accept_rates"][1]
    assert r["tokens_per_s"] > 0 and r["speedup"] == pytest.approx(
        r["tokens_per_s"] / ar["tokens_per_s"])
    # Every run's first token comes from the prefill; each step emits >= 1 more.
    assert r["steps"] <= r["new_tokens"] - 4

  # The recorded outputs are plain greedy decoding, recomputed here on their own: turn 1
  # from the questions, turn 2 from turn 1 + its answer + the follow-up question. (Batch 1,
  # all prompts of a turn in one call: the shapes the benchmark compiled, nothing new.)
  model, tok = setup["model"], setup["model"].tokenizer
  questions = [("ROMEO: What light through yonder window", "And then?"),
               ("To be, or not to be", "Say it again.")]
  first = api.generate(model, [q for q, _ in questions], 12, chat=True, mode="ar", batch_size=1)
  outputs = report["outputs"]
  assert [(o["turn"], o["prompt"]) for o in outputs] == [(1, 0), (1, 1), (2, 0), (2, 1)]
  assert [o["text"] for o in outputs[:2]] == [r.text for r in first]
  ids = []
  for (q1, q2), answer in zip(questions, first):
    convo = [{"role": "user", "content": q1}, {"role": "assistant", "content": answer.text},
             {"role": "user", "content": q2}]
    ids.append(tok(tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"])
  second = api.generate(model, ids, 12, mode="ar", batch_size=1)
  assert [o["prompt_tokens"] for o in outputs[2:]] == [len(x) for x in ids]
  assert [o["text"] for o in outputs[2:]] == [r.text for r in second]

  # Spec-Bench answer files, one per method, as its evaluation/speed.py reads them: per
  # question, per turn new_tokens / wall_time; accept_lengths per step (AR: all 1).
  for name, row in rows.items():
    recs = [json.loads(x) for x in (out / "specbench" / f"{name}.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in recs] == [0, 1]
    choices = [r["choices"][0] for r in recs]
    assert sum(sum(c["new_tokens"]) for c in choices) == row["new_tokens"]
    assert all(len(c["turns"]) == len(c["new_tokens"]) == len(c["wall_time"]) == 2
               for c in choices)
    assert [c["turns"][0] for c in choices] == [r.text for r in first]  # lossless, every method
    steps = [a for c in choices for a in c["accept_lengths"]]
    assert len(steps) == row["steps"] and all(1 <= a <= row["depth"] + 1 for a in steps)
    speed = np.mean([sum(c["new_tokens"]) / sum(c["wall_time"]) for c in choices])
    assert speed > 0


def test_prompt_formats(tmp_path):
  mt = tmp_path / "mt.jsonl"
  mt.write_text(json.dumps({"question_id": 1, "turns": ["a?", "b?"]}) + "\n"
                + json.dumps({"prompt": "c"}) + "\n" + json.dumps({"prompt_ids": [4, 5]}) + "\n")
  assert bench.read_prompts(str(mt)) == [["a?", "b?"], ["c"], [4, 5]]
  lines = tmp_path / "p.txt"
  lines.write_text("one\n\ntwo {x}\n")
  assert bench.read_prompts(str(lines)) == [["one"], ["two {x}"]]
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"text": "x"}) + "\n")
  with pytest.raises(bench.BenchError, match="turns"):
    bench.read_prompts(str(bad))
  with pytest.raises(bench.BenchError, match="NAME=DIR"):
    bench.parse_heads(["just/a/dir"])
  assert bench.first_difference([1, 2, 3], [1, 2, 3]) is None
  assert bench.first_difference([1, 2, 3], [1, 5, 3]) == 1
  assert bench.first_difference([1, 2], [1, 2, 3]) == 2
