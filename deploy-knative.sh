#!/usr/bin/env bash
# Build, publish and deploy DenseNet-121 variants as autoscaled Knative services.
#
# Usage: ./deploy-knative.sh [options]
#
#   --variants A,B       variant slugs to deploy (repeatable; default: those the registry
#                        marks deployable, see: python -m optimize list)
#   --mode MODE          knative (a Knative Service, default) or kserve (a KServe
#                        InferenceService in Knative mode; needs ./setup-cluster.sh --with-kserve)
#   --min-scale N        minimum pods per variant (default 0: scale to zero)
#   --max-scale N        maximum pods per variant (default 1)
#   --target N           in-flight requests per pod the autoscaler aims at (default 16)
#   --timeout SECONDS    how long to wait for each variant to become Ready (default 900)
#   --namespace NS       namespace (default: default)
#   --name NAME          kind cluster name (default: densenet)
#   --cpu                CPU-only manifests (no GPU limit, DENSENET_DEVICE=cpu); automatic on a
#                        cluster made with ./setup-cluster.sh --cpu
#   --load               load images into the kind nodes instead of pushing to the registry
#   --weights W          weights for artifacts built here: imagenet (default), random or a path
#   --no-smoke           skip the smoke inference after deploying
#   --dry-run            print what would be built and applied; touch nothing
#   -h, --help           show this help
#
# For each variant: build artifacts/<slug> if it is missing (python -m optimize build), build the
# image (Dockerfile, --build-arg VARIANT=<slug>), push it to the local registry, render
# manifests/overlays/<slug> with the image by digest, apply, wait for Ready (diagnostics on
# failure), then print its URL and a curl example and send one smoke inference.
# Environment: PYTHON (interpreter with the project installed; default .venv/bin/python, else
# python3), DENSENET_IMAGE_TAG (default dev), INGRESS_ADDR (default 127.0.0.1:80).
set -o errexit -o nounset -o pipefail

# shellcheck source=cluster/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/cluster/lib.sh"

usage() {
  sed -n '2,/^set -o/{/^set -o/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

VARIANTS=()
MODE=knative
MIN_SCALE=""
MAX_SCALE=""
TARGET=""
TIMEOUT_S=900
NAMESPACE=default
CLUSTER_NAME="${DEFAULT_CLUSTER_NAME}"
CPU=false
LOAD=false
WEIGHTS=imagenet
SMOKE=true
DRY_RUN=false
IMAGE_TAG="${DENSENET_IMAGE_TAG:-dev}"
WORK_DIR=""
PYTHON_CMD=()

usage_error() {
  log::error "$1"
  usage >&2
  exit 1
}

# need_value FLAG ARGC [VALUE]: a flag that takes a value got one.
need_value() {
  [[ "$2" -ge 2 && -n "${3:-}" ]] || usage_error "$1 needs a value"
}

need_int() {
  [[ "$2" =~ ^[0-9]+$ ]] || usage_error "$1 must be a non-negative integer, got '$2'"
}

parse_args() {
  while (($# > 0)); do
    case "$1" in
      --variants | --variant)
        need_value "$1" "$#" "${2:-}"
        local listed=()
        IFS=, read -r -a listed <<<"$2"
        VARIANTS+=("${listed[@]}")
        shift
        ;;
      --mode) need_value "$1" "$#" "${2:-}"; MODE="$2"; shift ;;
      --min-scale) need_value "$1" "$#" "${2:-}"; MIN_SCALE="$2"; shift ;;
      --max-scale) need_value "$1" "$#" "${2:-}"; MAX_SCALE="$2"; shift ;;
      --target) need_value "$1" "$#" "${2:-}"; TARGET="$2"; shift ;;
      --timeout) need_value "$1" "$#" "${2:-}"; TIMEOUT_S="$2"; shift ;;
      --namespace) need_value "$1" "$#" "${2:-}"; NAMESPACE="$2"; shift ;;
      --name) need_value "$1" "$#" "${2:-}"; CLUSTER_NAME="$2"; shift ;;
      --weights) need_value "$1" "$#" "${2:-}"; WEIGHTS="$2"; shift ;;
      --cpu) CPU=true ;;
      --load) LOAD=true ;;
      --no-smoke) SMOKE=false ;;
      --dry-run) DRY_RUN=true ;;
      -h | --help) usage; exit 0 ;;
      *) usage_error "unknown argument: $1" ;;
    esac
    shift
  done
  [[ "${MODE}" == knative || "${MODE}" == kserve ]] || usage_error "--mode must be knative or kserve, got '${MODE}'"
  [[ -z "${MIN_SCALE}" ]] || need_int --min-scale "${MIN_SCALE}"
  [[ -z "${MAX_SCALE}" ]] || need_int --max-scale "${MAX_SCALE}"
  [[ -z "${TARGET}" ]] || need_int --target "${TARGET}"
  need_int --timeout "${TIMEOUT_S}"
  [[ -z "${MAX_SCALE}" || "${MAX_SCALE}" -ge 1 ]] || usage_error "--max-scale must be at least 1"
  [[ -z "${TARGET}" || "${TARGET}" -ge 1 ]] || usage_error "--target must be at least 1"
  # Compare against the manifests' defaults (min 0, max 1) when only one bound is given.
  if ((${MIN_SCALE:-0} > ${MAX_SCALE:-1})); then
    usage_error "--min-scale (${MIN_SCALE:-0}) must not exceed --max-scale (${MAX_SCALE:-1})"
  fi
}

