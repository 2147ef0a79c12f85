#!/usr/bin/env bash
# Audit the project's resolved dependencies (uv.lock, every extra) for known vulnerabilities.
#
# Usage: scripts/audit.sh [--serve-only] [--help] [-- PIP_AUDIT_ARGS...]
#
#   --serve-only   audit only what the predictor image installs (the "serve" extra)
#   --help         print this text
#
# Exports uv.lock to a pinned requirements list (uv export --frozen --no-hashes), then runs
# pip-audit on it against PyPI's advisory data (OSV-backed; needs HTTPS to pypi.org). Known
# vulnerabilities that are accepted, each with its reason, are listed in the README (Security) and
# passed to pip-audit with --ignore-vuln from IGNORED_VULNS below. Exit codes: 0 no
# unaccepted vulnerability; 1 vulnerabilities found, the audit could not run, or a bad flag.
# Environment: PYTHON (default .venv/bin/python, else python3), UV (default: uv on PATH,
# else the one next to PYTHON), PIP_AUDIT (default: pip-audit next to PYTHON).
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Accepted vulnerabilities: ID and reason, one per line (keep the README's Security section in step).
IGNORED_VULNS=(
)

usage() {
  sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

log() {
  echo "audit: $*" >&2
}

find_tools() {
  PYTHON="${PYTHON:-}"
  if [[ -z "${PYTHON}" ]]; then
    if [[ -x "${ROOT}/.venv/bin/python" ]]; then
      PYTHON="${ROOT}/.venv/bin/python"
    else
      PYTHON="$(command -v python3 || true)"
    fi
  fi
  local bindir=""
  if [[ -n "${PYTHON}" ]]; then
    bindir="$(dirname "${PYTHON}")"
  fi
  UV="${UV:-$(command -v uv || echo "${bindir}/uv")}"
  PIP_AUDIT="${PIP_AUDIT:-${bindir}/pip-audit}"
  local missing=()
  [[ -n "${PYTHON}" && -x "${PYTHON}" ]] || missing+=("python (set PYTHON)")
  [[ -x "${UV}" ]] || missing+=("uv (pip install uv, or set UV)")
  [[ -x "${PIP_AUDIT}" ]] || missing+=("pip-audit (pip install 'densenet-knative[dev]' or pip-audit, or set PIP_AUDIT)")
  if ((${#missing[@]} > 0)); then
    log "missing tools:"
    printf '  - %s\n' "${missing[@]}" >&2
    return 1
  fi
}

check_advisory_service() {
  # pip-audit's default service reads each pinned release's vulnerabilities from PyPI's JSON API
  # (https://pypi.org/pypi/NAME/VERSION/json). Mirrors that serve only project pages answer 404
  # there, and pip-audit then skips every package yet prints "No known vulnerabilities found".
  local name="$1" version="$2"
  if ! "${PYTHON}" - "${name}" "${version}" <<'EOF'
import sys
import urllib.request

url = f"https://pypi.org/pypi/{sys.argv[1]}/{sys.argv[2]}/json"
try:
    with urllib.request.urlopen(url, timeout=20) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:
    print(f"audit: {url}: {e}", file=sys.stderr)
    sys.exit(1)
EOF
  then
    log "the vulnerability service is unreachable from here: PyPI's per-release JSON API (above)"
    log "did not answer, and pip-audit's other service (api.osv.dev) needs its own network access."
    log "nothing was audited; run scripts/audit.sh where pypi.org or api.osv.dev is reachable"
    log "(add '-- --vulnerability-service osv' for the latter)."
    return 1
  fi
}

export_requirements() {
  local out="$1"
  shift
  (cd "${ROOT}" && "${UV}" export --frozen --no-hashes --no-emit-project --format requirements-txt "$@" -o "${out}") >/dev/null
}

main() {
  local extras=(--all-extras)
  local passthrough=()
  while (($# > 0)); do
    case "$1" in
      --help | -h) usage; return 0 ;;
      --serve-only) extras=(--extra serve); shift ;;
      --) shift; passthrough=("$@"); break ;;
      *) log "unknown argument: $1"; usage >&2; return 1 ;;
    esac
  done
  find_tools
  TMP_DIR="$(mktemp -d)"
  trap 'rm -rf "${TMP_DIR}"' EXIT
  local tmp="${TMP_DIR}"
  export_requirements "${tmp}/requirements.txt" "${extras[@]}"
  local count first
  count="$(grep -c '^[A-Za-z0-9]' "${tmp}/requirements.txt")"
  first="$(grep -m1 '^[A-Za-z0-9]' "${tmp}/requirements.txt")"
  if [[ " ${passthrough[*]-} " != *" osv "* ]]; then
    check_advisory_service "${first%%==*}" "${first##*==}"
  fi
  log "auditing ${count} pinned packages from uv.lock (${extras[*]})"
  local ignore=()
  local entry
  for entry in "${IGNORED_VULNS[@]+"${IGNORED_VULNS[@]}"}"; do
    ignore+=(--ignore-vuln "${entry%% *}")
  done
  # --no-deps: the export is already the full, pinned closure; --disable-pip: nothing is installed.
  local status=0
  "${PIP_AUDIT}" --requirement "${tmp}/requirements.txt" --no-deps --disable-pip --progress-spinner off \
    --desc on --format json --output "${tmp}/audit.json" \
    "${ignore[@]+"${ignore[@]}"}" "${passthrough[@]+"${passthrough[@]}"}" || status=$?
  if [[ ! -s "${tmp}/audit.json" ]]; then
    log "pip-audit failed (exit ${status}) before writing a report; see above"
    return 1
  fi
  # A package pip-audit skipped was not audited: a failure, not a pass.
  if ! "${PYTHON}" - "${tmp}/audit.json" <<'EOF'
import json
import sys

with open(sys.argv[1]) as f:
    deps = json.load(f)["dependencies"]
vulnerable = [d for d in deps if d.get("vulns")]
skipped = [d for d in deps if d.get("skip_reason")]
for d in vulnerable:
    for v in d["vulns"]:
        fix = ", ".join(v.get("fix_versions") or []) or "none yet"
        print(f"{d['name']}=={d['version']}: {v['id']} (fixed in: {fix}) {v.get('description', '')[:160]}")
for d in skipped:
    print(f"not audited: {d['name']}: {d['skip_reason']}", file=sys.stderr)
print(f"audit: {len(deps)} packages, {len(vulnerable)} vulnerable, {len(skipped)} not audited", file=sys.stderr)
sys.exit(1 if vulnerable or skipped else 0)
EOF
  then
    log "vulnerable or unaudited packages (above): upgrade (uv lock --upgrade-package NAME), or accept"
    log "a vulnerability with its reason in IGNORED_VULNS and the README (Security)."
    return 1
  fi
  log "no known vulnerabilities in ${count} packages"
}

main "$@"
