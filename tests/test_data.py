"""Data pipeline: assistant masks, bad records, packing, shuffle, host slices, resume, TFDS."""

import json

import numpy as np
import pytest

from hydra_jax.tools.testing import SIMPLE_CHAT_TEMPLATE, make_tokenizer
from hydra_jax.training import data as data_lib
from hydra_jax.training import templates

# SIMPLE_CHAT_TEMPLATE with transformers' {% generation %} markers around each reply, so that
# transformers itself computes the assistant mask (return_assistant_tokens_mask).
GENERATION_TEMPLATE = SIMPLE_CHAT_TEMPLATE.replace(
    "ASSISTANT: {{ m['content'] }}</s>",
    "ASSISTANT: {% generation %}{{ m['content'] }}</s>{% endgeneration %}")

CONVO = [
    {"from": "system", "value": "You are terse."},
    {"from": "human", "value": "Who speaks first in the play?"},
    {"from": "gpt", "value": "The First Citizen, before they proceed any further."},
    {"from": "human", "value": "And then?"},
    {"from": "gpt", "value": "All: speak, speak. ñé 日本"},
]


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer(512, SIMPLE_CHAT_TEMPLATE)


def _cfg(**kw):
  cfg = data_lib.default_data_config()
  cfg.update(kw)
  return cfg


def _chat_records(n, seed=0):
  rng = np.random.default_rng(seed)
  words = "speak hear me citizen first all resolved rather die famish know chief enemy".split()
  out = []
  for i in range(n):
    turns = []
    for _ in range(1 + i % 2):
      turns.append({"from": "human", "value": " ".join(rng.choice(words, 4)) + f" {i}?"})
      turns.append({"from": "gpt", "value": " ".join(rng.choice(words, 3 + i % 5)) + "."})
    out.append({"id": str(i), "conversations": turns})
  return out


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def _masked_runs(ids, mask):
  runs, cur = [], []
  for t, m in zip(ids, mask):
    if m:
      cur.append(int(t))
    elif cur:
      runs.append(cur)
      cur = []
  return runs + ([cur] if cur else [])


def test_chat_template_mask_is_exactly_the_replies(tok):
  msgs = templates.normalize_conversation({"conversations": CONVO})
  ids, mask = templates.tokenize_conversation(msgs, tok, "chat_template")
  full = tok.apply_chat_template(msgs, tokenize=False)
  assert tok.decode(ids) == full  # one tokenization of the whole rendered conversation
  runs = [tok.decode(r) for r in _masked_runs(ids, mask)]
  replies = [m["value"] + "</s>" for m in CONVO if m["from"] == "gpt"]
  # A reply's first token may carry the separator space before it (byte-level BPE merges
  # " All"): that token is the reply's first target, as with {% generation %} tags.
  assert [r[1:] if r.startswith(" ") else r for r in runs] == replies
  # Everything else (system, user turns, "ASSISTANT:" markers) is prompt.
  prompt = tok.decode([t for t, m in zip(ids, mask) if not m])
  assert prompt.split() == ("You are terse. USER: Who speaks first in the play? ASSISTANT: "
                            "USER: And then? ASSISTANT:").split()


def test_chat_template_mask_matches_transformers_generation_mask(tok):
  """Our prefix-rendering mask equals transformers' own {% generation %} mask."""
  msgs = templates.normalize_conversation({"conversations": CONVO})
  ours_ids, ours_mask = templates.tokenize_conversation(msgs, tok, "chat_template")
  gen_tok = make_tokenizer(512, GENERATION_TEMPLATE)
  assert templates.has_generation_tags(gen_tok)
  hf = gen_tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
  np.testing.assert_array_equal(ours_ids, hf["input_ids"])
  np.testing.assert_array_equal(ours_mask, hf["assistant_masks"])
  # And our generation-tag path returns transformers' result unchanged.
  ids2, mask2 = templates.tokenize_conversation(msgs, gen_tok, "chat_template")
  np.testing.assert_array_equal(ids2, hf["input_ids"])
  np.testing.assert_array_equal(mask2, hf["assistant_masks"])


