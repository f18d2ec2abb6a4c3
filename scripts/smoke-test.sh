#!/usr/bin/env bash
# Bring-up check for a lab host: runs `cis490-shipper ping` and prints PASS, or FAIL with the
# one command that fixes it. Usage: scripts/smoke-test.sh [--config PATH] [--commit SHA]
set -uo pipefail
bin=${CIS490_SHIPPER:-/opt/cis490/bin/cis490-shipper}
[[ -x $bin ]] || bin=$(command -v cis490-shipper || true)
[[ -n $bin ]] || { echo "FAIL: cis490-shipper is not installed; fix: sudo /opt/cis490/scripts/install-lab-host.sh"; exit 1; }
cfg=/etc/cis490/lab-host.toml
args=()
while (($#)); do
  case $1 in
    --config) cfg=$2; shift 2 ;;
    --commit) args+=(--commit "$2"); shift 2 ;;
    *) echo "usage: $0 [--config PATH] [--commit SHA]"; exit 2 ;;
  esac
done
out=$("$bin" --config "$cfg" ping "${args[@]}" 2>&1)
code=$?
printf '%s\n' "$out" | sed 's/^/  /'
key() { grep -E "^\s*$1\s*=" "$cfg" 2>/dev/null | head -1 | sed -E 's/^[^=]*=\s*"?([^"]*)"?.*/\1/'; }
case $code in
  0) echo "PASS: the receiver knows this host and admits its commit" ;;
  4) echo "FAIL: this host's code is out of date; fix (run on this host):"
     printf '%s\n' "$out" | sed -n '/NOT ADMITTED/,$p' | tail -n +2 ;;
  2) echo "FAIL: the config is not usable; fix the key named above in $cfg" ;;
  *)
    if grep -q "REFUSED (403\|MISMATCH" <<<"$out"; then
      echo "FAIL: the certificate belongs to another host; fix: install this host's own certificate at $(key cert_file) (its DNS name must equal host_id)"
    elif grep -q "TLS handshake" <<<"$out"; then
      echo "FAIL: TLS: the receiver's certificate is not trusted or ours was refused; fix: check receiver.ca_file ($(key ca_file)) and receiver.cert_file ($(key cert_file)) in $cfg"
    elif grep -q "REFUSED (401" <<<"$out"; then
      echo "FAIL: the bearer token was refused; fix: put this host's token from the receiver's tokens file into $(key token_file)"
    elif grep -q "UNREACHABLE" <<<"$out"; then
      echo "FAIL: the receiver cannot be reached; fix: check receiver.url ($(key url)) and the network path, then: systemctl status cis490-receiver (on the receiver)"
    else
      echo "FAIL: see the output above"
    fi ;;
esac
exit $((code == 0 ? 0 : 1))
