#!/usr/bin/env bash
# The whole job on a built-in default, on one machine: builds both daemons, makes the lab's CA
# and certificates with `cis490-receiver pki`, a git repository with history, starts a receiver on loopback, writes sample
# episodes (current, stale, unstamped, with a symlink), ships them with the shipper, and shows
# where each one ended up. Usage: scripts/demo.sh [--keep]   (DEMO_DIR=... to choose the dir)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
keep=0
[[ ${1:-} == --keep ]] && keep=1

scripts/install-test-deps.sh --demo >/dev/null  # git, curl
echo "==> building cis490-receiver and cis490-shipper"
# The `demo` profile (Cargo.toml): unoptimised, no debug info, the quickest build from nothing.
# CIS490_DEMO_PROFILE=dev reuses the test build instead (CI does). Progress is shown: the first
# build takes minutes.
profile=${CIS490_DEMO_PROFILE:-demo}
cargo build --locked --profile "$profile" -p cis490-receiver -p cis490-shipper
[[ $profile == dev ]] && outdir=debug || outdir=$profile
bin="${CARGO_TARGET_DIR:-$root/target}/$outdir"

demo=${DEMO_DIR:-$(mktemp -d /tmp/cis490-demo.XXXXXX)}
mkdir -p "$demo"
cleanup() {
  [[ -n ${rpid:-} ]] && kill "$rpid" 2>/dev/null && wait "$rpid" 2>/dev/null
  if ((keep == 0)) && [[ -z ${DEMO_DIR:-} ]]; then rm -rf "$demo"; else echo "(kept $demo)"; fi
}
trap cleanup EXIT
echo "==> working in $demo"

echo "==> making the lab's CA, the receiver's certificate and two lab-host certificates (cis490-receiver pki)"
pki="$demo/pki"
"$bin/cis490-receiver" pki init --dir "$pki" --name localhost --name 127.0.0.1 | sed 's/^/    /'
for h in labhost-01 labhost-02; do
  "$bin/cis490-receiver" pki issue "$h" --dir "$pki" >/dev/null
done
"$bin/cis490-receiver" pki list --dir "$pki" | sed 's/^/    /'

echo "==> making the project's git repository (3 commits on main)"
repo="$demo/repo"
git init -q -b main "$repo"
for i in 1 2 3; do
  git -C "$repo" -c user.name=demo -c user.email=demo@cis490.invalid \
    commit -q --allow-empty -m "change $i"
done
old=$(git -C "$repo" rev-parse HEAD~2)
head=$(git -C "$repo" rev-parse HEAD)

cat >"$demo/receiver.toml" <<TOML
listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
store_dir = "$demo/store"
[tls]
cert_file = "$pki/receiver.pem"
key_file = "$pki/receiver.key"
client_ca_file = "$pki/ca.pem"
[version_gate]
repo_path = "$repo"
window = 2
TOML

echo "==> starting the receiver (window: the last 2 commits of main)"
"$bin/cis490-receiver" --config "$demo/receiver.toml" serve 2>"$demo/receiver.log" &
rpid=$!
for _ in $(seq 1 100); do
  grep -q "receiver listening" "$demo/receiver.log" && break
  sleep 0.1
done
line=$(grep -m1 "receiver listening" "$demo/receiver.log")
listen=$(sed -E 's/.* listen=([0-9.:]+).*/\1/' <<<"$line")
ops=$(sed -E 's/.*metrics_listen=([0-9.:]+).*/\1/' <<<"$line")
echo "    receiver on https://$listen, operations on http://$ops"

lab_host_config() { # host_id data_dir
  mkdir -p "$2/episodes"
  cat <<TOML
host_id = "$1"
data_dir = "$2"
[receiver]
url = "https://localhost:${listen##*:}"
ca_file = "$pki/hosts/$1/ca.pem"
cert_file = "$pki/hosts/$1/$1.pem"
key_file = "$pki/hosts/$1/$1.key"
[shipping]
settle_s = 0
TOML
}
data="$demo/lab-host"
lab_host_config labhost-01 "$data" >"$demo/lab-host.toml"
# A second lab host that was never updated: its code is two commits behind main.
data2="$demo/lab-host-2"
lab_host_config labhost-02 "$data2" >"$demo/lab-host-2.toml"