def test_vicuna_template_renders_like_fastchat(tok):
  msgs = templates.normalize_conversation({"conversations": CONVO[1:]})
  text, spans = templates.render_vicuna(msgs, "</s>")
  # FastChat get_conv_template("vicuna_v1.1").get_prompt(): sep " ", sep2 "</s>".
  assert text == (templates.VICUNA_SYSTEM_PROMPT + " USER: Who speaks first in the play? "
                  "ASSISTANT: The First Citizen, before they proceed any further.</s>"
                  "USER: And then? ASSISTANT: All: speak, speak. ñé 日本</s>")
  assert [text[a:b] for a, b in spans] == [CONVO[2]["value"] + "</s>", CONVO[4]["value"] + "</s>"]
  # The simple Jinja template has the Vicuna shape: same ids and same mask given the prompt.
  ids, mask = templates.tokenize_conversation(msgs, tok, "vicuna_v1.1")
  ref_ids, ref_mask = templates.tokenize_conversation(
      msgs, tok, "chat_template", system_prompt=templates.VICUNA_SYSTEM_PROMPT)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)
  # plain: no role markers; only replies (and their EOS) are trained.
  ids, mask = templates.tokenize_conversation(msgs, tok, "plain")
  assert tok.decode(ids) == ("Who speaks first in the play?\n" + CONVO[2]["value"] + "</s>"
                             "And then?\n" + CONVO[4]["value"] + "</s>")
  assert [tok.decode(r) for r in _masked_runs(ids, mask)] == [
      CONVO[2]["value"] + "</s>", CONVO[4]["value"] + "</s>"]


