#!/usr/bin/env bash
# Create (or reuse) the kind cluster that serves DenseNet-121 variants through Knative.
#
# Usage: ./setup-cluster.sh [--cpu] [--name NAME] [--with-kserve] [--delete] [--help]
#
#   --cpu           no GPU: use cluster/kind-config-cpu.yaml and skip every NVIDIA step
#   --name NAME     kind cluster name (default: densenet; kubectl context kind-NAME)
#   --with-kserve   also install cert-manager and KServe (for deploy-knative.sh --mode kserve)
#   --delete        delete the cluster (the local registry container is kept) and exit
#   -h, --help      show this help
#
# Steps, each skipped when already done (a second run changes nothing):
#   1. preflight: docker running, kind, kubectl, helm; with a GPU also nvidia-smi, docker's
#      nvidia default runtime and accept-nvidia-visible-devices-as-volume-mounts = true
#   2. local registry container kind-registry on 127.0.0.1:5001
#   3. kind cluster from cluster/kind-config.yaml (or -cpu.yaml) with the pinned node image
#   4. registry config on every node (containerd hosts.toml) and on the kind network
#   5. GPU: NVIDIA Container Toolkit + containerd nvidia runtime inside the GPU node,
#      RuntimeClass nvidia, NVIDIA device plugin (helm), and a pod that runs nvidia-smi
#   6. Knative Serving (CRDs, core), Kourier, ingress class, domain, local-registry digests
#   7. with --with-kserve: cert-manager and KServe (Knative deployment mode)
# Pinned versions: cluster/versions.env.
set -o errexit -o nounset -o pipefail

# shellcheck source=cluster/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/cluster/lib.sh"

usage() {
  sed -n '2,/^set -o/{/^set -o/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

CLUSTER_NAME="${DEFAULT_CLUSTER_NAME}"
GPU=true
WITH_KSERVE=false
DELETE=false
NVIDIA_CTK_CONFIG="${NVIDIA_CTK_CONFIG:-/etc/nvidia-container-runtime/config.toml}"
TIMEOUT_S="${SETUP_TIMEOUT_S:-600}"
GPU_ALLOCATABLE_TIMEOUT_S="${GPU_ALLOCATABLE_TIMEOUT_S:-180}"

parse_args() {
  while (($# > 0)); do
    case "$1" in
      --cpu) GPU=false ;;
      --name)
        [[ $# -ge 2 && -n "$2" ]] || { log::error "--name needs a value"; usage >&2; exit 1; }
        CLUSTER_NAME="$2"
        shift
        ;;
      --name=*) CLUSTER_NAME="${1#--name=}" ;;
      --with-kserve) WITH_KSERVE=true ;;
      --delete) DELETE=true ;;
      -h | --help) usage; exit 0 ;;
      *) log::error "unknown argument: $1"; usage >&2; exit 1 ;;
    esac
    shift
  done
  [[ "${CLUSTER_NAME}" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "invalid cluster name '${CLUSTER_NAME}'" "use lowercase letters, digits and '-' (e.g. --name densenet)"
}

# ---------------------------------------------------------------------------------------------

preflight() {
  log::step "Preflight"
  preflight::docker_running || true
  preflight::need_tool kind "install kind ${KIND_VERSION}: https://kind.sigs.k8s.io/docs/user/quick-start/#installation" || true
  preflight::need_tool kubectl "install kubectl: https://kubernetes.io/docs/tasks/tools/" || true
  preflight::need_tool helm "install helm 3: https://helm.sh/docs/intro/install/" || true
  if [[ "${GPU}" == true ]]; then
    preflight_gpu
  fi
  preflight::finish
}

preflight_gpu() {
  local cpu_hint="or run ./setup-cluster.sh --cpu on a host without an NVIDIA GPU"
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    preflight::problem "nvidia-smi not found: no NVIDIA driver on this host" \
      "install the NVIDIA driver (https://www.nvidia.com/download/index.aspx), ${cpu_hint}"
  elif ! nvidia-smi -L >/dev/null 2>&1; then
    preflight::problem "'nvidia-smi -L' failed: the driver does not see a GPU" \
      "fix the driver (reboot after installing it, check 'dmesg | grep -i nvidia'), ${cpu_hint}"
  fi
  if [[ ! -f "${NVIDIA_CTK_CONFIG}" ]]; then
    preflight::problem "NVIDIA Container Toolkit config ${NVIDIA_CTK_CONFIG} not found" \
      "install the toolkit: https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html"
  elif ! grep -Eq '^[[:space:]]*accept-nvidia-visible-devices-as-volume-mounts[[:space:]]*=[[:space:]]*true' "${NVIDIA_CTK_CONFIG}"; then
    preflight::problem "accept-nvidia-visible-devices-as-volume-mounts is not 'true' in ${NVIDIA_CTK_CONFIG} (kind's GPU node needs it)" \
      "sudo nvidia-ctk config --set accept-nvidia-visible-devices-as-volume-mounts=true --in-place && sudo systemctl restart docker"
  fi
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    local runtime
    runtime="$(docker info --format '{{.DefaultRuntime}}')"
    if [[ "${runtime}" != nvidia ]]; then
      preflight::problem "docker's default runtime is '${runtime}', not 'nvidia' (kind node containers get no GPU)" \
        "sudo nvidia-ctk runtime configure --runtime=docker --set-as-default && sudo systemctl restart docker"
    fi
  fi
}

# ---------------------------------------------------------------------------------------------

ensure_registry() {
  log::step "Local registry ${REGISTRY_NAME} (127.0.0.1:${REGISTRY_PORT})"
  local state
  state="$(docker ps --all --filter "name=^${REGISTRY_NAME}\$" --format '{{.State}}')"
  case "${state}" in
    running) log::ok "already running" ;;
    ?*)
      docker start "${REGISTRY_NAME}" >/dev/null ||
        die "could not start the existing container ${REGISTRY_NAME}" "docker rm -f ${REGISTRY_NAME} && ./setup-cluster.sh"
      log::ok "started"
      ;;
    *)
      docker run --detach --restart=always --name "${REGISTRY_NAME}" \
        --publish "127.0.0.1:${REGISTRY_PORT}:5000" --network bridge "${REGISTRY_IMAGE}" >/dev/null ||
        die "could not start the registry container" "check that 127.0.0.1:${REGISTRY_PORT} is free (ss -ltnp | grep ${REGISTRY_PORT}) or set REGISTRY_PORT"
      log::ok "created"
      ;;
  esac
}

