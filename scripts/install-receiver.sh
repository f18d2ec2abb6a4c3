#!/usr/bin/env bash
# Installs or updates cis490-receiver on the central node: user, directories, binary under
# /opt/cis490/bin, systemd unit, config (only if none exists), restart if enabled. Idempotent.
set -euo pipefail
# shellcheck source=lib/install-common.sh
source "$(dirname "$0")/lib/install-common.sh"
parse_args "$@"
if [[ -n $BIN_DIR ]]; then need git tar install cmp; else need git tar install cmp cargo; fi
say "cis490 receiver install into ${ROOT:-/}"
ensure_user
sync_checkout
install_binary cis490-receiver
ensure_dir "$ETC" 0755
install_config "$INSTALL/etc/receiver.toml.example" "$ETC/receiver.toml"
ensure_dir "$DATA" 0750
ensure_dir "$DATA/store" 0750
install_file "$INSTALL/etc/cis490-receiver.service" "$UNITS/cis490-receiver.service" 0644
reload_units cis490-receiver.service
if "$INSTALL/bin/cis490-receiver" --config "$ETC/receiver.toml" check-config >/dev/null 2>&1; then
  say "  config check: ok"
else
  say "  config check: $ETC/receiver.toml is not usable yet ($("$INSTALL/bin/cis490-receiver" --config "$ETC/receiver.toml" check-config 2>&1 | tail -1))"
fi
finish
