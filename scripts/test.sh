#!/usr/bin/env bash
# cooper's one test command (the README's, and what .ci/run calls).
# It installs and starts whatever the tests need, idempotently, then runs
# formatting, lint and every test. Safe to run on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

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
