#!/usr/bin/env bash
# Usage: benchmarks/device_wheels.sh DEST [--python-version 3.12] [--max-mb 58]
#
# The wheels a GPU host with no network needs, beside a CUDA image that already has PyTorch,
# torchvision, numpy and pandas, to run serve_bench.py, the GPU tests and `python -m optimize build`:
# KServe 0.21, Locust 2.47 and everything they need (for linux x86_64, CPython --python-version), with
# the image's own heavy packages left out (torch, triton, the nvidia-* CUDA libraries, numpy, pandas,
# scipy, sympy, networkx, pillow). It prints the total size and fails when it is above --max-mb (what one
# call to the lent machine carries, with room for the working tree).
#
# On the GPU host, install them beside the image's packages, not over them, and put them first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DEST/*.whl
#   export PYTHONPATH=/tmp/site
# (--no-deps: pip checks no pins against the image; a server and Locust then import these versions.)
set -o errexit -o nounset -o pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; -*) echo "error: DEST first, got $1" >&2; exit 2 ;; esac
DEST=$1
shift
PYVER=3.12
MAX_MB=58
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER=${2:?--python-version needs a value, e.g. 3.12}; shift 2 ;;
    --max-mb) MAX_MB=${2:?--max-mb needs a number}; shift 2 ;;
    *) echo "error: unknown option $1 (valid: --python-version, --max-mb)" >&2; exit 2 ;;
  esac
done
case "$MAX_MB" in ''|*[!0-9]*) echo "error: --max-mb must be a whole number, got $MAX_MB" >&2; exit 2 ;; esac

PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"
ALL=$(mktemp -d)
trap 'rm -rf "$ALL"' EXIT

# pip matches each manylinux tag exactly: name the ones wheels of these packages use.
platforms=()
for p in manylinux1_x86_64 manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 \
         manylinux_2_35_x86_64; do
  platforms+=(--platform "$p")
done
echo "resolving kserve 0.21, locust 2.47 and their needs for CPython $PYVER (linux x86_64) ..." >&2
"$PYTHON" -m pip download -q --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$ALL" "kserve==0.21.0" "locust==2.47.*" "orjson>=3.10" "torch-pruning>=1.5" "rich>=13"

# The image's own: left out (the heavy ones; torch-pruning's torch pin would otherwise bring a second torch).
skip='^(torch|triton|nvidia_.*|cuda_bindings|cuda_toolkit|numpy|pandas|scipy|sympy|networkx|mpmath|pillow|setuptools)-'
kept=0
for whl in "$ALL"/*.whl; do
  name=$(basename "$whl")
  if printf '%s\n' "$name" | tr '[:upper:]' '[:lower:]' | grep -Eq "$skip"; then
    continue
  fi
  cp "$whl" "$DEST"/
  kept=$((kept + 1))
done
mb=$(du -sm "$DEST" | cut -f1)
echo "$kept wheels, $mb MB in $DEST" >&2
if [ "$mb" -gt "$MAX_MB" ]; then
  echo "error: $mb MB is more than --max-mb $MAX_MB: carry them in two calls, or raise --max-mb" >&2
  exit 1
fi
