#!/usr/bin/env bash
# Static security checks of the deployment files (infra/, cluster/) with checkov.
# checkov lives in its own virtualenv (.venv-checkov, gitignored): its dependency pins clash with the project's.
# Offline: --skip-download keeps checkov from calling the Prisma Cloud API (guidelines, severities).
# Suppressions are inline and carry a reason:
#   Terraform:  # checkov:skip=CKV_XXX: reason        (inside the resource block)
#   Kubernetes: metadata.annotations checkov.io/skipN: "CKV_XXX=reason"   (checkov ignores YAML comments there)
# cluster/aws-gpu.yaml (Ray cluster launcher config) and the KubeRay CRs are not objects any checkov
# framework knows; they are checked by tests/deploy/test_manifests.py instead.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION="${CHECKOV_VERSION:-3.3.30}"
VENV="${CHECKOV_VENV:-.venv-checkov}"
PYTHON="${PYTHON:-python3}"

installed_version() {
  "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("checkov"))' 2>/dev/null || true
}
if [ ! -x "$VENV/bin/checkov" ] || [ "$(installed_version)" != "$CHECKOV_VERSION" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi

# No network during the scan: no PyPI update check, no Prisma Cloud guideline/mapping downloads.
export CKV_SKIP_PACKAGE_UPDATE_CHECK=true BC_SKIP_MAPPING=TRUE

exec "$VENV/bin/checkov" -d infra -d cluster \
  --framework kubernetes terraform dockerfile secrets \
  --skip-download --quiet --compact "$@"
