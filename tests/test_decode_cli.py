"""decode.py: the --json contract end to end in a subprocess, and bad input -> exit 2.

The output is checked against transformers' greedy `generate` on the same saved model.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from hydra_jax.tools.testing import make_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECODE = os.path.join(REPO, "decode.py")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("model"))
  return path, make_hf_model(path, "llama", num_heads=4, num_kv_heads=2, seed=3)


@pytest.fixture(scope="module")
def decode_main():
  spec = importlib.util.spec_from_file_location("decode_cli", DECODE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def _write_jsonl(path, objs):
  with open(path, "w") as f:
    for o in objs:
      f.write((o if isinstance(o, str) else json.dumps(o)) + "\n")
  return str(path)


def test_json_output_end_to_end(saved, tmp_path):
  path, torch_model = saved
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(path)
  prompts = [{"prompt": "First Citizen: hear me"}, {"prompt_ids": [17, 80, 201, 5, 9]},
             {"prompt": "Speak, speak."}]
  max_new = 12
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
  proc = subprocess.run(
      [sys.executable, DECODE, "--model", path, "--prompts-file",
       _write_jsonl(tmp_path / "p.jsonl", prompts), "--max-new-tokens", str(max_new),
       "--batch-size", "2", "--json", "--dtype", "auto"],
      capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  assert "dtype auto: float32 (no measured dtype fit" in proc.stderr  # a CPU, no heads
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == len(prompts)  # stdout holds only the JSON objects; logs go to stderr
  for obj, line in zip(prompts, lines):
    out = json.loads(line)
    ids = obj.get("prompt_ids") or tok(obj["prompt"])["input_ids"]
    with torch.no_grad():
      hf = torch_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                max_new_tokens=max_new, do_sample=False, pad_token_id=3)
    hf = hf[0, len(ids):].tolist()
    assert out["output_ids"] == hf
    assert out["new_tokens"] == len(hf)
    assert out["steps"] == len(hf) - 1
    assert out["text"] == tok.decode(hf, skip_special_tokens=True)
    assert out["tokens_per_s"] > 0
    assert out["finish_reason"] in ("eos", "length")
  assert "tokens/s" in proc.stderr


@pytest.mark.parametrize("case", ["missing_model", "empty_prompt", "bad_jsonl", "bad_ids",
                                  "no_prompt_key", "too_long"])
def test_bad_input_exits_2_with_a_message(case, saved, decode_main, tmp_path, capsys):
  path, _ = saved
  args = ["--model", path, "--max-new-tokens", "4"]
  expect = {
      "missing_model": ("does not exist", ["--model", str(tmp_path / "nope"), "--prompt", "x"]),
      "empty_prompt": ("prompt 0 is empty", ["--prompt", ""]),
      "bad_jsonl": ("a.jsonl:2: not valid JSON",
                    ["--prompts-file", _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a"}, "{"])]),
      "bad_ids": ("list of integer token ids",
                  ["--prompts-file", _write_jsonl(tmp_path / "b.jsonl", [{"prompt_ids": ["a"]}])]),
      "no_prompt_key": ('"prompt"',
                        ["--prompts-file", _write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}])]),
      "too_long": ("--cache-len", ["--prompt", "hear me " * 20, "--cache-len", "16"]),
  }[case]
  message, extra = expect
  if case == "missing_model":
    args = args[2:]
  assert decode_main(args + extra) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err


def test_usage_errors_exit_2(decode_main, capsys):
  with pytest.raises(SystemExit) as e:
    decode_main(["--model", "x", "--max-new-tokens", "4"])  # neither --prompt nor a file
  assert e.value.code == 2
  assert "--prompt" in capsys.readouterr().err