echo "==> writing sample episodes"
mkep() { # id commit [data dir]
  local d=${3:-$data}
  mkdir -p "$d/episodes/$1/camera"
  printf '{"episode_id": "%s", "code_version": {"commit": "%s"}}\n' "$1" "$2" >"$d/episodes/$1/meta.json"
  head -c 200000 /dev/urandom >"$d/episodes/$1/camera/frames.bin"
  seq 1 5000 >"$d/episodes/$1/joints.csv"
}
mkep demo-current-1 "$head"
mkep demo-current-2 "$head"
mkep demo-large "$head"
head -c 8000000 /dev/urandom >"$data/episodes/demo-large/camera/video.bin"
mkep demo-stale "$old" "$data2"
mkep demo-symlink "$head"
ln -s /etc/hostname "$data/episodes/demo-symlink/link"
mkdir -p "$data/episodes/demo-unstamped" && echo '{"episode_id": "demo-unstamped"}' >"$data/episodes/demo-unstamped/meta.json"
ls "$data/episodes" | sed 's/^/    labhost-01: /'
ls "$data2/episodes" | sed 's/^/    labhost-02: /'

echo "==> cis490-shipper ping (is HEAD admitted?)"
"$bin/cis490-shipper" --config "$demo/lab-host.toml" ping --commit "$head" | sed 's/^/    /' || true

echo "==> cis490-shipper once (ship everything that is ready)"
set +e
"$bin/cis490-shipper" --config "$demo/lab-host.toml" once 2>"$demo/shipper.log"
code=$?
set -e
grep -E 'event="?(shipped|quarantined)' "$demo/shipper.log" | sed -E 's/^[^ ]+ +//; s/^/    /' || true
echo "    exit code: $code"
echo "==> cis490-shipper once on labhost-02 (still running old code)"
set +e
"$bin/cis490-shipper" --config "$demo/lab-host-2.toml" once 2>"$demo/shipper-2.log"
code2=$?
set -e
grep -E 'event="?(shipped|quarantined)' "$demo/shipper-2.log" | sed -E 's/^[^ ]+ +//; s/^/    /' || true
echo "    exit code: $code2"

echo "==> the receiver's remediation for the stale episode (412, logged at ERROR by the shipper)"
sed -n 's/.*"remediation": *"\(.*\)",\{0,1\}$/\1/p' "$data2/quarantine/demo-stale/quarantine_reason.json" \
  | sed 's/\\n/\n/g' | sed 's/^/    /'

echo "==> where each episode ended up"
"$bin/cis490-shipper" --config "$demo/lab-host.toml" status | sed 's/^/    /'
for f in "$data"/quarantine/*/quarantine_reason.json "$data2"/quarantine/*/quarantine_reason.json; do
  [[ -e $f ]] || continue
  printf '    %-16s %s\n' "$(basename "$(dirname "$f")")" \
    "$(grep -o '"reason": *"[^"]*"' "$f" | sed 's/"reason": *//')"
done

echo "==> the receiver's index ($demo/store/index.jsonl)"
"$bin/cis490-receiver" --config "$demo/receiver.toml" export-index | sed 's/^/    /'
echo "==> cis490-shipper doctor (on this run's log)"
"$bin/cis490-shipper" --config "$demo/lab-host.toml" doctor --log-file "$demo/shipper.log" | sed 's/^/    /' || true

echo "==> receiver health and a few metrics"
curl -s "http://$ops/healthz" | sed 's/^/    /'
curl -s "http://$ops/metrics" | grep -E '^cis490_(receiver_uploads_total|gate_commits|gate_source)' | sed 's/^/    /'

echo "==> cis490-receiver fleet (every lab host as the receiver sees it; exit 1: one is not ok)"
# The demo's receiver listens on an ephemeral operations port; point a copy of its config there.
sed "s/^metrics_listen = .*/metrics_listen = \"$ops\"/" "$demo/receiver.toml" >"$demo/receiver-ops.toml"
colour=()
[[ -t 1 ]] && colour=(env CLICOLOR_FORCE=1)
set +e
"${colour[@]}" "$bin/cis490-receiver" --config "$demo/receiver-ops.toml" fleet | sed 's/^/    /'
fleet_code=${PIPESTATUS[0]}
set -e
echo "    exit code: $fleet_code"
echo "    the same as a page: http://$ops/  (JSON: http://$ops/v1/fleet)"

shipped=$(ls "$data/shipped" | wc -l)
if [[ $shipped -eq 3 && $(ls "$data/quarantine" | wc -l) -eq 2 && $fleet_code -eq 1 ]] \
  && grep -q "git pull origin main" "$data2/quarantine/demo-stale/quarantine_reason.json"; then
  echo "DEMO OK: 3 current episodes stored (one of 8 MB), stale/unstamped/symlink episodes quarantined with reasons"
else
  echo "DEMO FAILED: see $demo/receiver.log and $demo/shipper.log" >&2
  keep=1
  exit 1
fi
