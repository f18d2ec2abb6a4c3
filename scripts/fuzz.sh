#!/usr/bin/env bash
# Runs the cargo-fuzz targets. Usage:
#   scripts/fuzz.sh [seconds-per-target] [target...]   explore (default 60 s each)
#   scripts/fuzz.sh ci [target...]                     CI: 20 s each from the checked-in corpus
#   scripts/fuzz.sh cmin [target...]                   fold what exploring found into the
#                                                      checked-in corpus, minimised
# The checked-in corpus is fuzz/corpus/<target> (small, minimised: commit it after `cmin`).
# Exploring starts from it and writes what it finds to fuzz/work/<target> (not tracked), so a
# run never dirties the checked-in corpus; `ci` does the same with a scratch directory and fails
# on any crash, leak, timeout or RSS overrun, so a regression on a known input fails the build.
# Targets run with the production limits and -rss_limit_mb=256, so an allocation that a
# hostile body could blow up (SPEC §16) is a finding, not a slow run.
# cargo-fuzz needs nightly flags; the machine's stable toolchain accepts them with
# RUSTC_BOOTSTRAP=1, set here for this script only.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=explore
secs=60
case ${1:-} in
  ci) mode=ci; secs=${CIS490_FUZZ_CI_SECONDS:-20}; shift ;;
  cmin) mode=cmin; shift ;;
  '' | *[!0-9]*) ;;
  *) secs=$1; shift ;;
esac
# Pinned so CI builds the same tool every time; installed once.
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
  echo "installing cargo-fuzz ${CARGO_FUZZ_VERSION}"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi
export RUSTC_BOOTSTRAP=1
# ASan keeps freed memory in a quarantine (256 MB by default) to catch use-after-free; with inputs
# of a few hundred KiB that quarantine alone passes the 256 MB RSS limit, and libFuzzer reports
# an out-of-memory that is its own bookkeeping, not the target's. 32 MB keeps the check useful.
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=32}
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <(cd fuzz && cargo fuzz list)
if [[ $mode == ci ]]; then
  # One build of every target up front, so the per-target time is fuzzing, not compiling.
  (cd fuzz && cargo fuzz build)
fi

failed=0
for t in "${targets[@]}"; do
  corpus="fuzz/corpus/$t"
  work="fuzz/work/$t"
  mkdir -p "$corpus"
  [[ $mode == ci ]] || mkdir -p "$work"
  if [[ $mode == cmin ]]; then
    # Adds what the work corpus covers beyond the checked-in one, then minimises the lot.
    (cd fuzz && cargo fuzz run "$t" "corpus/$t" "work/$t" -- -merge=1 -rss_limit_mb=256) >/dev/null 2>&1
    (cd fuzz && cargo fuzz cmin "$t" "corpus/$t" -- -rss_limit_mb=256) >/dev/null 2>&1
    printf 'cmin %-15s files=%s bytes=%s\n' "$t" "$(find "$corpus" -type f | wc -l)" \
      "$(du -sb "$corpus" | cut -f1)"
    continue
  fi
  if [[ $mode == ci ]]; then
    work=$(mktemp -d)
  else
    if [[ $t == ingest && -d tests/corpus/hostile ]]; then
      cp -n tests/corpus/hostile/*.tar.zst "$work/" 2>/dev/null || true
    fi
    # The raw header walk starts from the hostile corpus decompressed, cut to 64 KiB (the
    # structure is in the headers; a larger seed only slows every run and fills the RSS limit);
    # ingest_raw takes the same tars behind its framing byte (0: one frame of 128-byte blocks).
    if [[ $t == tarwalk || $t == ingest_raw ]] && [[ -d tests/corpus/hostile ]] && command -v zstd >/dev/null; then
      for f in tests/corpus/hostile/*.tar.zst; do
        out="$work/$(basename "$f" .zst)"
        [[ -e $out ]] && continue
        if [[ $t == tarwalk ]]; then
          zstd -dcq "$f" 2>/dev/null | head -c 65536 >"$out" || true
        else
          { printf '\x00'; zstd -dcq "$f" 2>/dev/null | head -c 65536; } >"$out" || true
        fi
      done
    fi
  fi
  log=$(mktemp)
  work=$(realpath "$work")
  # The body targets get a dictionary of tar, pax and zstd words (fuzz/dict/<target>.dict).
  dict=()
  [[ -e fuzz/dict/$t.dict ]] && dict=("-dict=dict/$t.dict")
  # A compressed body may decode to 1000 times its size before the ratio cap refuses it, so a
  # 400 KB input can take seconds under ASan: ingest inputs stay at 16 KiB (16 MiB decoded at
  # most), which still holds every header shape the validator distinguishes.
  [[ $t == ingest ]] && dict+=("-max_len=16384")
  # The header walk needs no more than a few headers and their data: 8 KiB inputs ran about 1.8
  # times as fast as the 64 KiB the seeds allowed (same load), with the same edges covered.
  [[ $t == tarwalk ]] && dict+=("-max_len=8192")
  set +e
  # New inputs go to the first directory (the work one); the checked-in corpus is only read.
  (cd fuzz && cargo fuzz run "$t" "$work" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=256 -print_final_stats=1 "${dict[@]}" ${CIS490_FUZZ_ARGS:-}) >"$log" 2>&1
  code=$?
  set -e
  execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)
  findings=$( (find "fuzz/artifacts/$t" -type f 2>/dev/null || true) | wc -l)
  printf 'fuzz %-15s seconds=%s execs=%s exit=%s artifacts=%s\n' "$t" "$secs" "${execs:-?}" "$code" "$findings"
  if ((code != 0)); then
    tail -30 "$log"
    failed=1
  fi
  rm -f "$log"
  [[ $mode == ci ]] && rm -rf "$work"
done
if ((failed)); then
  echo "fuzz: a target failed (reproduce with: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <artifact>)" >&2
  exit 1
fi
