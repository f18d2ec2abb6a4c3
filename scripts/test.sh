#!/usr/bin/env bash
# The project's test command: unit tests and the end-to-end suite (real mTLS, real processes,
# real git repositories). Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo test --workspace --locked "$@"
