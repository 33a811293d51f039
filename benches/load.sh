#!/usr/bin/env bash
# Load test of the running release binary on loopback: the list GET (served from the cache
# after the first request), with wrk for a bounded time. Reports requests per second and the
# 99th percentile latency.
#
# The rate limit is switched off for the run (one loopback client would otherwise measure the
# 429 path); everything else is the embedded default over the sample extensions.
# Per-request log lines are off by default (LOG_LEVEL) so the run measures the service, not
# the log file. Needs wrk (Debian package `wrk`). Knobs: DURATION (10s), CONNECTIONS (32),
# THREADS (2), TARGET (/api/v1/extensions), LOG_LEVEL.
set -euo pipefail

cd "$(dirname "$0")/.."
duration=${DURATION:-10s}
connections=${CONNECTIONS:-32}
threads=${THREADS:-2}
target=${TARGET:-/api/v1/extensions}
log_level=${LOG_LEVEL:-warn,extension_registry=info,extension_registry::telemetry=warn}
binary=${CARGO_TARGET_DIR:-./target}/release/extension-registry
work=$(mktemp -d)
pid=

stop() {
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        wait "$pid" || true
    fi
    rm -rf "$work"
}
trap stop EXIT

command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 1; }
cargo build --release --quiet

cat >"$work/config.toml" <<EOF
[local]
path = "$PWD/tests/fixtures/extensions"

[rate_limit]
enabled = false
EOF

"$binary" --config "$work/config.toml" --host 127.0.0.1 --port 0 --json-log --log-level "$log_level" \
    >"$work/log" 2>&1 &
pid=$!
address=
for _ in $(seq 100); do
    address=$(grep -o '"address":"127\.0\.0\.1:[0-9]*"' "$work/log" | head -n 1 | cut -d'"' -f4 || true)
    [[ -n $address ]] && break
    sleep 0.1
done
[[ -n $address ]] || { echo "the server did not start:" >&2; cat "$work/log" >&2; exit 1; }
url="http://$address$target"

# Warm the cache so the run measures hits.
curl -sf -o /dev/null "$url"

wrk -t"$threads" -c"$connections" -d"$duration" --latency "$url" | tee "$work/wrk"

rps=$(awk '/^Requests\/sec:/ {print $2}' "$work/wrk")
p99=$(awk '$1 == "99%" {print $2}' "$work/wrk")
non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $5}' "$work/wrk")
echo
echo "load: GET $target, $connections connections, $threads threads, $duration: $rps requests/s, p99 $p99${non2xx:+, $non2xx non-2xx answers}"