def test_openai_style_messages_and_role_aliases():
  a = templates.normalize_conversation({"messages": [
      {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
      {"role": "user", "content": "dangling question"}]})
  b = templates.normalize_conversation({"conversations": [
      {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
  assert a == b == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_malformed_records_are_skipped_and_counted(tok, tmp_path, caplog):
  good = _chat_records(20)
  bad = [
      ("not_a_dict", [1, 2]),
      ("no_conversations", {"id": "x"}),
      ("empty_conversation", {"conversations": []}),
      ("unknown_role", {"conversations": [{"from": "narrator", "value": "x"}]}),
      ("non_string_value", {"conversations": [{"from": "human", "value": 3},
                                              {"from": "gpt", "value": "y"}]}),
      ("first_turn_not_human", {"conversations": [{"from": "gpt", "value": "x"},
                                                  {"from": "human", "value": "y"}]}),
      ("roles_not_alternating", {"conversations": [{"from": "human", "value": "x"},
                                                   {"from": "human", "value": "y"},
                                                   {"from": "gpt", "value": "z"}]}),
      ("empty_turn", {"conversations": [{"from": "human", "value": "x"},
                                        {"from": "gpt", "value": "  "}]}),
      ("no_assistant_turn", {"conversations": [{"from": "human", "value": "x"}]}),
      ("misplaced_system", {"conversations": [{"from": "human", "value": "x"},
                                              {"from": "system", "value": "s"},
                                              {"from": "gpt", "value": "z"}]}),
      ("turn_not_a_dict", {"conversations": ["hello"]}),
      ("invalid_json", '{"conversations": [ broken'),
      ("no_assistant_tokens_within_seq_len", {"conversations": [
          {"from": "human", "value": "speak " * 40}, {"from": "gpt", "value": "ok"}]}),
  ]
  records = good[:10] + [r for _, r in bad] + good[10:]
  path = _write_jsonl(tmp_path / "mixed.jsonl", records)
  with caplog.at_level("WARNING"):
    train, ev, stats = data_lib.build_datasets(_cfg(path=path), tok, 32, 4, seed=0,
                                               process_index=0, process_count=1)
  assert stats["skipped"] == {reason: 1 for reason, _ in bad}
  assert stats["records"] == len(records)
  assert train.num_examples + ev.num_examples == len(good)
  assert sum("skipped 13 of 33 records" in r.message for r in caplog.records) == 1
  assert stats["skipped_examples"]["invalid_json"]["index"] == 10 + len(bad) - 2
  for _ in range(2 * train.steps_per_epoch + 1):  # several epochs, no crash
    next(train)


def test_empty_dataset_is_a_clear_error(tok, tmp_path):
  path = _write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}, "not json", {"conversations": []}])
  with pytest.raises(ValueError, match="no usable conversations.*no_conversations"):
    data_lib.build_datasets(_cfg(path=path), tok, 32, 2, seed=0, process_index=0, process_count=1)
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(ValueError, match="fewer than one seq_len"):
    data_lib.build_datasets(_cfg(source="text", path=str(empty)), tok, 32, 2, seed=0,
                            process_index=0, process_count=1)


def test_seq_len_beyond_model_max_is_a_clear_error(tok, tmp_path):
  path = _write_jsonl(tmp_path / "c.jsonl", _chat_records(8))
  with pytest.raises(ValueError, match="beyond the model's max_position_embeddings=64"):
    data_lib.build_datasets(_cfg(path=path), tok, 128, 2, seed=0, process_index=0,
                            process_count=1, max_len=64)


def test_chat_rows_are_padded_or_truncated(tok, tmp_path):
  records = _chat_records(6) + [{"conversations": [
      {"from": "human", "value": "hi"}, {"from": "gpt", "value": "speak " * 60}]}]
  path = str(tmp_path / "c.json")  # the JSON-list flavour
  with open(path, "w") as f:
    json.dump(records, f)
  t = 48
  train, ev, stats = data_lib.build_datasets(_cfg(path=path, eval_fraction=0.0), tok, t, 7,
                                             seed=0, process_index=0, process_count=1)
  batch = next(train)
  rows = [(tokens.tolist(), mask) for tokens, mask in zip(batch["tokens"], batch["loss_mask"])]
  truncated = 0
  for rec in records:
    ids, mask = templates.tokenize_conversation(
        templates.normalize_conversation(rec), tok, "chat_template")
    n = min(len(ids), t)
    truncated += len(ids) > t
    got_tokens, got_mask = next(r for r in rows if r[0][:n] == ids[:n].tolist())
    np.testing.assert_array_equal(got_mask[:n], mask[:n])
    assert got_tokens[n:] == [tok.pad_token_id] * (t - n) and not got_mask[n:].any()
  assert stats["truncated"] == truncated >= 1 and ev.num_examples == 0
  np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(t), (7, 1)))
  assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32


def _text_file(tmp_path, chars=6000):
  from hydra_jax.tools.testing import _corpus_text
  p = tmp_path / "shakespeare.txt"
  p.write_text(_corpus_text(chars))
  return str(p)


def test_text_packing_covers_the_stream(tok, tmp_path):
  path = _text_file(tmp_path)
  t, g = 32, 4
  train, ev, stats = data_lib.build_datasets(_cfg(source="text", path=path, eval_fraction=0.1),
                                             tok, t, g, seed=3, process_index=0, process_count=1)
  stream = np.asarray(tok(open(path).read(), add_special_tokens=False)["input_ids"] +
                      [tok.eos_token_id])
  n = len(stream) // t
  assert stats["stream_tokens"] == len(stream) and stats["records"] == n
  assert train.num_examples + ev.num_examples == n and ev.num_examples == int(np.ceil(0.1 * n))
  windows = stream[:n * t].reshape(n, t)
  seen = []
  for _ in range(train.steps_per_epoch):
    b = next(train)
    assert b["loss_mask"].all()
    for row in b["tokens"]:
      seen.append(int(np.flatnonzero((windows == row).all(1))[0]))
  for b in ev.eval_batches():
    for row, m in zip(b["tokens"], b["loss_mask"]):
      if m.any():
        seen.append(int(np.flatnonzero((windows == row).all(1))[0]))
  # Every full training batch plus the whole eval split: no window twice, none invented.
  assert len(set(seen)) == len(seen) == train.steps_per_epoch * g + ev.num_examples


