"""benchmarks/accelerator.sh, the prepared GPU/TPU check, runs end to end on a CPU at tiny sizes."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~70 s on 2 cores; CI's slow run has it
def test_accelerator_script_runs_on_cpu_tiny(tmp_path):
  out = tmp_path / "report.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "bench_accelerator.py"), "--tiny",
       "--dtype", "float32", "--batch-sizes", "1", "2", "--trees", "8", "16", "--new-tokens", "16",
       "--prompt-len", "16", "--iters", "2", "--repeats", "1", "--out", str(out)],
      capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| batch | AR tokens/s |" in proc.stdout
  report = json.loads(out.read_text())
  assert [r["batch"] for r in report["rows"]] == [1, 2]
  for r in report["rows"]:
    assert r["ar_tokens_per_s"] > 0 and r["ar_step_ms"] > 0
    assert set(r["spec_over_ar"]) == {"grown_8", "grown_16"}
    assert all(v > 0 for v in r["spec_over_ar"].values())
    assert r["roofline_tokens_per_s"] is None  # a CPU has no published peak bandwidth