ensure_cluster() {
  local config="${CLUSTER_DIR}/kind-config.yaml"
  [[ "${GPU}" == true ]] || config="${CLUSTER_DIR}/kind-config-cpu.yaml"
  log::step "kind cluster '${CLUSTER_NAME}' ($(basename "${config}"))"
  if kind_cluster_exists "${CLUSTER_NAME}"; then
    log::ok "already exists, reusing it"
  else
    kind create cluster --name "${CLUSTER_NAME}" --image "${KIND_NODE_IMAGE}" --config "${config}" --wait 5m ||
      die "kind could not create the cluster" \
        "read kind's message above; a common cause is host port 80 already in use (kind-config publishes Kourier on 127.0.0.1:80)" \
        "then: kind delete cluster --name ${CLUSTER_NAME} && ./setup-cluster.sh"
  fi
  use_cluster "${CLUSTER_NAME}"
  kc cluster-info >/dev/null || die "the cluster does not answer on context ${KUBE_CONTEXT}" \
    "docker ps --filter name=${CLUSTER_NAME}- (the node containers must be running)"
}

# Nodes pull localhost:${REGISTRY_PORT}/... from the registry container (kind's local-registry guide).
ensure_registry_on_nodes() {
  log::step "Registry access from the nodes"
  local dir="/etc/containerd/certs.d/localhost:${REGISTRY_PORT}" node want have
  want="[host.\"http://${REGISTRY_NAME}:5000\"]"
  for node in $(kind get nodes --name "${CLUSTER_NAME}"); do
    have=""
    if docker exec "${node}" test -f "${dir}/hosts.toml"; then
      have="$(docker exec "${node}" cat "${dir}/hosts.toml")"
    fi
    if [[ "${have}" == "${want}" ]]; then
      log::ok "${node}: hosts.toml present"
      continue
    fi
    docker exec "${node}" mkdir -p "${dir}"
    printf '%s\n' "${want}" | docker exec -i "${node}" cp /dev/stdin "${dir}/hosts.toml"
    log::ok "${node}: hosts.toml written"
  done
  if [[ "$(docker inspect --format '{{json .NetworkSettings.Networks.kind}}' "${REGISTRY_NAME}")" == null ]]; then
    docker network connect kind "${REGISTRY_NAME}"
    log::ok "registry connected to the kind network"
  fi
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: local-registry-hosting
  namespace: kube-public
data:
  localRegistryHosting.v1: |
    host: "localhost:${REGISTRY_PORT}"
    help: "https://kind.sigs.k8s.io/docs/user/local-registry/"
EOF
}

# ---------------------------------------------------------------------------------------------
# GPU

