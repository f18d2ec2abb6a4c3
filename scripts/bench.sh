#!/usr/bin/env bash
# Benchmarks of the real binaries on loopback mTLS (release build). Figures go to stdout and,
# by hand, into docs/BENCHMARKS.md. Usage: scripts/bench.sh [all|receiver|gate|shipper|load [seconds]|soak [minutes]|fleet [hosts] [episodes each]|compare [reps]|s3|quarantine [uploads]]
# CIS490_BENCH_SCALE=10 shrinks every size tenfold for a quick check.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh >/dev/null
[[ ${1:-all} == compare ]] && scripts/install-bench-deps.sh
cargo build --release --locked -q -p cis490-tests --bins
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, rustc $(rustc --version | cut -d' ' -f2)"
exec target/release/e2e-bench "${1:-all}" "${@:2}"
