# Shared by tools/demo, tools/test and tools/bench: make .venv and build the Cython core.
# Rebuilds only when the build inputs changed since the last install (a stamp of their hash).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KVSVR_VENV:-$ROOT/.venv}"

quietly() {   # run a command; show its output only if it fails
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "failed: $*" >&2
    return 1
  fi
  rm -f "$log"
}

ensure_venv() {   # $1: extras, e.g. "test" or ""
  local extras="$1" stamp inputs
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    python3 -m venv "$VENV"
    quietly "$VENV/bin/python" -m pip install --upgrade pip
  fi
  inputs=$(cd "$ROOT" && cat setup.py pyproject.toml kvsvr/*.pyx kvsvr/*.pxi 2>/dev/null | sha256sum | cut -c1-16)
  stamp="$VENV/.kvsvr-build-${extras:-base}-$inputs"
  if [ ! -f "$stamp" ] || ! ls "$ROOT"/kvsvr/_core*.so "$ROOT"/kvsvr/_syncer*.so >/dev/null 2>&1; then
    echo "==> installing kvsvr${extras:+[$extras]} and building the Cython core"
    (cd "$ROOT" && quietly "$VENV/bin/python" -m pip install -e ".${extras:+[$extras]}")
    rm -f "$VENV"/.kvsvr-build-"${extras:-base}"-*
    touch "$stamp"
  fi
}
