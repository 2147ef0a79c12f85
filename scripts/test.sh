#!/usr/bin/env bash
# The test command. The load tests run in a pytest process of their own: Locust's gevent
# monkey-patching and KServe must never share one. Extra arguments go to both runs.
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
status=0
"$PY" -m pytest --ignore=tests/loadtest "$@" || status=$?
if [ -d tests/loadtest ]; then
  "$PY" -m pytest tests/loadtest "$@" || status=$?
fi
exit "$status"
