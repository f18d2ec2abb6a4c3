#!/usr/bin/env bash
# Installs what the test suite needs besides the Rust toolchain: git (real repositories), curl
# (Expect: 100-continue checks), util-linux (unshare, mount for the full-disk test), and the
# rustfmt/clippy components, systemd-analyze for linting the units, promtool (Debian package
# prometheus) for checking and unit-testing the alerting rules, node_exporter (reads the
# shipper's metrics textfile in a test), and Garage (below). Safe to run
# repeatedly; does nothing when all are present.
# `--demo`: only what scripts/demo.sh uses (git, curl, openssl), so the demo never waits for
# Garage, Chromium or Prometheus.
set -euo pipefail
demo=0
[[ ${1:-} == --demo ]] && demo=1

missing=()
command -v git >/dev/null || missing+=(git)
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
if ((demo == 0)); then
  command -v unshare >/dev/null || missing+=(util-linux)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v prometheus-node-exporter >/dev/null || missing+=(prometheus-node-exporter)
  command -v chromium >/dev/null || missing+=(chromium)
fi
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
fi
((demo == 1)) && exit 0
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
# Garage, the S3-compatible store the scale-out tests run a 3-node cluster of. Built from
# crates.io (about 9 minutes on 2 cores the first time); skipped when this version is present.
GARAGE_VERSION=2.5.0
if ! garage --version 2>/dev/null | grep -qF "${GARAGE_VERSION}"; then
  echo "installing garage ${GARAGE_VERSION} (cargo install; takes a while the first time)"
  cargo install garage --locked --version "$GARAGE_VERSION"
fi
