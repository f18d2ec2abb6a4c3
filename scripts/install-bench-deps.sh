#!/usr/bin/env bash
# The peers of the comparison benchmark, from Debian's packages: nginx (with the DAV module),
# curl and zstd. The nginx package's own service is kept from starting.
set -euo pipefail
missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v curl >/dev/null || missing+=(curl)
command -v zstd >/dev/null || missing+=(zstd)
((${#missing[@]})) || exit 0
sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
policy=/usr/sbin/policy-rc.d
added=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
  "${sudo_cmd[@]}" chmod +x "$policy"
  added=1
fi
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
((added)) && "${sudo_cmd[@]}" rm -f "$policy"
true
