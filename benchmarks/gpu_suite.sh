#!/usr/bin/env bash
# Usage: benchmarks/gpu_suite.sh [--steps check,decode,onnx,aoti-dynamic,aoti-blockbuf,pruning,serve,ab,decode-ab,serve-aoti]
#                                [--artifacts DIR]
#                                [--variant SLUG] [--duration S] [--pairs N] [--help]
#
# The GPU records of issues #4 and #5, step by step, on one CUDA host (from the repository root).
# Each step is one benchmark script; each writes its JSON record under benchmarks/results/ (and a
# copy under $OUT when set). Steps are sized to fit one 10-minute call each:
#
#   check         GPU, driver and versions; which runtimes import (always runs first)
#   decode        decode_bench: nvJPEG, crop and the prepare stage per batch size, idle and
#                 beside the model; then batches of varying size against a fixed size, and
#                 prepared in nvJPEG calls of 32; the decoder's ceiling (1, 2 and 4
#                 processes decoding at once, JPEG-engine load from NVML)                 ~4 min
#   onnx          gpu_bench: ONNX Runtime CUDA EP (FP32, FP16, I/O binding) against stock
#                 torch.compile and the CUDA-graph variant (needs onnxruntime-gpu)       ~4 min
#   aoti-dynamic  gpu_bench: AOTInductor, one package with a dynamic batch dimension     ~4 min
#   aoti-blockbuf gpu_bench: the fused package (block buffers, Triton kernels) with a new or
#                 a shared bottleneck tensor per layer, against stock torch.compile; then
#                 blockbuf_bench (the rewrites under stock compile: the layer kernel, with
#                 the 3x3 kernel, without split-K, shared bottleneck; kernel profiles) ~10 min
#   pruning       gpu_bench: each channel-pruned variant against its unpruned base (the CUDA-graph
#                 pair, the fused-mids pair), both loaded, 10 alternating rounds         ~8 min
#   serve         serve_bench on --variant (default densenet121-eager-fp16-cl-graphs): on-device, floor, cold start,
#                 single-JPEG sweep, a profiler trace of 20 batches under load (and py-spy stacks
#                 of the device process when py-spy is on PATH), 12 MP, batched             ~5 min
#   ab            --variant at 128 users, interleaved A/B arms on fresh servers: metrics
#                 off, connections left as the kernel hashes them (--pairs)             ~5 min
#   decode-ab     --variant, 32 JPEGs per request at 16 users: one nvJPEG call per batch against
#                 calls of exactly 32 (--decode_batch 32), interleaved (--pairs)        ~3 min
#   serve-aoti    aoti_load_time and serve_bench on densenet121-aoti-fp16-cl-dynamic (built first,
#                 about 3.5 min on the H100; cached)                                     ~9 min
#
# An artifact already in --artifacts DIR/<slug> (variant.json present) is used as it is: carry a
# built AOTInductor artifact there instead of compiling it again (about 3.5 minutes on an H100).
# Environment: PYTHON (default python3), DENSENET_AOTI_CACHE (compiled packages are reused).
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
STEPS="check,decode,onnx,aoti-dynamic,aoti-blockbuf,pruning,serve,ab,decode-ab,serve-aoti"
ARTIFACTS="${TMPDIR:-/tmp}/densenet-suite-artifacts"
DURATION=10
PAIRS=2
VARIANT=densenet121-eager-fp16-cl-graphs
SERVER_ARGS="--max_batch_size 128 --frontends 6"

usage() {
  sed -n '2,/^set -o/{/^set -o/!p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

log() {
  printf '[gpu_suite %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2
}

parse_args() {
  while [ "$#" -gt 0 ]; do
    case "$1" in
      --steps) STEPS="$2"; shift 2 ;;
      --artifacts) ARTIFACTS="$2"; shift 2 ;;
      --variant) VARIANT="$2"; shift 2 ;;
      --duration) DURATION="$2"; shift 2 ;;
      --pairs) PAIRS="$2"; shift 2 ;;
      -h|--help) usage; exit 0 ;;
      *) log "unknown argument: $1"; usage >&2; exit 1 ;;
    esac
  done
  local step
  for step in ${STEPS//,/ }; do
    case "${step}" in
      check|decode|onnx|aoti-dynamic|aoti-blockbuf|pruning|serve|ab|decode-ab|serve-aoti) ;;
      *) log "unknown step '${step}'; valid: check, decode, onnx, aoti-dynamic, aoti-blockbuf, pruning, serve, ab, decode-ab, serve-aoti"
         exit 1 ;;
    esac
  done
}

