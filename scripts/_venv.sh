# Sourced by scripts/test.sh and scripts/demo.sh: creates .venv (if missing) and installs the
# package into it, editable, with the given extras. Needs only python3 (>= 3.10) and pip's
# package index. Afterwards $VENV_PY is the venv's python.
#
#   ensure_venv            # the package and its runtime dependencies
#   ensure_venv test       # + pytest, torch (CPU wheel pinned in pyproject.toml), ...
#
# Environment: PYTHON (the interpreter that creates the venv, default python3),
# HYDRA_VENV (the venv directory, default .venv in the repository root), HYDRA_REINSTALL=1
# (run pip install even when pyproject.toml has not changed since the last install).

ensure_venv() {
  local extras="${1:-}"
  local root venv spec stamp hash
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${HYDRA_VENV:-$root/.venv}"
  VENV_PY="$venv/bin/python"

  if [[ ! -x "$VENV_PY" ]]; then
    local py="${PYTHON:-python3}"
    if ! command -v "$py" >/dev/null 2>&1; then
      echo "error: $py not found; install Python >= 3.10 or set PYTHON=/path/to/python3" >&2
      return 1
    fi
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      echo "error: hydra_jax needs Python >= 3.10, $py is $("$py" --version 2>&1);" \
           "set PYTHON=/path/to/python3.11" >&2
      return 1
    fi
    echo "creating $venv with $("$py" --version 2>&1)" >&2
    if ! "$py" -m venv "$venv"; then
      echo "error: '$py -m venv' failed; on Debian/Ubuntu install python3-venv" \
           "(apt-get install python3-venv) or set PYTHON to another interpreter" >&2
      rm -rf "$venv"
      return 1
    fi
  fi

  # Reinstall only when pyproject.toml or the extras changed since the last install (an
  # install with extras also serves a request without them).
  spec="."
  [[ -n "$extras" ]] && spec=".[$extras]"
  hash="$("$VENV_PY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$root/pyproject.toml")"
  stamp="$venv/.hydra_jax_install"
  if [[ -f "$stamp" && -z "${HYDRA_REINSTALL:-}" ]]; then
    if grep -qxF "$hash $spec" "$stamp" || { [[ -z "$extras" ]] && grep -q "^$hash " "$stamp"; }; then
      return 0
    fi
  fi
  echo "installing hydra_jax ($spec) into $venv" >&2
  (cd "$root" && "$VENV_PY" -m pip install --quiet -e "$spec")
  echo "$hash $spec" >> "$stamp"
}
