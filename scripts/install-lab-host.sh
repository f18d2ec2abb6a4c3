#!/usr/bin/env bash
# Installs or updates cis490-shipper on a lab host: user, directories, binary under
# /opt/cis490/bin, systemd unit, config (only if none exists), restart if enabled, and drains
# episodes without a usable commit stamp. Idempotent. See --help.
set -euo pipefail
# shellcheck source=lib/install-common.sh
source "$(dirname "$0")/lib/install-common.sh"
parse_args "$@"
if [[ -n $BIN_DIR ]]; then need git tar install cmp; else need git tar install cmp cargo; fi
say "cis490 lab host install into ${ROOT:-/}"
ensure_user
sync_checkout
install_binary cis490-shipper
ensure_dir "$ETC" 0755
install_config "$INSTALL/etc/lab-host.toml.example" "$ETC/lab-host.toml"
for d in "$DATA" "$DATA/episodes" "$DATA/outbox" "$DATA/shipped" "$DATA/quarantine"; do
  ensure_dir "$d" 0750
done
install_file "$INSTALL/etc/cis490-shipper.service" "$UNITS/cis490-shipper.service" 0644
reload_units cis490-shipper.service

# Episodes recorded by code that never stamped a commit can never be admitted: set them aside.
cfg="$ETC/lab-host.toml"
data_dir=$(sed -nE 's/^\s*data_dir\s*=\s*"([^"]*)".*/\1/p' "$cfg" | head -1)
data_dir=${data_dir:-/var/lib/cis490}
if [[ -n $ROOT && $data_dir != "$ROOT"/* ]]; then
  say "  skipped: draining unstamped episodes ($data_dir is outside --root)"
elif ! "$INSTALL/bin/cis490-shipper" --config "$cfg" status >/dev/null 2>&1 || [[ ! -d $data_dir/episodes ]]; then
  say "  skipped: draining unstamped episodes ($cfg is not usable yet)"
else
  runas=()
  [[ -z $ROOT ]] && getent passwd cis490 >/dev/null && runas=(runuser -u cis490 --)
  if out=$("${runas[@]}" "$INSTALL/bin/cis490-shipper" --config "$cfg" quarantine-unstamped 2>&1); then
    say "  unstamped episodes: ${out##*$'\n'}"
    [[ $out == *"quarantined 0"* ]] || CHANGED=1
  else
    say "  warning: quarantine-unstamped failed: ${out##*$'\n'}"
  fi
fi
finish