step_check() {
  if ! command -v nvidia-smi >/dev/null; then
    log "nvidia-smi not found: this suite needs a CUDA host (run the CPU benchmarks instead)"
    exit 1
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2
  "${PYTHON}" - <<'EOF' >&2
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for name in ("torchvision", "kserve", "locust", "onnxruntime"):
    try:
        mod = importlib.import_module(name)
        extra = ""
        if name == "onnxruntime":
            extra = " providers=" + ",".join(mod.get_available_providers())
        print(name, getattr(mod, "__version__", "?") + extra)
    except Exception as e:  # report every missing piece at once
        print(name, "MISSING:", type(e).__name__, e)
EOF
}

ort_cuda_available() {
  "${PYTHON}" -c 'import onnxruntime as o; import sys; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)' \
    >/dev/null 2>&1
}

step_decode() {
  log "decode: nvJPEG, crop and prepare per batch size, idle and beside the model"
  "${PYTHON}" "${ROOT}/benchmarks/decode_bench.py" --sizes vga,12mp --batch-sizes 1,8,32,64,128
  log "decode: batches of varying size (as under load) against a fixed size, idle and beside the model"
  "${PYTHON}" "${ROOT}/benchmarks/decode_bench.py" --vary-batch 16-80 --reps 40 --call-size 32
  log "decode: the decoder's ceiling, 1, 2 and 4 processes decoding batches of 128 at once"
  "${PYTHON}" "${ROOT}/benchmarks/decode_bench.py" --processes 1,2,4 --contention-batch 128 --window-s 4
}

step_onnx() {
  if ! ort_cuda_available; then
    log "onnx: skipped, onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)"
    return 0
  fi
  log "onnx: ONNX Runtime CUDA EP against stock torch.compile"
  "${PYTHON}" "${ROOT}/benchmarks/gpu_bench.py" --name issue4-onnx --skip-autotune --batch-sizes 1,32,128 \
    --variants densenet121-onnx-fp32,densenet121-onnx-fp16,densenet121-eager-fp16-cl-graphs
}

step_aoti_dynamic() {
  log "aoti-dynamic: one AOTInductor package for every batch size"
  "${PYTHON}" "${ROOT}/benchmarks/gpu_bench.py" --name issue4-aoti-dynamic --skip-autotune --batch-sizes 1,32,128 \
    --variants densenet121-aoti-fp16-cl-dynamic,densenet121-eager-fp16-cl-graphs
}

step_aoti_blockbuf() {
  log "aoti-blockbuf: the dynamic AOTInductor package of the block-buffer rewrite against stock torch.compile"
  "${PYTHON}" "${ROOT}/benchmarks/gpu_bench.py" --name issue4-aoti-blockbuf --skip-autotune --batch-sizes 1,128 \
    --variants densenet121-aoti-fp16-cl-dynamic-fused,densenet121-aoti-fp16-cl-dynamic-fused-mids
  log "aoti-blockbuf: the rewrites against torchvision's forward, all under stock torch.compile (kernel profiles)"
  "${PYTHON}" "${ROOT}/benchmarks/blockbuf_bench.py" --batch-sizes 1,128 --name blockbuf \
    --arms stock,fused,fusedconv,fusedconv0,fusedmids --profile-dir "${TMPDIR:-/tmp}/blockbuf-profiles"
}

step_pruning() {
  log "pruning: each channel-pruned variant against its unpruned base, 10 alternating rounds"
  "${PYTHON}" "${ROOT}/benchmarks/gpu_bench.py" --name issue4-pruning-pairs --skip-stock --batch-sizes 1,32,128 \
    --pair-rounds 10 --budget-s 900 --variants densenet121-eager-fp16-cl-graphs,densenet121-pruned-channels-30-fp16-cl-graphs,densenet121-aoti-fp16-cl-dynamic-fused-mids,densenet121-pruned-channels-30-fused-mids
}

