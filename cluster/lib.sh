# shellcheck shell=bash
# shellcheck disable=SC2034  # constants here are used by the scripts that source this file
# Shared helpers for setup-cluster.sh and deploy-knative.sh: logging, preflight, waiting,
# diagnostics and the names both scripts agree on. Source it; it defines functions only.

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${CLUSTER_DIR}/.." && pwd)"
readonly CLUSTER_DIR REPO_ROOT

# shellcheck source=cluster/versions.env
source "${CLUSTER_DIR}/versions.env"

# Names shared by both scripts (override from the environment if they clash on your host).
DEFAULT_CLUSTER_NAME="${DENSENET_CLUSTER_NAME:-densenet}"
REGISTRY_NAME="${REGISTRY_NAME:-kind-registry}"
REGISTRY_PORT="${REGISTRY_PORT:-5001}"
# Kourier's HTTP NodePort; kind-config*.yaml publishes it on 127.0.0.1:80.
KOURIER_NODE_PORT=31080
KNATIVE_DOMAIN="${KNATIVE_DOMAIN:-127.0.0.1.sslip.io}"
# Where the host reaches the Kourier ingress (kind-config*.yaml extraPortMappings).
INGRESS_ADDR="${INGRESS_ADDR:-127.0.0.1:80}"
# A ConfigMap setup-cluster.sh leaves behind so deploy-knative.sh knows how the cluster was made.
CLUSTER_INFO_NS=kube-public
CLUSTER_INFO_CM=densenet-cluster
# The image name the manifests carry until deploy-knative.sh sets the real one.
IMAGE_PLACEHOLDER=densenet121-predictor

# ---------------------------------------------------------------------------------------------
# Logging: everything goes to stderr; stdout is kept for a command's actual output.

if [[ -t 2 && -z "${NO_COLOR:-}" ]]; then
  _C_RED=$'\033[31m' _C_YEL=$'\033[33m' _C_GRN=$'\033[32m' _C_BLD=$'\033[1m' _C_OFF=$'\033[0m'
else
  _C_RED="" _C_YEL="" _C_GRN="" _C_BLD="" _C_OFF=""
fi

log::step() { printf '%s==> %s%s\n' "${_C_BLD}" "$*" "${_C_OFF}" >&2; }
log::info() { printf '    %s\n' "$*" >&2; }
log::ok() { printf '    %s%s%s\n' "${_C_GRN}" "$*" "${_C_OFF}" >&2; }
log::warn() { printf '%sWARNING:%s %s\n' "${_C_YEL}" "${_C_OFF}" "$*" >&2; }
log::error() { printf '%sERROR:%s %s\n' "${_C_RED}" "${_C_OFF}" "$*" >&2; }

# die MESSAGE [FIX...]: print what failed and what to run next, then exit 1.
die() {
  log::error "$1"
  shift
  local line
  for line in "$@"; do
    printf '  fix: %s\n' "${line}" >&2
  done
  exit 1
}

# ---------------------------------------------------------------------------------------------
# Preflight: collect every problem, then report them all at once.

PREFLIGHT_PROBLEMS=()

# preflight::problem WHAT FIX: record one missing or misconfigured piece and how to fix it.
preflight::problem() {
  PREFLIGHT_PROBLEMS+=("$1"$'\n'"      fix: $2")
}

# preflight::need_tool NAME INSTALL_HINT
preflight::need_tool() {
  if ! command -v "$1" >/dev/null 2>&1; then
    preflight::problem "'$1' is not installed or not on PATH" "$2"
    return 1
  fi
}

# preflight::docker_running: docker CLI present and the daemon answers.
preflight::docker_running() {
  preflight::need_tool docker "install Docker Engine: https://docs.docker.com/engine/install/" || return 1
  if ! docker info >/dev/null 2>&1; then
    preflight::problem "the Docker daemon is not reachable ('docker info' failed)" \
      "start it (sudo systemctl start docker) and make sure your user may use it (sudo usermod -aG docker \"\$USER\", then log in again)"
    return 1
  fi
}

