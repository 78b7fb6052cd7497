"""hydra_jax.tools.demo on a tiny random model with random heads: the printed report, the lossless
check against plain greedy decoding, the draft highlighting, and the missing-asset messages."""

from __future__ import annotations

import io
import os

import jax
import pytest

import _tiny_run as tr
from hydra_jax.tools import demo
from hydra_jax.checkpoint.heads_io import save_heads
from hydra_jax.decoding.api import generate, load_model
from hydra_jax.model.heads import HeadsConfig, init_heads

PROMPT = "First Citizen:"
NEW = 24
TREE = "greedy_7"  # depth 2: a small tree keeps the compile short


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """The shared tiny model and random Medusa heads for it (2 heads, as the depth-2 tree)."""
  model_dir = tr.tiny_model(tmp_path_factory)
  model = load_model(model_dir)
  heads_dir = str(tmp_path_factory.mktemp("demo_heads") / "medusa")
  # Random Medusa heads start as copies of the base LM head on the same hidden state, so
  # they draft the token that repeats the root: accepted wherever the output repeats.
  cfg = HeadsConfig.for_base(model.config, "medusa", num_heads=2, num_layers=1)
  save_heads(heads_dir, init_heads(cfg, model.config, model.params, jax.random.PRNGKey(0)), cfg,
             base_cfg=model.config)
  return model_dir, model, heads_dir


def _run_cli(argv):
  out = io.StringIO()
  rc = demo.main(argv, stdout=out)
  return rc, out.getvalue()


def test_cli_prints_highlighted_text_and_stats(assets):
  model_dir, model, heads_dir = assets
  argv = ["--model", model_dir, "--heads", heads_dir, "--prompt", PROMPT,
          "--max-new-tokens", str(NEW), "--tree", TREE, "--repeats", "1"]
  rc, text = _run_cli(argv + ["--no-color"])
  assert rc == 0, text
  lines = text.splitlines()
  assert lines[0].startswith("legend: [bracketed] = drafted by the heads")
  assert any(l.startswith("accept length: ") for l in lines)
  assert any(l.startswith("tokens/s: ") for l in lines)
  assert any(l.startswith("speedup: ") and "x over autoregressive" in l for l in lines)
  assert any(l.startswith("lossless: the speculative output is identical") for l in lines)
  assert "\x1b[" not in text  # a StringIO is no terminal and --no-color was given

  # Against plain greedy decoding, which the demo does not touch.
  [ar] = generate(model, [PROMPT], NEW, mode="ar")
  body = text.split("-" * 72 + "\n")[1]
  full = model.tokenizer.decode(ar.prompt_ids + ar.output_ids, skip_special_tokens=True)
  assert "[" not in full and "]" not in full  # else the next check needs another prompt
  shown = body.replace("[", "").replace("]", "").replace(demo.NEWLINE_MARK, "")
  assert shown.rstrip("\n") == full.rstrip("\n")

  rc, colored = _run_cli(argv + ["--color"])
  assert rc == 0
  assert colored.startswith("legend: \x1b[30;42mhighlighted\x1b[0m")


def test_run_demo_mask_and_segments(assets):
  _, model, heads_dir = assets
  res = demo.run_demo(model, heads_dir, PROMPT, NEW, TREE, repeats=1)
  [ar] = generate(model, [PROMPT], NEW, mode="ar")
  assert res.identical and res.output_ids == ar.output_ids
  assert len(res.mask) == len(res.output_ids) == NEW
  # The base model's own tokens: the prefill's plus one bonus per verify step, except that the
  # last step may be cut by max_new_tokens before its bonus token.
  assert NEW - res.drafted_tokens in (1 + res.steps, res.steps)
  assert res.accept_length >= 1.0
  # The segments are the generated text, cut at token boundaries.
  prompt_text = model.tokenizer.decode(res.prompt_ids, skip_special_tokens=True)
  full = model.tokenizer.decode(res.prompt_ids + res.output_ids, skip_special_tokens=True)
  assert prompt_text + "".join(t for t, _ in res.segments) == full
  assert res.drafted_tokens > 0  # random Medusa heads draft repeats; this output has some
  assert any(d for _, d in res.segments)
  html = demo.render_html(res.segments, prompt=prompt_text)
  assert html.startswith("<div") and html.count("accepted draft") == sum(
      1 for _, d in res.segments if d)


def test_draft_mask_closed_form():
  # prefill token, step emitting 3 (2 drafts + bonus), 1 (bonus), 2 (1 draft + bonus, cut).
  assert demo.draft_mask([3, 1, 2], 6) == [False, True, True, False, False, True]
  assert demo.draft_mask([], 1) == [False]
  with pytest.raises(ValueError, match="accounts for 2 tokens"):
    demo.draft_mask([1], 3)


def test_segments_keep_multibyte_characters_whole(assets):
  _, model, _ = assets
  tok = model.tokenizer
  text = "Café — ¿qué? naïve 🙂 end"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  mask = [i % 2 == 1 for i in range(len(ids))]
  segs = demo.token_segments(tok, ids, mask)
  assert "".join(t for t, _ in segs) == tok.decode(ids)
  assert all("\ufffd" not in t for t, _ in segs)
  # Runs alternate between draft and not.
  assert all(a[1] != b[1] for a, b in zip(segs, segs[1:]))
  assert demo.render_text(segs, "brackets").replace("[", "").replace("]", "") == tok.decode(ids)


def test_render_marks_drafted_line_breaks():
  segs = [("Hi", False), ("\nKING:", True), ("\n", False), ("\n", True), ("Go", False)]
  mark = demo.NEWLINE_MARK
  assert demo.render_text(segs, "brackets") == f"Hi[{mark}]\n[KING:]\n[{mark}]\nGo"
  ansi = demo.render_text(segs, "ansi", prompt="P: ")
  assert ansi == (f"\x1b[2mP: \x1b[0mHi\x1b[30;42m{mark}\x1b[0m\n\x1b[30;42mKING:\x1b[0m\n"
                  f"\x1b[30;42m{mark}\x1b[0m\nGo")


def test_missing_assets_say_what_is_missing(tmp_path, monkeypatch, capsys, assets):
  model_dir, _, _ = assets
  rc, _ = _run_cli(["--model", str(tmp_path / "nope")])
  assert rc == 2 and "no config.json" in capsys.readouterr().err
  rc, _ = _run_cli(["--model", model_dir])  # no MODEL/heads/hydra_pp next to it
  err = capsys.readouterr().err
  assert rc == 2 and "pass --heads DIR" in err and os.path.join("heads", "hydra_pp") in err
  # The embedded model without its trained heads (as before they are trained).
  fake = tmp_path / "embedded"
  fake.mkdir()
  (fake / "config.json").write_text("{}")
  monkeypatch.setattr(demo, "EMBEDDED_MODEL", str(fake))
  rc, _ = _run_cli([])
  err = capsys.readouterr().err
  assert rc == 2 and "embedded model's trained draft heads are missing" in err
  monkeypatch.setattr(demo, "EMBEDDED_MODEL", str(tmp_path / "gone"))
  rc, _ = _run_cli([])
  assert rc == 2 and "embedded base model is missing" in capsys.readouterr().err
