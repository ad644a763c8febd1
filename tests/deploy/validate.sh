#!/usr/bin/env bash
# Offline validation of deploy/: renders every kustomization and validates every
# object against the Kubernetes schemas (strict), plus the static pod, the
# EgressSelectorConfigurations, the PodMonitors, the scrape config, the Grafana
# dashboard and the Containerfile; see validate.py for the list of checks.
#
#   bash tests/deploy/validate.sh            # installs its tools on first run (setup.sh)
#   K8S_VERSIONS="1.33.0" bash tests/deploy/validate.sh
#   VERBOSE=0 bash tests/deploy/validate.sh  # only failures and the summary
#
# Last line: "N passed, M failed"; exit status non-zero if anything failed.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! VENV="$(bash "$HERE/setup.sh")"; then
    echo "setup failed: cannot install kubectl/kubernetes-validate" >&2
    echo "0 passed, 1 failed"
    exit 1
fi

export KUBECTL="$VENV/bin/kubectl"
exec "$VENV/bin/python" "$HERE/validate.py" "$@"