gpu_nodes() {
  kind get nodes --name "${CLUSTER_NAME}" | grep -- '-worker' || true
}

ensure_gpu_node() {
  local node="$1" want="${NVIDIA_CONTAINER_TOOLKIT_VERSION%-*}" have
  if ! docker exec "${node}" nvidia-smi -L >&2; then
    die "no GPU inside the kind node ${node}" \
      "check docker's default runtime is nvidia and accept-nvidia-visible-devices-as-volume-mounts = true (see preflight), then recreate: ./setup-cluster.sh --delete && ./setup-cluster.sh"
  fi
  have=""
  if docker exec "${node}" which nvidia-ctk >/dev/null; then
    have="$(docker exec "${node}" nvidia-ctk --version)"
  fi
  if [[ "${have}" == *"version ${want}"* ]]; then
    log::ok "${node}: NVIDIA Container Toolkit ${want} present"
  else
    log::info "${node}: installing NVIDIA Container Toolkit ${NVIDIA_CONTAINER_TOOLKIT_VERSION}"
    docker exec --env "V=${NVIDIA_CONTAINER_TOOLKIT_VERSION}" "${node}" bash -c '
      set -o errexit -o nounset -o pipefail
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq curl gpg ca-certificates >/dev/null
      curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey |
        gpg --dearmor --yes -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
      curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list |
        sed "s#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] https://#g" \
        >/etc/apt/sources.list.d/nvidia-container-toolkit.list
      apt-get update -qq
      apt-get install -y -qq "nvidia-container-toolkit=${V}" "nvidia-container-toolkit-base=${V}" \
        "libnvidia-container-tools=${V}" "libnvidia-container1=${V}" >/dev/null
    ' || die "installing the NVIDIA Container Toolkit in ${node} failed" \
      "the node needs internet access to nvidia.github.io; check NVIDIA_CONTAINER_TOOLKIT_VERSION in cluster/versions.env is a released version"
  fi
  if docker exec "${node}" containerd config dump | grep -q 'default_runtime_name = "nvidia"'; then
    log::ok "${node}: containerd default runtime is nvidia"
  else
    log::info "${node}: configuring containerd's nvidia runtime"
    docker exec "${node}" nvidia-ctk runtime configure --runtime=containerd --set-as-default --config-source=command
    docker exec "${node}" systemctl restart containerd
    wait_until 120 5 "node ${node} to be Ready after the containerd restart" \
      kc wait --for=condition=Ready "node/${node}" --timeout=5s ||
      die "node ${node} did not come back after restarting containerd" "docker exec ${node} journalctl -u containerd --no-pager | tail -50"
  fi
}

gpu_allocatable() {
  local counts
  counts="$(kc get nodes -l nvidia.com/gpu.present=true \
    -o jsonpath='{range .items[*]}{.status.allocatable.nvidia\.com/gpu}{"\n"}{end}')" || return 1
  grep -Eq '^[1-9][0-9]*$' <<<"${counts}"
}

ensure_gpu() {
  log::step "GPU support"
  local node nodes
  nodes="$(gpu_nodes)"
  [[ -n "${nodes}" ]] || die "the cluster has no worker node" "./setup-cluster.sh --delete && ./setup-cluster.sh"
  for node in ${nodes}; do
    ensure_gpu_node "${node}"
  done
  kc apply -f "${CLUSTER_DIR}/nvidia-runtimeclass.yaml" >/dev/null
  log::ok "RuntimeClass nvidia"

  local ns=nvidia-device-plugin rel=nvidia-device-plugin installed=false
  if [[ "$(helm_release_chart "${ns}" "${rel}")" == "nvidia-device-plugin-${NVIDIA_DEVICE_PLUGIN_CHART_VERSION}" ]]; then
    log::ok "NVIDIA device plugin ${NVIDIA_DEVICE_PLUGIN_CHART_VERSION} already installed"
  else
    helm --kube-context "${KUBE_CONTEXT}" upgrade --install "${rel}" nvidia-device-plugin \
      --repo https://nvidia.github.io/k8s-device-plugin --version "${NVIDIA_DEVICE_PLUGIN_CHART_VERSION}" \
      --namespace "${ns}" --create-namespace \
      --values "${CLUSTER_DIR}/nvidia-device-plugin-values.yaml" --wait --timeout 5m ||
      { dump_namespace "${ns}"; die "the NVIDIA device plugin did not become ready" "read the plugin logs above; most often the node has no GPU (see preflight)"; }
    installed=true
    log::ok "NVIDIA device plugin ${NVIDIA_DEVICE_PLUGIN_CHART_VERSION} installed"
  fi
  if ! wait_until "${GPU_ALLOCATABLE_TIMEOUT_S}" 5 "nvidia.com/gpu to become allocatable" gpu_allocatable; then
    dump_namespace "${ns}"
    die "no GPU is allocatable (nvidia.com/gpu) on the GPU node" \
      "read the device plugin logs above: kubectl --context ${KUBE_CONTEXT} -n ${ns} logs ds/${rel}" \
      "check the node sees the GPU: docker exec ${CLUSTER_NAME}-worker nvidia-smi -L"
  fi
  log::ok "nvidia.com/gpu allocatable"
  if [[ "${installed}" == true || "$(cluster_info gpu-proof)" != passed ]]; then
    prove_gpu
  else
    log::ok "GPU proof already passed on this cluster"
  fi
}