def test_shuffle_is_deterministic_per_seed_and_epoch(tok, tmp_path):
  path = _write_jsonl(tmp_path / "c.jsonl", _chat_records(40))

  def run(seed, steps):
    it, _, _ = data_lib.build_datasets(_cfg(path=path), tok, 32, 4, seed=seed,
                                       process_index=0, process_count=1)
    return it, [next(it)["tokens"] for _ in range(steps)]

  it, a = run(0, 18)
  _, b = run(0, 18)
  _, c = run(1, 18)
  assert it.steps_per_epoch == 9 and it.epoch == 2
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))
  # Each epoch is a permutation of the same examples, in a different order.
  assert not np.array_equal(np.stack(a[:9]), np.stack(a[9:]))
  key = lambda rows: sorted(r.tobytes() for r in np.concatenate(rows))  # noqa: E731
  assert key(a[:9]) == key(a[9:])
  np.testing.assert_array_equal(it.epoch_order(1), it.epoch_order(1))


@pytest.mark.parametrize("source", ["sharegpt", "text"])
def test_two_processes_together_equal_one(tok, tmp_path, source):
  path = (_write_jsonl(tmp_path / "c.jsonl", _chat_records(30)) if source == "sharegpt"
          else _text_file(tmp_path))
  cfg = _cfg(source=source, path=path)
  one, ev1, _ = data_lib.build_datasets(cfg, tok, 32, 4, seed=7, process_index=0, process_count=1)
  parts = [data_lib.build_datasets(cfg, tok, 32, 4, seed=7, process_index=p, process_count=2)
           for p in range(2)]
  steps = one.steps_per_epoch + 2  # across an epoch boundary
  for _ in range(steps):
    whole = next(one)
    halves = [next(p[0]) for p in parts]
    assert halves[0]["tokens"].shape == (2, 32)
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]))
  for whole, h0, h1 in zip(ev1.eval_batches(), parts[0][1].eval_batches(),
                           parts[1][1].eval_batches()):
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([h0[k], h1[k]]))


def test_resume_from_state_is_exact(tok, tmp_path):
  path = _write_jsonl(tmp_path / "c.jsonl", _chat_records(30))
  build = lambda: data_lib.build_datasets(_cfg(path=path), tok, 32, 4, seed=5,  # noqa: E731
                                          process_index=0, process_count=1)[0]
  a = build()
  for _ in range(9):  # into the second epoch (7 steps per epoch)
    next(a)
  state = json.loads(json.dumps(a.get_state()))
  expected = [next(a) for _ in range(8)]
  b = build()
  b.set_state(state)
  for want in expected:
    got = next(b)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  other = data_lib.build_datasets(_cfg(path=path), tok, 32, 2, seed=5, process_index=0,
                                  process_count=1)[0]
  with pytest.raises(ValueError, match="global_batch_size"):
    other.set_state(state)
  changed = _write_jsonl(tmp_path / "d.jsonl", _chat_records(30, seed=1))  # same size, new text
  other = data_lib.build_datasets(_cfg(path=changed), tok, 32, 4, seed=5, process_index=0,
                                  process_count=1)[0]
  with pytest.raises(ValueError, match="fingerprint"):
    other.set_state(state)


def test_eval_batches_pad_with_masked_rows(tok, tmp_path):
  path = _write_jsonl(tmp_path / "c.jsonl", _chat_records(40))
  _, ev, stats = data_lib.build_datasets(_cfg(path=path, eval_fraction=0.25), tok, 32, 4, seed=0,
                                         process_index=0, process_count=1)
  batches = list(ev.eval_batches())
  assert ev.num_examples == 10 and len(batches) == 3 == stats["eval_batches"]
  assert [int(b["loss_mask"].any(1).sum()) for b in batches] == [4, 4, 2]
  assert (batches[-1]["tokens"][2:] == tok.pad_token_id).all()
  assert len(list(ev.eval_batches(max_batches=2))) == 2


