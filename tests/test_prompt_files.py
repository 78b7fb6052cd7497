"""Prompt files (hydra_jax.decoding.prompt_files): the one reader of decode.py, bench, tree_fit."""

import json

import pytest

from hydra_jax.decoding import tree_fit
from hydra_jax.decoding.prompt_files import (PromptFileError, read_prompt_file,
                                             read_single_turn_prompts)


def _jsonl(path, *objs):
  path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
  return str(path)


def test_layouts_and_entries(tmp_path):
  mixed = _jsonl(tmp_path / "m.jsonl", {"question_id": 1, "turns": ["a?", "b?"]}, "",
                 {"prompt": "c"}, {"prompt_ids": [4, 5]})
  assert read_prompt_file(mixed) == [["a?", "b?"], ["c"], [4, 5]]
  text = tmp_path / "t.txt"
  text.write_bytes(b"one\r\n\ntwo {x}\n")  # not JSON objects: one prompt per line
  assert read_prompt_file(str(text)) == [["one"], ["two {x}"]]
  single = _jsonl(tmp_path / "s.jsonl", {"turns": ["only"]}, {"prompt": "p"}, {"prompt_ids": [7]})
  assert read_single_turn_prompts(single, "--prompts", "tool") == ["only", "p", [7]]


@pytest.mark.parametrize("content,message", [
    (b'{"prompt": "a"}\n{\n', "x:2: not valid JSON"),
    (b'{"prompt": "a"}\n{"prompt": "\xff"}\n', "x:2: not UTF-8"),
    (b'{"prompt_ids": ["a"]}\n', "list of integer token ids"),
    (b'{"text": "a"}\n', '"prompt" (text)'),
    (b'{"prompt": "a"}\n[1, 2]\n', "x:2: expected a JSON object"),
    (b"\n  \n", "holds no prompts"),
])
def test_errors_name_the_line_and_the_fix(tmp_path, content, message):
  path = tmp_path / "x"
  path.write_bytes(content)
  with pytest.raises(PromptFileError, match=message.replace("x:", f"{path}:")
                     .replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
    read_prompt_file(str(path))
  with pytest.raises(PromptFileError, match="cannot read --prompts-file"):
    read_prompt_file(str(tmp_path / "missing"), "--prompts-file")


def test_single_turn_tools_refuse_conversations(tmp_path):
  conv = _jsonl(tmp_path / "c.jsonl", {"prompt": "a"}, {"turns": ["q1", "q2"]})
  with pytest.raises(PromptFileError, match="prompt 2 has 2 turns; decode.py answers one turn"):
    read_single_turn_prompts(conv, "--prompts-file", "decode.py")


def test_tree_fit_bad_prompts_exit_2_without_loading_the_model(tmp_path, capsys):
  bad = _jsonl(tmp_path / "bad.jsonl", {"prompt": "a"}, "{")
  code = tree_fit.main(["--model", str(tmp_path / "no_model"), "--heads", str(tmp_path / "h"),
                        "--prompts", bad, "--out", str(tmp_path / "t.json")])
  err = capsys.readouterr().err
  assert code == 2 and f"tree_fit: error: {bad}:2: not valid JSON" in err
  assert "Traceback" not in err
