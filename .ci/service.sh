# Sourced by the live checks: start the release binary on a free loopback port, make
# requests that must answer a given status, stop it. The caller sets `check` (its name, for
# messages) and `work` (a temporary directory it removes) first, and calls stop_service on exit.

service_pid=
base=

# fail MESSAGE: prints MESSAGE and the tail of the service's log, then exits 1.
fail() {
    echo "$check: $*" >&2
    if [[ -s $work/service.log ]]; then
        echo "--- service log ---" >&2
        tail -n 20 "$work/service.log" >&2
    fi
    exit 1
}

# start_service [ARGS...]: builds the release binary and starts it on a free loopback port
# with ARGS (default: the embedded configuration); sets service_pid and base.
start_service() {
    local binary=${CARGO_TARGET_DIR:-./target}/release/extension-registry address=
    cargo build --release --quiet
    # Port 0: the kernel picks a free port and the "listening" log line says which.
    "$binary" --host 127.0.0.1 --port 0 --json-log "$@" >"$work/service.log" 2>&1 &
    service_pid=$!
    for _ in $(seq 100); do
        address=$(grep -o '"address":"127\.0\.0\.1:[0-9]*"' "$work/service.log" | head -n 1 | cut -d'"' -f4 || true)
        [[ -n $address ]] && break
        kill -0 "$service_pid" 2>/dev/null || fail "the service exited before listening"
        sleep 0.1
    done
    [[ -n $address ]] || fail "the service did not log its address within 10 s"
    base="http://$address"
}

# stop_service: stops the service if it runs (SIGTERM, then waits for it).
stop_service() {
    if [[ -n $service_pid ]] && kill -0 "$service_pid" 2>/dev/null; then
        kill -TERM "$service_pid"
        wait "$service_pid" || true
    fi
}

# expect STATUS CURL-ARGS...: one request, which must answer STATUS.
expect() {
    local want=$1 got
    shift
    got=$(curl -s --max-time 10 -o /dev/null -w '%{http_code}' "$@") || fail "curl $* failed"
    [[ $got == "$want" ]] || fail "$* answered $got, expected $want"
}

# exercise_routes: calls every route, checking each status: cache misses then hits, a
# download, a HEAD, a conditional GET (304), 404s, 400s, a 405, a CORS preflight, and enough
# requests from one client to be rate limited (429).
exercise_routes() {
    local etag many=() statuses
    expect 200 "$base/api/v1/extensions"
    expect 200 "$base/api/v1/extensions?type=provider&limit=2"
    expect 200 "$base/api/v1/extensions/search?q=kube"
    expect 200 "$base/api/v1/extensions/provider/aws"
    expect 200 "$base/api/v1/extensions/provider/aws/versions"
    expect 200 "$base/api/v1/extensions/provider/aws/versions"
    expect 200 "$base/api/v1/extensions/cluster/web/0.3.0"
    expect 200 "$base/api/v1/extensions/cluster/web/latest"
    expect 200 "$base/api/v1/health"
    expect 200 "$base/livez"
    expect 200 "$base/readyz"
    expect 200 "$base/api/v1/cache/stats"
    expect 200 "$base/api/v1/metrics"
    expect 200 -I "$base/api/v1/extensions/taskserv/kubernetes"
    expect 404 "$base/api/v1/extensions/provider/no-such-extension"
    expect 404 "$base/no/such/route"
    expect 400 "$base/api/v1/extensions/no-such-type/aws"
    expect 400 "$base/api/v1/extensions?limit=-1"
    expect 405 -X POST "$base/api/v1/extensions"
    expect 200 -X OPTIONS -H 'Origin: https://app.example.com' \
        -H 'Access-Control-Request-Method: GET' "$base/api/v1/extensions"
    etag=$(curl -s --max-time 10 -o /dev/null -D - "$base/api/v1/extensions/provider/aws" |
        tr -d '\r' | sed -n 's/^etag: //Ip')
    [[ -n $etag ]] || fail "GET /api/v1/extensions/provider/aws sent no ETag"
    expect 304 -H "If-None-Match: $etag" "$base/api/v1/extensions/provider/aws"
    # Past the default burst (100) on one connection, so the 429 path is in the numbers too.
    for _ in $(seq 120); do
        many+=(-o /dev/null "$base/api/v1/extensions/provider/aws")
    done
    statuses=$(curl -s --max-time 30 -w '%{http_code}\n' "${many[@]}")
    grep -qx 429 <<<"$statuses" || fail "120 quick requests were never rate limited"
}
