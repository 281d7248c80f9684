#!/usr/bin/env bash
# cooper's one test command (the README's, and what .ci/run calls).
# It installs and starts whatever the tests need, idempotently, then runs
# formatting, lint and every test. Safe to run on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

# The integration tests' Python side: a venv with aiohttp for the Kubernetes API
# emulator (tests/apiserver/emulator.py). Created once, reused after.
VENV=target/test-venv
if ! "$VENV/bin/python" -c "import aiohttp" >/dev/null 2>&1; then
  echo "== creating $VENV (aiohttp for the Kubernetes API emulator)"
  mkdir -p target
  python3 -m venv "$VENV"
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
