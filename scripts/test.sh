#!/usr/bin/env bash
# cooper's one test command (the README's, and what .ci/run calls).
# It installs and starts whatever the tests need, idempotently, then runs
# formatting, lint and every test. Safe to run on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python for the tests: moto (EC2 and SQS), aiohttp (the fault proxy in front of moto,
# tests/faultproxy/proxy.py), PyYAML and kubernetes-validate (offline validation of
# deploy/ and simulations/). One venv, created once, reused.
VENV=target/test-venv
if ! "$VENV/bin/python" -c "import aiohttp, moto, yaml, kubernetes_validate" >/dev/null 2>&1 || [ ! -x "$VENV/bin/moto_server" ]; then
  echo "== preparing $VENV (moto for EC2 and SQS, aiohttp for the fault proxy, kubernetes-validate for deploy/)"
  mkdir -p target
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
fi
export COOPER_TEST_PYTHON="$PWD/$VENV/bin/python"

# A real Kubernetes control plane for the controller's tests (kube-apiserver,
# kube-scheduler, kube-controller-manager v1.26 and etcd, started per test by
# tests/k8s/up): the envtest convention first (KUBEBUILDER_ASSETS), else the binaries
# shipped beside this repository in ../shared/k8s/bin, unpacked once into target/k8s-bin.
if [ -z "${KUBEBUILDER_ASSETS:-}" ] || [ ! -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]; then
  packed=../shared/k8s/bin
  assets=target/k8s-bin
  for b in etcd kube-apiserver kube-scheduler kube-controller-manager; do
    if [ ! -x "$assets/$b" ]; then
      if [ ! -f "$packed/$b.xz" ]; then
        echo "error: no Kubernetes binaries: set KUBEBUILDER_ASSETS to a folder with etcd, kube-apiserver," >&2
        echo "       kube-scheduler and kube-controller-manager (v1.26), or provide $packed/*.xz" >&2
        exit 1
      fi
      echo "== unpacking $b into $assets"
      mkdir -p "$assets"
      xz -dc "$packed/$b.xz" >"$assets/$b.tmp" && chmod +x "$assets/$b.tmp" && mv "$assets/$b.tmp" "$assets/$b"
    fi
  done
  export KUBEBUILDER_ASSETS="$PWD/$assets"
fi
for tool in openssl curl; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed to start the test control plane" >&2; exit 1; }
done

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (all targets, warnings are errors)"
cargo clippy --all-targets --locked -- -D warnings

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-targets --locked --no-fail-fast
else
  cargo test --all-targets --locked --no-fail-fast
fi
