#!/usr/bin/env bash
# The test command: everything a fresh Debian machine with the Rust
# toolchain needs to run the whole suite, then the suite.
#
#   ./scripts/test.sh            # lints, build, every test
#   ./scripts/test.sh --quick    # skip fmt/clippy
#
# Exits non-zero when any step or test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[[ "${1:-}" == "--quick" ]] && quick=1

step() { printf '\n==> %s\n' "$*"; }

step "installing test dependencies"
./scripts/install-test-deps.sh

if [[ $quick == 0 ]]; then
    step "cargo fmt --check"
    cargo fmt --all -- --check
    step "cargo clippy"
    cargo clippy --workspace --all-targets --locked -- -D warnings
fi

# The end-to-end suites start the real binaries, so build them first.
step "cargo build --bins"
cargo build --workspace --bins --locked

step "tests"
profile=default
[[ -n "${CI:-}" ]] && profile=ci
if cargo nextest --version >/dev/null 2>&1; then
    # (nextest skips doctests; the workspace has none.)
    cargo nextest run --workspace --locked --profile "$profile" --no-tests=fail
else
    cargo test --workspace --locked
fi