# Run nvidia-smi in a pod that requests one GPU, the way the predictors will.
prove_gpu() {
  log::info "running nvidia-smi in a pod that requests nvidia.com/gpu: 1"
  kc delete pod gpu-smoke --namespace default --ignore-not-found >/dev/null
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: gpu-smoke
  namespace: default
spec:
  restartPolicy: Never
  runtimeClassName: nvidia
  containers:
    - name: nvidia-smi
      image: ${GPU_SMOKE_IMAGE}
      command: ["nvidia-smi"]
      resources:
        limits:
          nvidia.com/gpu: 1
EOF
  if ! kc wait pod/gpu-smoke --namespace default --for=jsonpath='{.status.phase}'=Succeeded --timeout=300s >/dev/null; then
    kc describe pod gpu-smoke --namespace default >&2 || true
    kc logs pod/gpu-smoke --namespace default >&2 || true
    die "the GPU proof pod (nvidia-smi with nvidia.com/gpu: 1) did not succeed" \
      "read its description and logs above; then: kubectl --context ${KUBE_CONTEXT} -n nvidia-device-plugin logs ds/nvidia-device-plugin"
  fi
  kc logs pod/gpu-smoke --namespace default >&2
  kc delete pod gpu-smoke --namespace default --wait=false >/dev/null
  GPU_PROOF=passed
  log::ok "a pod ran nvidia-smi on an allocated GPU"
}

# ---------------------------------------------------------------------------------------------
# Knative Serving + Kourier

install_knative() {
  log::step "Knative Serving ${KNATIVE_SERVING_VERSION} + Kourier ${KNATIVE_KOURIER_VERSION}"
  local serving="https://github.com/knative/serving/releases/download/knative-${KNATIVE_SERVING_VERSION}"
  local kourier="https://github.com/knative/net-kourier/releases/download/knative-${KNATIVE_KOURIER_VERSION}/kourier.yaml"
  kc apply -f "${serving}/serving-crds.yaml" >/dev/null
  kc wait --for=condition=Established crd/services.serving.knative.dev --timeout=120s >/dev/null
  kc apply -f "${serving}/serving-core.yaml" >/dev/null
  kc apply -f "${kourier}" >/dev/null
  kc patch configmap/config-network --namespace knative-serving --type merge \
    --patch '{"data":{"ingress-class":"kourier.ingress.networking.knative.dev"}}' >/dev/null
  # Routes get <svc>.<ns>.127.0.0.1.sslip.io; sslip.io resolves that to 127.0.0.1 (or use a Host header).
  kc patch configmap/config-domain --namespace knative-serving --type merge \
    --patch "{\"data\":{\"${KNATIVE_DOMAIN}\":\"\"}}" >/dev/null
  # Knative resolves image tags to digests by asking the registry; the nodes' registry alias is
  # not reachable from the controller, so never resolve these (deploy-knative.sh uses digests anyway).
  kc patch configmap/config-deployment --namespace knative-serving --type merge \
    --patch "{\"data\":{\"registries-skipping-tag-resolving\":\"kind.local,ko.local,dev.local,localhost:${REGISTRY_PORT},${REGISTRY_NAME}:5000\"}}" >/dev/null
  # Kourier's gateway as a NodePort that kind-config*.yaml publishes on 127.0.0.1:80.
  kc patch service/kourier --namespace kourier-system \
    --patch "{\"spec\":{\"type\":\"NodePort\",\"ports\":[{\"port\":80,\"nodePort\":${KOURIER_NODE_PORT}}]}}" >/dev/null
  local ns
  for ns in knative-serving kourier-system; do
    if ! kc wait deployment --all --namespace "${ns}" --for=condition=Available --timeout="${TIMEOUT_S}s" >/dev/null; then
      dump_namespace "${ns}"
      die "Knative did not become ready in namespace ${ns} within ${TIMEOUT_S}s" \
        "read the pod events and logs above (image pulls need internet access)" \
        "then re-run ./setup-cluster.sh (it resumes where it stopped)"
    fi
  done
  log::ok "Knative Serving is ready (domain ${KNATIVE_DOMAIN}, ingress http://${INGRESS_ADDR})"
}

