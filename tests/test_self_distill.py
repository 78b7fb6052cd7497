"""Self-distillation: answers match transformers' greedy decoding and load back as training data."""

import json

import numpy as np
import pytest

from hydra_jax.tools.testing import SIMPLE_CHAT_TEMPLATE, make_hf_model
from hydra_jax.training import data as data_lib
from hydra_jax.training import self_distill as sd
from hydra_jax.training import templates

PROMPTS = [
    {"question_id": 81, "turns": ["Speak, speak. Who is chief enemy to the people?",
                                  "Now say it again, but shorter."]},
    {"question_id": 82, "turns": ["Before we proceed any further, hear me speak."]},
    {"question_id": 83, "turns": ["You are all resolved rather to die than to famish?",
                                  "Why?"]},
]
MAX_NEW = 6


def test_read_prompts_formats(tmp_path):
  lines = tmp_path / "p.txt"
  lines.write_text("first prompt\n\nsecond prompt\n")
  assert [p["turns"] for p in sd.read_prompts(str(lines))] == [["first prompt"], ["second prompt"]]
  single = tmp_path / "p.jsonl"
  single.write_text('{"prompt": "a"}\n{"prompt": 3}\n{"prompt": "b", "system": "s"}\n')
  got = sd.read_prompts(str(single))
  assert [(p["turns"], p["system"]) for p in got] == [(["a"], None), (["b"], "s")]
  sharegpt = tmp_path / "s.jsonl"
  sharegpt.write_text(json.dumps({"id": "x", "conversations": [
      {"from": "system", "value": "sys"}, {"from": "human", "value": "q1"},
      {"from": "gpt", "value": "old answer"}, {"from": "human", "value": "q2"}]}) + "\n")
  # A trailing question has no answer to replace, so it is not re-asked either.
  assert sd.read_prompts(str(sharegpt)) == [{"id": "x", "system": "sys", "turns": ["q1"]}]
  empty = tmp_path / "e.txt"
  empty.write_text("\n")
  with pytest.raises(ValueError, match="no prompts"):
    sd.read_prompts(str(empty))


def test_named_template_prompt_ends_where_the_reply_starts():
  from hydra_jax.tools.testing import make_tokenizer
  tok = make_tokenizer(512, SIMPLE_CHAT_TEMPLATE)
  msgs = [{"role": "user", "content": "hear me"}]
  ids = sd.generation_prompt_ids(msgs, tok, "vicuna_v1.1")
  assert tok.decode(ids) == templates.VICUNA_SYSTEM_PROMPT + " USER: hear me ASSISTANT:"
  # The vicuna rendering and the Vicuna-shaped Jinja template prompt identically.
  np.testing.assert_array_equal(
      ids, sd.generation_prompt_ids(msgs, tok, "chat_template", templates.VICUNA_SYSTEM_PROMPT))
  assert tok.decode(sd.generation_prompt_ids(msgs, tok, "plain")) == "hear me\n"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("base"))
  torch_model = make_hf_model(path, vocab_size=512, hidden_size=32, intermediate_size=64,
                              num_layers=2, num_heads=4, num_kv_heads=2,
                              max_position_embeddings=256, chat_template=SIMPLE_CHAT_TEMPLATE,
                              seed=3)
  return path, torch_model


def test_self_distill_matches_transformers_greedy_and_loads_back(tiny_model, tmp_path):
  import torch
  from transformers import AutoTokenizer
  path, torch_model = tiny_model
  prompts_file = tmp_path / "q.jsonl"
  prompts_file.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
  out = str(tmp_path / "distilled.jsonl")
  stats = sd.main(["--model", path, "--prompts", str(prompts_file), "--out", out,
                   "--max-new-tokens", str(MAX_NEW), "--batch-size", "2", "--chat"])
  records = [json.loads(line) for line in open(out)]
  assert stats["conversations"] == len(records) == len(PROMPTS)
  assert [r["id"] for r in records] == ["81", "82", "83"]

  # Every reply is what transformers' greedy decoding gives for the same conversation so far.
  tok = AutoTokenizer.from_pretrained(path)
  for rec, prompt in zip(records, PROMPTS):
    conv = rec["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt"] * len(prompt["turns"])
    assert [t["value"] for t in conv[::2]] == prompt["turns"]
    msgs = []
    for human, gpt in zip(conv[::2], conv[1::2]):
      msgs.append({"role": "user", "content": human["value"]})
      ids = sd.generation_prompt_ids(msgs, tok, "chat_template")
      with torch.no_grad():
        ref = torch_model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                   eos_token_id=2, pad_token_id=3)
      want = tok.decode(ref[0, len(ids):].tolist(), skip_special_tokens=True).strip()
      assert gpt["value"] == want
      msgs.append({"role": "assistant", "content": gpt["value"]})

  # The output is ShareGPT JSONL that the training pipeline reads without skipping anything.
  cfg = data_lib.default_data_config()
  cfg.update(path=out, template="chat_template", eval_fraction=0.0)
  train, _, dstats = data_lib.build_datasets(cfg, tok, 64, 3, seed=0, process_index=0,
                                             process_count=1, max_len=256)
  assert dstats["skipped"] == {} and train.num_examples == len(records)
  batch = next(train)
  assert batch["loss_mask"].sum() > 0
