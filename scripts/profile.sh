#!/usr/bin/env bash
# CPU profiles of both daemons on the comparison benchmark's workloads (issue 21): one
# cis490-only run of `compare` under `perf record`, following the shipper and receiver it starts,
# then one flame graph per daemon and workload in docs/bench/ (<workload>-<daemon>.svg) and the
# top functions by self time on stdout. Usage: scripts/profile.sh [large|small ...]
# Needs perf (Debian's linux-perf) and inferno (cargo install); installs them when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
if ! command -v perf >/dev/null; then
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq linux-perf
fi
# Pinned so every profile is drawn the same way.
INFERNO_VERSION=0.12.8
if ! command -v inferno-flamegraph >/dev/null; then
  cargo install inferno --locked --version "$INFERNO_VERSION"
fi
cargo build --release --locked -q -p cis490-tests --bins
out=docs/bench
mkdir -p "$out"
workloads=("$@")
((${#workloads[@]})) || workloads=(large small)
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
for wl in "${workloads[@]}"; do
  # DWARF unwinding: the release build keeps line tables but no frame pointers. 499 Hz keeps
  # the sample file to some hundreds of MB for a run of about a minute.
  CIS490_COMPARE_PEERS=0 CIS490_COMPARE_ONLY="$wl" \
    perf record -q -F 499 --call-graph dwarf,16384 -o "$data/$wl.data" -- \
    target/release/e2e-bench compare 1
  for daemon in shipper receiver; do
    # Threads carry their own names (tokio workers, zstd workers), so the daemon's samples are
    # picked by process id: every process whose main thread is the daemon's binary.
    pids=$(perf script -i "$data/$wl.data" -F comm,pid,tid 2>/dev/null |
      awk -v c="e2e-$daemon" '$1 == c { split($2, a, "/"); if (a[1] == a[2]) print a[1] }' |
      sort -u | paste -sd, -)
    if [[ -z $pids ]]; then
      echo "no samples of e2e-$daemon in the $wl run" >&2
      continue
    fi
    perf script -i "$data/$wl.data" --pid "$pids" 2>/dev/null |
      inferno-collapse-perf >"$data/$wl-$daemon.folded"
    inferno-flamegraph --title "cis490 $daemon, $wl workload (perf, 499 Hz)" \
      <"$data/$wl-$daemon.folded" >"$out/$wl-$daemon.svg"
    echo "== $wl $daemon: top functions by self time (percent of all samples in the run)"
    perf report -i "$data/$wl.data" --pid "$pids" --no-children --sort symbol \
      --percent-limit 1.5 --stdio -g none 2>/dev/null | grep -E '^ +[0-9.]+%' | head -25 || true
  done
done
