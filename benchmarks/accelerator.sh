#!/usr/bin/env bash
# The GPU / TPU check of the lean decode engine, one prepared script (< 8 minutes on one GPU):
# AR tokens/s and % of the HBM roofline for a random ~1.1B Llama in bf16 at batch 1 and 8,
# and the speculative step cost over an AR step for 8 / 16 / 64-token trees.
#
#   bash benchmarks/accelerator.sh                  # installs into .venv if needed (see below)
#   bash benchmarks/accelerator.sh --tiny --dtype float32   # the same on a CPU, tiny sizes
#
# On a GPU machine install JAX's CUDA build first (pip install -U "jax[cuda12]"), or set
# HYDRA_VENV to a venv that has it. Extra flags go to benchmarks/bench_accelerator.py; the
# table goes to stdout and, with OUT set, the JSON report to $OUT/accelerator.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
ensure_venv
out=()
[[ -n "${OUT:-}" ]] && mkdir -p "$OUT" && out=(--out "$OUT/accelerator.json")
exec "$VENV_PY" benchmarks/bench_accelerator.py "${out[@]}" "$@"
