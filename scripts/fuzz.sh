#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 60 s each) and prints execs and
# findings. Usage: scripts/fuzz.sh [seconds-per-target] [target...]
# Targets run with the production limits and -rss_limit_mb=256, so an allocation that a
# hostile body could blow up (SPEC §16) is a finding, not a slow run.
# cargo-fuzz needs nightly flags; the machine's stable toolchain accepts them with
# RUSTC_BOOTSTRAP=1, set here for this script only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz list)
mkdir -p fuzz/corpus
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  if [[ $t == ingest && -d tests/corpus/hostile ]]; then
    cp -n tests/corpus/hostile/*.tar.zst "fuzz/corpus/$t/" 2>/dev/null || true
  fi
  # The raw header walk starts from the hostile corpus decompressed (small cases only).
  if [[ $t == tarwalk && -d tests/corpus/hostile ]] && command -v zstd >/dev/null; then
    for f in tests/corpus/hostile/*.tar.zst; do
      out="fuzz/corpus/$t/$(basename "$f" .zst)"
      [[ -e $out ]] || zstd -dcq "$f" 2>/dev/null | head -c 1048576 >"$out" || true
    done
  fi
  log=$(mktemp)
  set +e
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=256 -print_final_stats=1) >"$log" 2>&1
  code=$?
  set -e
  execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  findings=$( (find "fuzz/artifacts/$t" -type f 2>/dev/null || true) | wc -l)
  printf 'fuzz %-8s seconds=%s execs=%s exit=%s artifacts=%s\n' "$t" "$secs" "${execs:-?}" "$code" "$findings"
  if ((code != 0)); then tail -30 "$log"; fi
  rm -f "$log"
done
