#!/usr/bin/env bash
# Benchmarks of the real binaries on loopback mTLS (release build). Figures go to stdout and,
# by hand, into docs/BENCHMARKS.md. Usage: scripts/bench.sh [all|receiver|gate|shipper|load [seconds]|soak [minutes]|fleet [hosts] [episodes each]|compare [reps]|stages [reps]|link [reps]|s3|quarantine [uploads]|memory [runs]]
# CIS490_BENCH_SCALE=10 shrinks every size tenfold for a quick check.
# compare: CIS490_COMPARE_PIN=1 pins the client side to core 0 and the server side to core 1.
# link: about 1 GB per run over a paced relay (100 Mbit/s, 1 Gbit/s, unlimited), auto vs level 3,
# always pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh >/dev/null
[[ ${1:-all} == compare ]] && scripts/install-bench-deps.sh
[[ ${1:-all} == link ]] && export CIS490_COMPARE_PIN=1
cargo build --release --locked -q -p cis490-tests --bins
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, rustc $(rustc --version | cut -d' ' -f2)"
exec target/release/e2e-bench "${1:-all}" "${@:2}"
