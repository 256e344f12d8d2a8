#!/usr/bin/env bash
# Runs the whole test suite: unit, integration and doc tests, with the examples built.
# It checks for (and, where it can, installs) what the tests need, and says so loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "=== MISSING: $1 — $2" >&2
        exit 1
    fi
}
need cargo "install Rust with rustup (https://rustup.rs), then rerun scripts/test.sh"
need cc "install a C compiler: apt-get install -y build-essential"

echo "=== rpyc test suite: cargo test (unit, integration, doc tests; builds examples)"
cargo test --locked "$@"