build_artifact() {
  local slug="$1"
  if [ -f "${ARTIFACTS}/${slug}/variant.json" ]; then
    log "artifact ${slug}: already built in ${ARTIFACTS}"
    return 0
  fi
  log "artifact ${slug}: building (random weights, max batch 128)"
  "${PYTHON}" -m optimize build --variant "${slug}" --weights random --device cuda --max-batch 128 \
    --output-dir "${ARTIFACTS}"
}

step_serve() {
  local slug="${VARIANT}"
  build_artifact "${slug}"
  local spy=()
  if command -v py-spy >/dev/null; then
    spy=(--py-spy 8)  # what holds the device process's GIL under load
  fi
  log "serve: ${slug}, single-image sweep, a profiler trace, sizes, batched"
  "${PYTHON}" "${ROOT}/benchmarks/serve_bench.py" --model-dir "${ARTIFACTS}/${slug}" \
    --concurrency 1,96,128,192 --processes 6 --duration "${DURATION}" --sizes vga,12mp \
    --batched-concurrency 8,16 --server-args "${SERVER_ARGS}" --trace-batches 20 "${spy[@]}" \
    --phases ondevice,floor,single,cpu-roles,sizes,batched
}

step_ab() {
  local slug="${VARIANT}"
  build_artifact "${slug}"
  log "ab: ${slug} at 128 users, base against each arm, ${PAIRS} pairs"
  "${PYTHON}" "${ROOT}/benchmarks/serve_bench.py" --model-dir "${ARTIFACTS}/${slug}" --name "serve-${slug}-ab" \
    --concurrency 128 --processes 6 --duration "${DURATION}" --sizes vga --server-args "${SERVER_ARGS}" \
    --phases compare --pairs "${PAIRS}" --metrics-overhead \
    --compare "nobalance=--balance_connections false"
}

step_decode_ab() {
  local slug="${VARIANT}"
  build_artifact "${slug}"
  log "decode-ab: ${slug}, 32 JPEGs per request at 16 users, one nvJPEG call per batch against calls of 32"
  "${PYTHON}" "${ROOT}/benchmarks/serve_bench.py" --model-dir "${ARTIFACTS}/${slug}" --name "serve-${slug}-decode-ab" \
    --concurrency 16 --processes 6 --duration "${DURATION}" --sizes vga --server-args "${SERVER_ARGS}" \
    --phases compare --pairs "${PAIRS}" --compare-images 32 --compare-users 16 \
    --compare "decode32=--decode_batch 32"
}

step_serve_aoti() {
  local slug=densenet121-aoti-fp16-cl-dynamic
  build_artifact "${slug}"
  log "serve-aoti: where loading ${slug} spends its time"
  local spy=()
  if command -v py-spy >/dev/null; then  # native stacks of the load, collapsed, next to the timings
    spy=(py-spy record --native --format raw --rate 50 -o "${OUT:-${ARTIFACTS}}/aoti-load-pyspy.txt" --)
  fi
  "${spy[@]}" "${PYTHON}" "${ROOT}/benchmarks/aoti_load_time.py" "${ARTIFACTS}/${slug}" --torch-loader \
    --json-out "${OUT:-${ARTIFACTS}}/aoti-load-time.json"
  log "serve-aoti: ${slug}"
  "${PYTHON}" "${ROOT}/benchmarks/serve_bench.py" --model-dir "${ARTIFACTS}/${slug}" \
    --concurrency 1,96,128,192 --processes 6 --duration "${DURATION}" --sizes vga \
    --batched-concurrency 8,16 --server-args "${SERVER_ARGS}" --phases ondevice,floor,single,batched
}

main() {
  parse_args "$@"
  cd "${ROOT}"
  step_check
  local step
  for step in ${STEPS//,/ }; do
    case "${step}" in
      check) ;;
      decode) step_decode ;;
      onnx) step_onnx ;;
      aoti-dynamic) step_aoti_dynamic ;;
      aoti-blockbuf) step_aoti_blockbuf ;;
      pruning) step_pruning ;;
      serve) step_serve ;;
      ab) step_ab ;;
      decode-ab) step_decode_ab ;;
      serve-aoti) step_serve_aoti ;;
    esac
  done
  log "done: records in ${ROOT}/benchmarks/results${OUT:+ and ${OUT}}"
}

main "$@"