# ---------------------------------------------------------------------------------------------

resolve_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    PYTHON_CMD=("${PYTHON}")
  elif [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then
    PYTHON_CMD=("${REPO_ROOT}/.venv/bin/python")
  else
    PYTHON_CMD=(python3)
  fi
}

preflight() {
  log::step "Preflight"
  preflight::need_tool kubectl "install kubectl: https://kubernetes.io/docs/tasks/tools/" || true
  preflight::need_tool "${PYTHON_CMD[0]}" "install Python 3.11+ or point PYTHON at the project's interpreter (uv sync --extra optimize; PYTHON=.venv/bin/python)" || true
  if ! command -v realpath >/dev/null 2>&1; then
    preflight::problem "'realpath' is missing" "install GNU coreutils"
  fi
  if [[ "${DRY_RUN}" == false ]]; then
    preflight::docker_running || true
    preflight::need_tool kind "install kind ${KIND_VERSION}: https://kind.sigs.k8s.io/docs/user/quick-start/#installation" || true
  fi
  preflight::finish
}

# registry_table: "slug deployable devices" per variant, straight from optimize/registry.py.
registry_table() {
  "${PYTHON_CMD[@]}" - "${REPO_ROOT}" <<'PY'
import sys

sys.path.insert(0, sys.argv[1])
from optimize import registry

for v in registry.all_variants():
    print(v.slug, "yes" if v.deployable else "no", ",".join(v.devices))
PY
}