# preflight::finish: exit 1 listing every recorded problem, or return quietly.
preflight::finish() {
  if ((${#PREFLIGHT_PROBLEMS[@]} == 0)); then
    log::ok "preflight passed"
    return 0
  fi
  log::error "preflight found ${#PREFLIGHT_PROBLEMS[@]} problem(s):"
  local p
  for p in "${PREFLIGHT_PROBLEMS[@]}"; do
    printf '  - %s\n' "${p}" >&2
  done
  exit 1
}

# ---------------------------------------------------------------------------------------------
# kubectl / helm bound to one kind cluster, so a user's current context is never touched.

KUBE_CONTEXT=""

use_cluster() {
  KUBE_CONTEXT="kind-$1"
}

kc() {
  kubectl --context "${KUBE_CONTEXT}" "$@"
}

kind_cluster_exists() {
  local name="$1" clusters
  clusters="$(kind get clusters)" || die "'kind get clusters' failed" "check that Docker is running: docker info"
  grep -qx -- "${name}" <<<"${clusters}"
}

# helm_release_chart NAMESPACE RELEASE: print "chart-version" of an installed release, or nothing.
helm_release_chart() {
  local listing
  listing="$(helm --kube-context "${KUBE_CONTEXT}" list --namespace "$1" --filter "^$2\$" --output yaml)" ||
    die "'helm list' failed in namespace $1" "check the cluster is reachable: kubectl --context ${KUBE_CONTEXT} get nodes"
  sed -n 's/^[- ]*chart: *//p' <<<"${listing}" | head -n 1
}

# ---------------------------------------------------------------------------------------------
# Waiting.

# wait_until TIMEOUT_S INTERVAL_S DESCRIPTION CMD...: run CMD until it succeeds or time runs out.
wait_until() {
  local timeout="$1" interval="$2" what="$3"
  shift 3
  local waited=0
  until "$@"; do
    if ((waited >= timeout)); then
      log::error "timed out after ${timeout}s waiting for ${what}"
      return 1
    fi
    sleep "${interval}"
    waited=$((waited + interval))
  done
}

# ---------------------------------------------------------------------------------------------
# Diagnostics, dumped when something does not become ready.

# dump_namespace NAMESPACE: pods, recent events and the logs of pods that are not ready.
dump_namespace() {
  local ns="$1" pod
  log::info "---- pods in ${ns}"
  kc get pods --namespace "${ns}" -o wide >&2 || true
  log::info "---- recent events in ${ns}"
  kc get events --namespace "${ns}" --sort-by=.lastTimestamp >&2 || true
  for pod in $(kc get pods --namespace "${ns}" -o name); do
    log::info "---- ${pod}"
    kc describe --namespace "${ns}" "${pod}" >&2 || true
    kc logs --namespace "${ns}" "${pod}" --all-containers --tail=100 >&2 || true
  done
}

# dump_workload NAMESPACE LABEL_SELECTOR CONTAINER: describe and log the pods of one revision.
dump_workload() {
  local ns="$1" selector="$2" container="$3" pod pods
  pods="$(kc get pods --namespace "${ns}" -l "${selector}" -o name)" || pods=""
  if [[ -z "${pods}" ]]; then
    log::info "no pod was created for ${selector} (look at the events above: quota, scheduling, image)"
    return 0
  fi
  for pod in ${pods}; do
    log::info "---- describe ${pod}"
    kc describe --namespace "${ns}" "${pod}" >&2 || true
    log::info "---- logs ${pod} (${container})"
    kc logs --namespace "${ns}" "${pod}" -c "${container}" --tail=200 >&2 || true
    kc logs --namespace "${ns}" "${pod}" -c "${container}" --previous --tail=50 >&2 || true
  done
}
