#!/usr/bin/env bash
# The whole test suite from a fresh clone: creates .venv if missing, installs the package with
# its test extra (pytest, torch==2.13.0 as the parity reference, ...), then runs the default
# tests and afterwards the slow-marked ones. Exits non-zero if either run fails.
#
#   bash scripts/test.sh                          # everything
#   bash scripts/test.sh tests/test_kv_cache.py   # extra arguments go to both pytest runs
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
ensure_venv test

status=0
echo "== pytest (default tests)" >&2
"$VENV_PY" -m pytest -q --durations=10 "$@" || status=$?
# With arguments that select only slow tests, an empty default run is fine; without, it is not.
if [[ $status -eq 5 && $# -gt 0 ]]; then
  status=0
fi

echo "== pytest -m slow" >&2
slow=0
"$VENV_PY" -m pytest -q -m slow --durations=10 "$@" || slow=$?
# Exit code 5 means no test carries the slow mark (or matched the arguments): not a failure.
if [[ $slow -ne 0 && $slow -ne 5 ]]; then
  status=$slow
fi

if [[ $status -ne 0 ]]; then
  echo "FAILED (default run and/or slow run, see above)" >&2
fi
exit "$status"
