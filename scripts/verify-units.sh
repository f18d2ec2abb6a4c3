#!/usr/bin/env bash
# Lints both systemd units with `systemd-analyze verify`, ExecStart pointed at the built
# binaries, and fails on any message (it prints only for problems such as unknown keys).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v systemd-analyze >/dev/null || { echo "systemd-analyze missing (apt-get install systemd)"; exit 1; }
bin=${1:-target/debug}
[[ -x $bin/cis490-receiver && -x $bin/cis490-shipper ]] || cargo build --locked -q -p cis490-receiver -p cis490-shipper
bin=$(realpath "$bin")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for u in cis490-receiver cis490-shipper; do
  sed "s#/opt/cis490/bin/#$bin/#" "etc/$u.service" >"$tmp/$u.service"
done
out=$(cd "$tmp" && SYSTEMD_LOG_LEVEL=notice systemd-analyze verify ./cis490-receiver.service ./cis490-shipper.service 2>&1 || true)
if [[ -n $out ]]; then
  printf '%s\n' "$out"
  echo "units: FAIL"
  exit 1
fi
echo "units: OK (systemd-analyze verify printed nothing)"