def test_tfds_text_dataset_from_mock_data(tok, tmp_path):
  """tiny_shakespeare through tfds.data_source under tfds.testing.mock_data, without TF.

  MockPolicy.USE_CODE builds the dataset info from TFDS's builder code (no files needed) and
  mocks only the ArrayRecord reader; its examples are deterministic random strings.
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    source = tfds.data_source("tiny_shakespeare", split="train", data_dir=str(tmp_path))
    texts = [source[i]["text"] for i in range(len(source))]
    cfg = _cfg(source="tfds", tfds_name="tiny_shakespeare", tfds_data_dir=str(tmp_path),
               tfds_split="train", eval_fraction=0.0)
    train, _, stats = data_lib.build_datasets(cfg, tok, 8, 2, seed=0, process_index=0,
                                              process_count=1)
  texts = [t.decode() if isinstance(t, bytes) else t for t in texts]
  assert stats["documents"] == 12 and len(set(texts)) > 1
  stream = []
  for t in texts:
    stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  n = len(stream) // 8
  windows = set(map(tuple, np.asarray(stream[:n * 8]).reshape(n, 8).tolist()))
  got = [tuple(r) for _ in range(train.steps_per_epoch) for r in next(train)["tokens"].tolist()]
  assert stats["records"] == n == train.num_examples and train.steps_per_epoch == n // 2
  assert len(set(got)) == len(got) == 2 * (n // 2) and set(got) <= windows


def test_bad_config_is_a_clear_error(tok, tmp_path):
  with pytest.raises(ValueError, match=r"unknown data field 'pathh' \(did you mean path\?\)"):
    data_lib.build_datasets({"source": "text", "pathh": "x"}, tok, 32, 2, 0, 0, 1)
  bad = tmp_path / "latin1.txt"
  bad.write_bytes("First Citizen:\nBefore we proceed\ncaf\xe9\n".encode("latin-1"))
  with pytest.raises(data_lib.DataError, match=r"latin1.txt:3: not UTF-8"):
    data_lib.build_datasets({"source": "text", "path": str(bad)}, tok, 8, 2, 0, 0, 1)
  with pytest.raises(FileNotFoundError, match="matches no file"):
    data_lib.build_datasets({"source": "text", "path": str(tmp_path / "nope*.txt")}, tok, 32, 2,
                            0, 0, 1)
  with pytest.raises(ValueError, match="not divisible"):
    data_lib.build_datasets({"source": "text", "path": _text_file(tmp_path)}, tok, 32, 3, 0, 0, 2)
  no_template = make_tokenizer(512)
  path = _write_jsonl(tmp_path / "c.jsonl", _chat_records(4))
  with pytest.raises(ValueError, match="no chat_template.*vicuna_v1.1"):
    data_lib.build_datasets({"path": path}, no_template, 32, 2, 0, 0, 1)


def test_missing_tfds_is_a_clear_error(tok, monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
  with pytest.raises(ImportError, match=r"pip install 'hydra_jax\[tfds\]'"):
    data_lib.build_datasets({"source": "tfds", "tfds_name": "lm1b"}, tok, 32, 2, 0, 0, 1)


def test_long_documents_are_tokenized_in_newline_chunks_losslessly(tok, monkeypatch):
  from hydra_jax.tools.testing import _corpus_text
  monkeypatch.setattr(data_lib, "_TEXT_CHUNK_CHARS", 200)
  docs = [_corpus_text(3000), "", "no newline at all " * 30]
  stream = data_lib._tokenize_documents(docs, tok)
  assert tok.decode(stream) == "".join(d + "</s>" for d in docs)
