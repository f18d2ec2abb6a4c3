#!/usr/bin/env bash
# A local Garage cluster (3 nodes on 127.0.0.1, replication_factor = 3) with one bucket and one
# access key, for the tests, the benchmark and trying the S3 store by hand.
#
#   scripts/garage-cluster.sh start DIR [BASE_PORT]   write configs, start, connect, lay out,
#                                                     wait for quorum, create key + bucket
#   scripts/garage-cluster.sh stop DIR                stop every node
#   scripts/garage-cluster.sh kill-node DIR N         SIGKILL node N (1..3)
#   scripts/garage-cluster.sh start-node DIR N        start node N again and reconnect it
#
# `start` prints shell assignments (GARAGE_ENDPOINT, GARAGE_REGION, GARAGE_BUCKET,
# GARAGE_KEY_ID, GARAGE_SECRET) on stdout and writes them to DIR/env; the key is also written
# to DIR/access_key and DIR/secret_key for a receiver's [store] section.
# Node N listens on BASE_PORT+10*(N-1): +0 S3 API, +1 RPC, +3 admin API.
# Nodes fsync metadata and data (GARAGE_FSYNC=false turns both off, as Garage's defaults do).
set -euo pipefail

GARAGE=${GARAGE:-garage}
cmd=${1:-}
dir=${2:-}
[[ -n $cmd && -n $dir ]] || { sed -n '2,15p' "$0" >&2; exit 2; }

node_conf() { echo "$dir/node$1/garage.toml"; }
g() { local n=$1; shift; "$GARAGE" -c "$(node_conf "$n")" "$@"; }

start_node() {
    local n=$1
    local conf
    conf=$(node_conf "$n")
    [[ -f $conf ]] || { echo "no config for node $n in $dir (run start first)" >&2; exit 1; }
    RUST_LOG=${GARAGE_LOG:-warn} nohup "$GARAGE" -c "$conf" server \
        >>"$dir/node$n/log" 2>&1 </dev/null &
    echo $! >"$dir/node$n/pid"
}

wait_rpc() {
    local n=$1
    for _ in $(seq 1 100); do
        if g "$n" status >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "garage node $n did not come up; see $dir/node$n/log" >&2
    exit 1
}

wait_healthy() {
    for _ in $(seq 1 200); do
        if g 1 status 2>/dev/null | grep -q 'HEALTHY NODES' &&
            ! g 1 status 2>/dev/null | grep -qi 'FAILED NODES'; then
            # Full quorum: every partition has all 3 of its nodes up.
            if g 1 json-api GetClusterHealth 2>/dev/null | grep -q '"status": *"healthy"'; then
                return 0
            fi
        fi
        sleep 0.1
    done
    echo "garage cluster in $dir is not healthy:" >&2
    g 1 status >&2 || true
    exit 1
}

connect_all() {
    local id1
    for n in 2 3; do
        id1=$(g "$n" node id -q)
        g 1 node connect "$id1" >/dev/null
    done
}

case $cmd in
start)
    base=${3:-3900}
    command -v "$GARAGE" >/dev/null || {
        echo "garage is not installed: cargo install garage --locked --version 2.5.0" >&2
        exit 1
    }
    mkdir -p "$dir"
    secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
    for n in 1 2 3; do
        p=$((base + 10 * (n - 1)))
        mkdir -p "$dir/node$n/meta" "$dir/node$n/data"
        cat >"$(node_conf "$n")" <<EOF
metadata_dir = "$dir/node$n/meta"
data_dir = "$dir/node$n/data"
db_engine = "sqlite"
metadata_fsync = ${GARAGE_FSYNC:-true}
data_fsync = ${GARAGE_FSYNC:-true}
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$((p + 1))"
rpc_public_addr = "127.0.0.1:$((p + 1))"
rpc_secret = "$secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$p"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$((p + 3))"
admin_token = "$token"
EOF
        start_node "$n"
    done
    for n in 1 2 3; do wait_rpc "$n"; done
    connect_all
    for n in 1 2 3; do
        id=$(g "$n" node id -q)
        g 1 layout assign -z dc1 -c 1G "${id%@*}" >/dev/null
    done
    g 1 layout apply --version 1 >/dev/null
    wait_healthy
    key_id="GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    key_secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    g 1 key import --yes -n cis490 "$key_id" "$key_secret" >/dev/null
    g 1 bucket create cis490 >/dev/null
    g 1 bucket allow --read --write --owner cis490 --key cis490 >/dev/null
    printf '%s\n' "$key_id" >"$dir/access_key"
    printf '%s\n' "$key_secret" >"$dir/secret_key"
    chmod 600 "$dir/access_key" "$dir/secret_key"
    {
        echo "GARAGE_ENDPOINT=http://127.0.0.1:$base"
        echo "GARAGE_REGION=garage"
        echo "GARAGE_BUCKET=cis490"
        echo "GARAGE_KEY_ID=$key_id"
        echo "GARAGE_SECRET=$key_secret"
    } | tee "$dir/env"
    ;;
stop)
    for n in 1 2 3; do
        if [[ -f $dir/node$n/pid ]]; then
            kill "$(cat "$dir/node$n/pid")" 2>/dev/null || true
        fi
    done
    for n in 1 2 3; do
        if [[ -f $dir/node$n/pid ]]; then
            pid=$(cat "$dir/node$n/pid")
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$dir/node$n/pid"
        fi
    done
    ;;
kill-node)
    n=${3:?node number}
    kill -9 "$(cat "$dir/node$n/pid")"
    rm -f "$dir/node$n/pid"
    ;;
start-node)
    n=${3:?node number}
    start_node "$n"
    wait_rpc "$n"
    # Peers re-dial a restarted node only every 30 s on their own.
    id=$(g "$n" node id -q)
    for m in 1 2 3; do
        [[ $m == "$n" ]] && continue
        g "$m" node connect "$id" >/dev/null 2>&1 || true
    done
    wait_healthy
    ;;
*)
    sed -n '2,15p' "$0" >&2
    exit 2
    ;;
esac
