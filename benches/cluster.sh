#!/usr/bin/env bash
# Three replicas of the release binary sharing one redis-server, behind an nginx load balancer
# (round robin), all on loopback; wrk drives the balancer for a bounded time. Prints req/s,
# p99, and the backend calls the cluster made, against one replica alone under the same load.
# Then, on the cluster: the latency of an answer a replica takes from Redis (in-process miss,
# shared hit) against one it holds (in-process hit), each over PROBES distinct keys; and the
# cost of the rate limit per request, one connection at a time, with no limit, this replica's
# own quota, and the quota shared in Redis.
#
# Each replica's in-process cache starts cold: with Redis, a key is fetched from the backend
# by one replica and taken from Redis by the others. The backend is the local directory of
# sample extensions (its calls are `backend_requests_total`, health probes left out).
# Needs wrk, nginx (Debian `nginx-light`) and redis-server. Knobs: DURATION (10s),
# CONNECTIONS (32), THREADS (2), TARGET (/api/v1/extensions), PROBES (400).
set -euo pipefail

cd "$(dirname "$0")/.."
duration=${DURATION:-10s}
connections=${CONNECTIONS:-32}
threads=${THREADS:-2}
target=${TARGET:-/api/v1/extensions}
probes=${PROBES:-400}
binary=${CARGO_TARGET_DIR:-./target}/release/extension-registry
work=$(mktemp -d)
pids=()

stop() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap stop EXIT

for tool in wrk nginx redis-server; do
    command -v "$tool" >/dev/null || { echo "$tool not found (.ci/install-test-deps)" >&2; exit 1; }
done
cargo build --release --quiet

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_for() {
    for _ in $(seq 200); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.05
    done
    echo "nothing answers at $1" >&2
    exit 1
}

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)

# replica NAME WITH_REDIS [LIMITED]: starts one replica, prints its port. LIMITED=yes turns the
# rate limit on with a quota no run reaches, so every request pays for a decision.
replica() {
    local port config
    port=$(free_port)
    config="$work/$1.toml"
    {
        printf '[local]\npath = "%s/tests/fixtures/extensions"\n' "$PWD"
        if [[ ${3:-no} == yes ]]; then
            printf '[rate_limit]\nrequests_per_second = 1000000\nburst = 1000000\n'
        else
            printf '[rate_limit]\nenabled = false\n'
        fi
        if [[ $2 == yes ]]; then
            printf '[redis]\nurl = "redis://127.0.0.1:%s"\nkey_prefix = "bench:"\n' "$redis_port"
        fi
    } >"$config"
    "$binary" --config "$config" --host 127.0.0.1 --port "$port" --log-level warn \
        >"$work/$1.log" 2>&1 &
    pids+=($!)
    wait_for "http://127.0.0.1:$port/readyz"
    echo "$port"
}

# Backend calls a replica made, health probes left out.
backend_calls() {
    curl -sf "http://127.0.0.1:$1/api/v1/metrics" |
        awk '/^backend_requests_total\{/ && !/operation="health"/ {n += $2} END {print n + 0}'
}

# run URL: wrk for DURATION, prints "req/s p99".
run() {
    wrk -t"$threads" -c"$connections" -d"$duration" --latency "$1" >"$work/wrk"
    awk '/^Requests\/sec:/ {rps=$2} /^ +99%/ {p99=$2} END {print rps, p99}' "$work/wrk"
}

alone=$(replica alone no)
read -r alone_rps alone_p99 < <(run "http://127.0.0.1:$alone$target")
alone_calls=$(backend_calls "$alone")

ports=()
for name in a b c; do
    ports+=("$(replica "$name" yes)")
done
for port in "${ports[@]}"; do
    until curl -sf "http://127.0.0.1:$port/api/v1/health" | grep -q '"redis":"healthy"'; do
        sleep 0.05
    done
done
lb_port=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx.conf" <<CONF
worker_processes 1;
error_log $work/nginx/error.log;
pid $work/nginx/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $work/nginx;
    proxy_temp_path $work/nginx;
    fastcgi_temp_path $work/nginx;
    uwsgi_temp_path $work/nginx;
    scgi_temp_path $work/nginx;
    upstream replicas {
        server 127.0.0.1:${ports[0]};
        server 127.0.0.1:${ports[1]};
        server 127.0.0.1:${ports[2]};
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$lb_port;
        location / {
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
nginx -c "$work/nginx.conf" -p "$work/nginx" -g 'daemon off;' &
pids+=($!)
wait_for "http://127.0.0.1:$lb_port/livez"
read -r cluster_rps cluster_p99 < <(run "http://127.0.0.1:$lb_port$target")
cluster_calls=0
for port in "${ports[@]}"; do
    cluster_calls=$((cluster_calls + $(backend_calls "$port")))
done

# latencies PORT PATH...: one curl over one connection, prints "p50 p99" in microseconds.
latencies() {
    local port=$1
    shift
    printf "url = http://127.0.0.1:$port%s\noutput = /dev/null\n" "$@" >"$work/urls"
    curl -s -K "$work/urls" -w '%{time_total}\n' |
        awk '{print int($1 * 1000000)}' | sort -n |
        awk '{v[NR] = $1} END {print v[int(NR * 0.5)], v[int(NR * 0.99)]}'
}

# Answers only Redis holds for replica b: "not found" for PROBES names, fetched through a.
paths=()
for i in $(seq "$probes"); do
    paths+=("/api/v1/extensions/provider/l2-probe-$i")
done
latencies "${ports[0]}" "${paths[@]}" >/dev/null
read -r l2_p50 l2_p99 < <(latencies "${ports[1]}" "${paths[@]}")
read -r l1_p50 l1_p99 < <(latencies "${ports[1]}" "${paths[@]}")

# The rate limit's cost: one connection, so the difference is each request's own.
limit_run() {
    wrk -t1 -c1 -d"$duration" --latency "http://127.0.0.1:$1$target" >"$work/wrk"
    awk '/^Requests\/sec:/ {rps=$2} /^ +50%/ {p50=$2} END {print rps, p50}' "$work/wrk"
}
read -r none_rps none_p50 < <(limit_run "$alone")
read -r local_rps local_p50 < <(limit_run "$(replica local no yes)")
read -r shared_rps shared_p50 < <(limit_run "$(replica shared yes yes)")
per_request() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", 1000000 / a - 1000000 / b}'; }

printf '%-28s %12s %10s %14s\n' "" "req/s" "p99" "backend calls"
printf '%-28s %12s %10s %14s\n' "1 replica" "$alone_rps" "$alone_p99" "$alone_calls"
printf '%-28s %12s %10s %14s\n' "3 replicas + redis + nginx" "$cluster_rps" "$cluster_p99" "$cluster_calls"
echo
printf '%-28s %10s %10s\n' "answer on replica b (µs)" "p50" "p99"
printf '%-28s %10s %10s\n' "from redis (L1 miss)" "$l2_p50" "$l2_p99"
printf '%-28s %10s %10s\n' "in process (L1 hit)" "$l1_p50" "$l1_p99"
echo
printf '%-28s %12s %10s %18s\n' "rate limit, 1 connection" "req/s" "p50" "µs/request more"
printf '%-28s %12s %10s %18s\n' "none" "$none_rps" "$none_p50" "-"
printf '%-28s %12s %10s %18s\n' "local governor" "$local_rps" "$local_p50" "$(per_request "$local_rps" "$none_rps")"
printf '%-28s %12s %10s %18s\n' "shared (redis GCRA)" "$shared_rps" "$shared_p50" "$(per_request "$shared_rps" "$none_rps")"
