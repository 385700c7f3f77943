# Shared set-up for scripts/serve, scripts/test and scripts/check: a virtual environment in .venv with the
# project installed (editable) and its generated gRPC code, rebuilt only when the inputs change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setting up .venv (first run installs the dependencies; durable-rules compiles from source)" >&2
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.needlepoint-installed"
INPUTS="$(cat pyproject.toml hatch_build.py proto/needlepoint/v1/*.proto | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$INPUTS" ] || [ ! -d service/needlepoint/v1 ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test,dev]"
  echo "$INPUTS" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
