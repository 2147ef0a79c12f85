#!/usr/bin/env bash
# Set-up for a fresh machine: a virtual environment in .venv with every part of the project
# (serve, optimize, loadtest, dev). The container image uses uv and uv.lock instead (see Dockerfile).
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[serve,optimize,loadtest,dev]'
echo "ready: .venv/bin/python -m optimize list" >&2