# select_variants: fill VARIANTS (validated, filtered by device) from the flags or the registry.
select_variants() {
  local table slug deployable devices known=() wanted=() device=cuda
  [[ "${CPU}" == false ]] || device=cpu
  table="$(registry_table)" || die "could not read the variant registry (optimize/registry.py)" \
    "check that ${PYTHON_CMD[*]} is Python 3.11+ and run from a full checkout"
  declare -A devices_of=()
  while read -r slug deployable devices; do
    known+=("${slug}")
    devices_of["${slug}"]="${devices}"
    if ((${#VARIANTS[@]} == 0)) && [[ "${deployable}" == yes ]]; then
      wanted+=("${slug}")
    fi
  done <<<"${table}"
  if ((${#VARIANTS[@]} > 0)); then
    for slug in "${VARIANTS[@]}"; do
      [[ -n "${devices_of[${slug}]+set}" ]] || usage_error "unknown variant '${slug}'; valid: ${known[*]}"
      wanted+=("${slug}")
    done
  fi
  VARIANTS=()
  for slug in "${wanted[@]}"; do
    if [[ ",${devices_of[${slug}]}," == *",${device},"* ]]; then
      VARIANTS+=("${slug}")
    else
      log::warn "skipping ${slug}: it runs on ${devices_of[${slug}]}, not ${device}"
    fi
  done
  ((${#VARIANTS[@]} > 0)) || die "no variant to deploy on ${device}" "pick some with --variants (see: python -m optimize list)"
  for slug in "${VARIANTS[@]}"; do
    [[ -f "$(overlay_dir "${slug}")/kustomization.yaml" ]] ||
      die "no overlay for ${slug} in $(overlay_dir "${slug}")" "python3 cluster/gen_overlays.py"
  done
}

overlay_dir() {
  if [[ "${MODE}" == kserve ]]; then
    printf '%s\n' "${REPO_ROOT}/manifests/kserve/overlays/$1"
  else
    printf '%s\n' "${REPO_ROOT}/manifests/overlays/$1"
  fi
}

# ---------------------------------------------------------------------------------------------
# Cluster checks

check_cluster() {
  log::step "Cluster '${CLUSTER_NAME}'"
  kind_cluster_exists "${CLUSTER_NAME}" ||
    die "no kind cluster named '${CLUSTER_NAME}'" "./setup-cluster.sh$([[ "${CPU}" == false ]] || printf ' --cpu')$([[ "${CLUSTER_NAME}" == "${DEFAULT_CLUSTER_NAME}" ]] || printf ' --name %s' "${CLUSTER_NAME}")"
  use_cluster "${CLUSTER_NAME}"
  local accelerator
  accelerator="$(kc get configmap "${CLUSTER_INFO_CM}" --namespace "${CLUSTER_INFO_NS}" --ignore-not-found \
    -o 'jsonpath={.data.accelerator}')" || die "cannot read the cluster (context ${KUBE_CONTEXT})" \
    "check it runs: kubectl --context ${KUBE_CONTEXT} get nodes"
  [[ -n "${accelerator}" ]] || die "cluster '${CLUSTER_NAME}' was not prepared by setup-cluster.sh (Knative missing)" \
    "./setup-cluster.sh --name ${CLUSTER_NAME}"
  if [[ "${accelerator}" == cpu && "${CPU}" == false ]]; then
    log::info "the cluster was made with --cpu: deploying the CPU form"
    CPU=true
  fi
  if [[ "${MODE}" == kserve && -z "$(kc get crd inferenceservices.serving.kserve.io --ignore-not-found -o name)" ]]; then
    die "KServe is not installed in cluster '${CLUSTER_NAME}' (no InferenceService CRD)" \
      "./setup-cluster.sh --with-kserve$([[ "${CPU}" == false ]] || printf ' --cpu')" "or deploy plain Knative services: --mode knative"
  fi
  if [[ "${CPU}" == false ]]; then
    local counts
    counts="$(kc get nodes -o jsonpath='{range .items[*]}{.status.allocatable.nvidia\.com/gpu}{"\n"}{end}')"
    if ! grep -Eq '^[1-9][0-9]*$' <<<"${counts}"; then
      die "no GPU is allocatable in cluster '${CLUSTER_NAME}' (nvidia.com/gpu is 0 or absent on every node)" \
        "re-run ./setup-cluster.sh: it checks the node's GPU, reinstalls the device plugin and proves it with nvidia-smi" \
        "look at the plugin: kubectl --context ${KUBE_CONTEXT} -n nvidia-device-plugin logs ds/nvidia-device-plugin" \
        "or deploy the CPU form: ./deploy-knative.sh --cpu"
    fi
    log::ok "nvidia.com/gpu allocatable"
  fi
  if [[ "${NAMESPACE}" != default ]]; then
    kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: ${NAMESPACE}
EOF
  fi
}

# ---------------------------------------------------------------------------------------------
# Artifact, image

ensure_artifact() {
  local slug="$1" dir="${REPO_ROOT}/artifacts/$1"
  if [[ -f "${dir}/variant.json" ]]; then
    log::ok "artifact artifacts/${slug} present"
    return 0
  fi
  log::info "building artifacts/${slug} (python -m optimize build)"
  (cd "${REPO_ROOT}" && "${PYTHON_CMD[@]}" -m optimize build --variant "${slug}" --weights "${WEIGHTS}" --output-dir artifacts) ||
    die "building the artifact of ${slug} failed" \
      "install the optimize extra (uv sync --extra optimize) and set PYTHON=.venv/bin/python, or build it yourself: python -m optimize build --variant ${slug} --output-dir artifacts"
  [[ -f "${dir}/variant.json" ]] || die "optimize build finished but ${dir}/variant.json is missing" \
    "read the build output above (a variant that fails its fidelity check writes no variant.json)"
}

# publish_image SLUG: build the image; print "NAME DIGEST" (pushed) or "NAME :TAG" (loaded).
publish_image() {
  local slug="$1" repo="localhost:${REGISTRY_PORT}/$1"
  local ref="${repo}:${IMAGE_TAG}"
  log::info "docker build ${ref}"
  docker build --build-arg "VARIANT=${slug}" --tag "${ref}" --file "${REPO_ROOT}/Dockerfile" "${REPO_ROOT}" >&2 ||
    die "docker build failed for ${slug}" "read the build log above; the image needs uv.lock and artifacts/${slug}/"
  if [[ "${LOAD}" == true ]]; then
    # Images loaded into the nodes have no registry digest: use a content-derived tag under
    # dev.local, which Knative never tries to resolve.
    local id tag
    id="$(docker image inspect --format '{{.Id}}' "${ref}")"
    tag="${id#sha256:}"
    tag="${tag:0:12}"
    docker tag "${ref}" "dev.local/${slug}:${tag}"
    kind load docker-image "dev.local/${slug}:${tag}" --name "${CLUSTER_NAME}" >&2 ||
      die "kind load failed for ${slug}" "check free disk space in the nodes: docker exec ${CLUSTER_NAME}-worker df -h /var"
    printf 'dev.local/%s :%s\n' "${slug}" "${tag}"
    return 0
  fi
  docker push "${ref}" >&2 ||
    die "docker push to localhost:${REGISTRY_PORT} failed for ${slug}" \
      "is the registry running? docker ps --filter name=${REGISTRY_NAME} (./setup-cluster.sh starts it)" "or use --load"
  local digests digest
  digests="$(docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "${ref}")"
  digest="$(grep -m 1 "^${repo}@sha256:" <<<"${digests}" || true)"
  [[ -n "${digest}" ]] || die "no registry digest for ${ref} after the push" "docker image inspect ${ref} (RepoDigests)"
  printf '%s %s\n' "${repo}" "${digest#"${repo}"@}"
}

# ---------------------------------------------------------------------------------------------
# Manifests

# render SLUG IMAGE_NAME DIGEST_OR_:TAG OUT_FILE: the overlay with image, CPU form and scaling.
render() {
  local slug="$1" name="$2" version="$3" out="$4" dir
  dir="$(mktemp -d "${WORK_DIR}/render.XXXXXX")"
  local overlay cpu
  overlay="$(realpath --relative-to="${dir}" "$(overlay_dir "${slug}")")"
  cpu="$(realpath --relative-to="${dir}" "${REPO_ROOT}/manifests/components/cpu")"
  {
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n'
    printf 'resources:\n  - %s\n' "${overlay}"
    [[ "${CPU}" == false ]] || printf 'components:\n  - %s\n' "${cpu}"
    printf 'images:\n  - name: %s\n    newName: %s\n' "${IMAGE_PLACEHOLDER}" "${name}"
    if [[ "${version}" == :* ]]; then
      printf '    newTag: "%s"\n' "${version#:}"
    else
      printf '    digest: %s\n' "${version}"
    fi
    scaling_patch
  } >"${dir}/kustomization.yaml"
  kubectl kustomize "${dir}" >"${out}" ||
    die "rendering the manifests of ${slug} failed" "kubectl kustomize $(overlay_dir "${slug}")"
}

scaling_patch() {
  [[ -n "${MIN_SCALE}${MAX_SCALE}${TARGET}" ]] || return 0
  local key value
  if [[ "${MODE}" == knative ]]; then
    printf 'patches:\n  - target:\n      group: serving.knative.dev\n      kind: Service\n    patch: |-\n'
    for key in min-scale max-scale target; do
      case "${key}" in
        min-scale) value="${MIN_SCALE}" ;;
        max-scale) value="${MAX_SCALE}" ;;
        target) value="${TARGET}" ;;
      esac
      [[ -z "${value}" ]] || printf '      - op: add\n        path: /spec/template/metadata/annotations/autoscaling.knative.dev~1%s\n        value: "%s"\n' "${key}" "${value}"
    done
  else
    printf 'patches:\n  - target:\n      group: serving.kserve.io\n      kind: InferenceService\n    patch: |-\n'
    for key in minReplicas maxReplicas scaleTarget; do
      case "${key}" in
        minReplicas) value="${MIN_SCALE}" ;;
        maxReplicas) value="${MAX_SCALE}" ;;
        scaleTarget) value="${TARGET}" ;;
      esac
      [[ -z "${value}" ]] || printf '      - op: add\n        path: /spec/predictor/%s\n        value: %s\n' "${key}" "${value}"
    done
  fi
}

resource_of() {
  if [[ "${MODE}" == kserve ]]; then
    printf 'inferenceservice/%s\n' "$1"
  else
    printf 'ksvc/%s\n' "$1"
  fi
}

# ---------------------------------------------------------------------------------------------
# Rollout

diagnose() {
  local slug="$1" res
  res="$(resource_of "${slug}")"
  log::error "${slug} did not become Ready within ${TIMEOUT_S}s; diagnostics follow"
  kc get "${res}" --namespace "${NAMESPACE}" -o yaml >&2 || true
  if [[ "${MODE}" == knative ]]; then
    local rev
    rev="$(kc get "${res}" --namespace "${NAMESPACE}" -o 'jsonpath={.status.latestCreatedRevisionName}')" || rev=""
    if [[ -n "${rev}" ]]; then
      log::info "---- revision ${rev}"
      kc describe revision "${rev}" --namespace "${NAMESPACE}" >&2 || true
      log::info "---- events of ${rev}"
      kc get events --namespace "${NAMESPACE}" --field-selector "involvedObject.name=${rev}" >&2 || true
      dump_workload "${NAMESPACE}" "serving.knative.dev/revision=${rev}" predictor
    fi
  else
    dump_workload "${NAMESPACE}" "serving.kserve.io/inferenceservice=${slug}" kserve-container
  fi
  cat >&2 <<EOF
  Most common causes:
  - ImagePullBackOff / "failed to resolve image": the nodes cannot pull the image. Check the
    registry (docker ps --filter name=${REGISTRY_NAME}) or redeploy with --load.
  - ProgressDeadlineExceeded: the cold start (image pull + CUDA init + warm-up) took longer than
    serving.knative.dev/progress-deadline (1200s); raise it in manifests/base, or pre-pull.
  - "Insufficient nvidia.com/gpu" in the events: no free GPU. Other variants may hold it: scale
    them to zero (kubectl delete ksvc <slug>) or re-run ./setup-cluster.sh.
  - CrashLoopBackOff: read the predictor log above (artifact, CUDA or memory errors).
EOF
}

print_access() {
  local slug="$1" url host jsonpath='{.status.url}'
  [[ "${MODE}" == knative ]] || jsonpath='{.status.components.predictor.url}'
  url="$(kc get "$(resource_of "${slug}")" --namespace "${NAMESPACE}" -o "jsonpath=${jsonpath}")"
  host="${url#*://}"
  cat <<EOF

${slug}: ${url}
  # without DNS (Host header through the Kourier port on ${INGRESS_ADDR}):
  printf '{"instances":[{"image":{"b64":"%s"}}]}' "\$(base64 -w0 cat.jpg)" > request.json
  curl -H 'Host: ${host}' -H 'Content-Type: application/json' \\
    http://${INGRESS_ADDR}/v1/models/densenet121:predict -d @request.json
  # with DNS (${KNATIVE_DOMAIN} resolves to 127.0.0.1):
  curl ${url}/v2/models/densenet121
EOF
  SMOKE_HOST="${host}"
}

SMOKE_HOST=""

dry_run() {
  local slug out
  log::step "Dry run: nothing is built, pushed or applied"
  for slug in "${VARIANTS[@]}"; do
    printf '# ---- %s (%s, %s)\n' "${slug}" "$([[ "${CPU}" == true ]] && printf cpu || printf gpu)" "${MODE}"
    if [[ -f "${REPO_ROOT}/artifacts/${slug}/variant.json" ]]; then
      printf '# artifact: artifacts/%s (present)\n' "${slug}"
    else
      printf '# artifact: would run: %s -m optimize build --variant %s --weights %s --output-dir artifacts\n' \
        "${PYTHON_CMD[*]}" "${slug}" "${WEIGHTS}"
    fi
    printf '# image:    would run: docker build --build-arg VARIANT=%s --tag localhost:%s/%s:%s .\n' \
      "${slug}" "${REGISTRY_PORT}" "${slug}" "${IMAGE_TAG}"
    if [[ "${LOAD}" == true ]]; then
      printf '#           then kind load docker-image into cluster %s (image dev.local/%s:<id>)\n' "${CLUSTER_NAME}" "${slug}"
    else
      printf '#           then docker push; the manifest below gets the pushed digest instead of the tag\n'
    fi
    printf '# apply:    kubectl --context kind-%s apply -f <the manifest below>\n' "${CLUSTER_NAME}"
    out="${WORK_DIR}/${slug}.yaml"
    render "${slug}" "localhost:${REGISTRY_PORT}/${slug}" ":${IMAGE_TAG}" "${out}"
    printf -- '---\n'
    cat "${out}"
  done
}

main() {
  parse_args "$@"
  resolve_python
  preflight
  WORK_DIR="$(mktemp -d)"
  trap 'rm -rf "${WORK_DIR}"' EXIT
  select_variants
  if [[ "${DRY_RUN}" == true ]]; then
    dry_run
    return 0
  fi
  check_cluster
  # CPU may have been switched on by the cluster: re-check the selection against it.
  select_variants

  local slug published name version
  for slug in "${VARIANTS[@]}"; do
    log::step "${slug}"
    ensure_artifact "${slug}"
    published="$(publish_image "${slug}")"
    read -r name version <<<"${published}"
    render "${slug}" "${name}" "${version}" "${WORK_DIR}/${slug}.yaml"
    kc apply --namespace "${NAMESPACE}" -f "${WORK_DIR}/${slug}.yaml" >&2
    if [[ "${version}" == :* ]]; then
      log::ok "applied ${MODE} ${slug} (image ${name}${version})"
    else
      log::ok "applied ${MODE} ${slug} (image ${name}@${version})"
    fi
  done

  local failed=()
  for slug in "${VARIANTS[@]}"; do
    log::step "Waiting for ${slug} (up to ${TIMEOUT_S}s)"
    if ! kc wait "$(resource_of "${slug}")" --namespace "${NAMESPACE}" --for=condition=Ready --timeout="${TIMEOUT_S}s" >&2; then
      diagnose "${slug}"
      failed+=("${slug}")
      continue
    fi
    print_access "${slug}"
    if [[ "${SMOKE}" == true ]]; then
      if "${PYTHON_CMD[@]}" "${CLUSTER_DIR}/smoke_request.py" --ingress "http://${INGRESS_ADDR}" --host "${SMOKE_HOST}"; then
        log::ok "smoke inference passed"
      else
        log::error "smoke inference on ${slug} failed"
        if [[ "${MODE}" == knative ]]; then
          log::info "fix: kubectl --context ${KUBE_CONTEXT} -n ${NAMESPACE} logs -l serving.knative.dev/service=${slug} -c predictor"
        else
          log::info "fix: kubectl --context ${KUBE_CONTEXT} -n ${NAMESPACE} logs -l serving.kserve.io/inferenceservice=${slug} -c kserve-container"
        fi
        failed+=("${slug}")
      fi
    fi
  done
  if ((${#failed[@]} > 0)); then
    die "${#failed[@]} variant(s) failed: ${failed[*]}" "read the diagnostics above, fix, and re-run: ./deploy-knative.sh --variants $(IFS=,; printf '%s' "${failed[*]}")"
  fi
  log::step "Deployed: ${VARIANTS[*]}"
}

main "$@"