# ---------------------------------------------------------------------------------------------
# KServe (InferenceService in Knative mode)

helm_ensure() {
  local ns="$1" rel="$2" want="$3"
  shift 3
  if [[ "$(helm_release_chart "${ns}" "${rel}")" == "${want}" ]]; then
    log::ok "${rel}: ${want} already installed"
    return 0
  fi
  helm --kube-context "${KUBE_CONTEXT}" upgrade --install "${rel}" "$@" \
    --namespace "${ns}" --create-namespace --wait --timeout 10m ||
    { dump_namespace "${ns}"; die "helm could not install ${rel}" "read the events above, then re-run ./setup-cluster.sh --with-kserve"; }
  log::ok "${rel}: ${want} installed"
}

install_kserve() {
  log::step "cert-manager ${CERT_MANAGER_VERSION} + KServe ${KSERVE_VERSION} (Knative mode)"
  helm_ensure cert-manager cert-manager "cert-manager-${CERT_MANAGER_VERSION}" \
    oci://quay.io/jetstack/charts/cert-manager --version "${CERT_MANAGER_VERSION}" --set crds.enabled=true
  helm_ensure kserve kserve-crd "kserve-crd-${KSERVE_VERSION}" \
    oci://ghcr.io/kserve/charts/kserve-crd --version "${KSERVE_VERSION}"
  # Kourier is the network layer: no Istio virtual host, KServe routes through Knative's routes.
  helm_ensure kserve kserve "kserve-resources-${KSERVE_VERSION}" \
    oci://ghcr.io/kserve/charts/kserve-resources --version "${KSERVE_VERSION}" \
    --set kserve.controller.deploymentMode=Knative \
    --set kserve.controller.gateway.disableIstioVirtualHost=true
}

# ---------------------------------------------------------------------------------------------

GPU_PROOF=""

# cluster_info KEY: read what an earlier run recorded (empty when not recorded).
cluster_info() {
  kc get configmap "${CLUSTER_INFO_CM}" --namespace "${CLUSTER_INFO_NS}" --ignore-not-found \
    -o "jsonpath={.data.$1}"
}

record_cluster_info() {
  local accelerator=cpu kserve="${WITH_KSERVE}"
  if [[ "${GPU}" == true ]]; then
    accelerator=gpu
    [[ -n "${GPU_PROOF}" ]] || GPU_PROOF="$(cluster_info gpu-proof)"
  fi
  [[ "${kserve}" == true ]] || kserve="$(cluster_info kserve)"
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: ${CLUSTER_INFO_CM}
  namespace: ${CLUSTER_INFO_NS}
data:
  accelerator: "${accelerator}"
  gpu-proof: "${GPU_PROOF}"
  knative: "${KNATIVE_SERVING_VERSION}"
  kserve: "${kserve:-false}"
EOF
}

delete_cluster() {
  PREFLIGHT_PROBLEMS=()
  preflight::docker_running || true
  preflight::need_tool kind "install kind: https://kind.sigs.k8s.io/docs/user/quick-start/#installation" || true
  preflight::finish
  if kind_cluster_exists "${CLUSTER_NAME}"; then
    kind delete cluster --name "${CLUSTER_NAME}"
    log::ok "cluster ${CLUSTER_NAME} deleted"
  else
    log::ok "no cluster named ${CLUSTER_NAME}; nothing to delete"
  fi
  log::info "the registry container is kept for other clusters; remove it with: docker rm -f ${REGISTRY_NAME}"
}

main() {
  parse_args "$@"
  if [[ "${DELETE}" == true ]]; then
    delete_cluster
    return 0
  fi
  preflight
  ensure_registry
  ensure_cluster
  ensure_registry_on_nodes
  if [[ "${GPU}" == true ]]; then
    ensure_gpu
  fi
  install_knative
  if [[ "${WITH_KSERVE}" == true ]]; then
    install_kserve
  fi
  record_cluster_info
  log::step "Cluster '${CLUSTER_NAME}' is ready"
  log::info "next: ./deploy-knative.sh$([[ "${GPU}" == true ]] || printf ' --cpu')"
  log::info "kubectl context: ${KUBE_CONTEXT}"
}

main "$@"
