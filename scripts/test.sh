#!/usr/bin/env bash
# cooper's one test command (the README's, and what .ci/run calls).
# It installs and starts whatever the tests need, idempotently, then runs
# formatting, lint and every test. Safe to run on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

# The integration tests' Python side: a venv with aiohttp (+PyYAML for its RBAC) for the Kubernetes API
# emulator (tests/apiserver/emulator.py) and moto for the EC2 API. Created once, reused.
VENV=target/test-venv
if ! "$VENV/bin/python" -c "import aiohttp, moto, yaml, kubernetes_validate" >/dev/null 2>&1 || [ ! -x "$VENV/bin/moto_server" ]; then
  echo "== preparing $VENV (aiohttp + PyYAML for the Kubernetes API emulator, moto for EC2 and SQS, kubernetes-validate for deploy/)"
  mkdir -p target
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
fi
export COOPER_TEST_PYTHON="$PWD/$VENV/bin/python"

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
