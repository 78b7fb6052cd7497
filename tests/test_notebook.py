"""Executes notebooks/hydra_jax_demo.ipynb headless (nbclient) on its tiny settings, so that
the notebook cannot rot: every cell must run without error, the speculative outputs must equal
greedy decoding (the notebook asserts it) and the benchmark's table and plot must be shown."""

from __future__ import annotations

import os
import re

import pytest

import _tiny_run as tr
from hydra_jax.registry import embedded
from hydra_jax.registry.paths import REPO_ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "hydra_jax_demo.ipynb")


def _outputs(cell):
  texts, mimes = [], set()
  for out in cell.get("outputs", []):
    if out.get("output_type") == "stream":
      texts.append(out.get("text", ""))
    for mime, data in (out.get("data") or {}).items():
      mimes.add(mime)
      if mime in ("text/html", "text/plain", "text/markdown"):
        texts.append(data if isinstance(data, str) else "".join(data))
  return "".join(texts), mimes


# ~2.5 min on 2 cores: in the slow run (CI runs it too).
@pytest.mark.slow
def test_notebook_runs_on_tiny_settings(tmp_path_factory, monkeypatch):
  # The kernel inherits this environment: one CPU device and the tiny settings. The notebook's
  # default model is the embedded one; a checkout without it gets the shared tiny model.
  if not os.path.isfile(os.path.join(embedded.MODEL_DIR, "config.json")):
    monkeypatch.setenv("HYDRA_NOTEBOOK_MODEL", tr.tiny_model(tmp_path_factory))
  else:
    monkeypatch.delenv("HYDRA_NOTEBOOK_MODEL", raising=False)
  monkeypatch.setenv("HYDRA_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  scratch = tmp_path_factory.mktemp("notebook")
  monkeypatch.setenv("TMPDIR", str(scratch))  # the notebook's workdir (tempfile.mkdtemp)
  monkeypatch.setenv("HYDRA_CACHE", str(scratch))
  monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows plots

  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError with the cell's traceback on any failure

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert any("parameters" in c.metadata.get("tags", []) for c in code)
  text = "\n".join(_outputs(c)[0] for c in code)
  mimes = set().union(*(_outputs(c)[1] for c in code))
  assert "text/html" in mimes  # the highlighted text
  loss_plot = [c for c in code if "metrics.jsonl" in c.source]
  assert loss_plot and "image/png" in _outputs(loss_plot[0])[1]  # the training loss curve
  assert "drafted by the heads and accepted by the base model" in text  # the HTML legend
  assert "lossless: the speculative output is identical" in text  # demo.summary_lines
  # The benchmark: its table (rendered markdown), then its plot in the last cell.
  last_text, last_mimes = _outputs(code[-1])
  assert re.search(r"^\| autoregressive \|", last_text, re.M), last_text[-2000:]
  assert "image/png" in last_mimes
