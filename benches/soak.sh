#!/usr/bin/env bash
# Soak: the release binary over the local directory and the real CNCF registry, under a steady
# load of warm keys for a bounded time, while a fault loop kills the registry every FAULT_EVERY
# seconds and starts it again FAULT_DOWN seconds later (same port, same storage). Prints the
# error count, the p99, the stale answers served and the RSS; exits 1 on any 5xx (every key
# asked is warm, so none may fail) or when RSS grew more than 10% over the run.
#
#   usage: benches/soak.sh        (needs wrk, docker-registry, curl, python3; loopback only)
# Knobs: DURATION seconds (300), RATE requests/s (default: 80% of a CALIBRATE-second wrk run
# like benches/load.sh's), FAULT_EVERY (30), FAULT_DOWN (15), TTL cache seconds (5),
# WARMUP seconds before the baseline RSS (30), PACE_MS (10), THREADS (2).
# Builds nothing: run `cargo build --release` first.
#
# The rate: wrk2 (open-loop, fixed rate) is not in Debian. wrk here keeps a fixed number of
# connections, each pausing PACE_MS between its answer and its next request (wrk's Lua
# `delay()`), with RATE * PACE_MS / 1000 connections: the rate is at most RATE, a little under
# it by the latency; the achieved rate is printed. The p99 is wrk's, per request, measured
# while the connection waits for its answer.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/registry.sh
duration=${DURATION:-300}
fault_every=${FAULT_EVERY:-30}
fault_down=${FAULT_DOWN:-15}
ttl=${TTL:-5}
warmup=${WARMUP:-30}
pace_ms=${PACE_MS:-10}
threads=${THREADS:-2}
calibrate=${CALIBRATE:-5}
bin=${CARGO_TARGET_DIR:-target}/release/extension-registry
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
for tool in wrk docker-registry curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool not found (Debian: apt-get install -y $tool)" >&2; exit 1; }
done
((duration > warmup + 10)) || { echo "DURATION must exceed WARMUP by 10 s or more" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/registry.pid" ] && kill "$(cat "$work/registry.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

rss_kib() { awk '/VmRSS/{print $2}' "/proc/$svc/status"; }

# The registry, started again on the same port and storage by the fault loop.
reg_port=$(free_port)
reg="http://127.0.0.1:$reg_port"
registry_config "$work" "$reg_port" > "$work/registry.yml"
start_registry() {
  docker-registry serve "$work/registry.yml" 2>>"$work/registry.log" &
  echo $! > "$work/registry.pid"
}
start_registry
wait_http "$reg/v2/"
head -c 65536 /dev/urandom > "$work/soak.tar.gz"
registry_push "$reg" soak/soak-provider 1.0.0 "$work/soak.tar.gz"

# The service: local directory and registry, a short TTL so that refreshes meet the outages.
svc_port=$(free_port)
cat > "$work/service.toml" <<TOML
[server]
host = "127.0.0.1"
port = $svc_port
[local]
path = "$PWD/tests/fixtures/extensions"
[oci]
registry = "127.0.0.1:$reg_port"
namespace = "soak"
[cache]
ttl_seconds = $ttl
[rate_limit]
enabled = false
TOML
"$bin" --config "$work/service.toml" --log-level warn >"$work/service.log" 2>&1 &
svc=$!
pids+=("$svc")
svc_url="http://127.0.0.1:$svc_port"
wait_http "$svc_url/livez"

# Warm keys only: listings merged over both backends, single extensions and versions from
# each, a search, a local download. Each is asked once before the load, so it is cached.
paths=(
  /api/v1/extensions
  "/api/v1/extensions?type=provider"
  /api/v1/extensions/provider/soak
  /api/v1/extensions/provider/soak/versions
  /api/v1/extensions/taskserv/kubernetes
  /api/v1/extensions/taskserv/kubernetes/versions
  "/api/v1/extensions/search?q=kube"
  /api/v1/extensions/provider/aws/latest
)
for p in "${paths[@]}"; do curl -fsS -o /dev/null "$svc_url$p"; done
rss_launch=$(rss_kib)

lua_paths=$(printf '"%s",' "${paths[@]}")
write_script() { # $1: delay in ms between an answer and the next request (0: none)
  cat <<LUA
local paths = {${lua_paths%,}}
local threads = {}
local n = 0
function setup(thread) table.insert(threads, thread) end
function init(args) server_errors = 0; stale = 0 end
function request() n = n % #paths + 1; return wrk.format("GET", paths[n]) end
function response(status, headers, body)
  if status >= 500 then server_errors = server_errors + 1 end
  local cs = headers["cache-status"] or headers["Cache-Status"]
  if cs and string.find(cs, "stale", 1, true) then stale = stale + 1 end
end
LUA
  if (($1 > 0)); then echo "function delay() return $1 end"; fi
  cat <<'LUA'
function done(summary, latency, requests)
  local e, s = 0, 0
  for _, t in ipairs(threads) do e = e + t:get("server_errors"); s = s + t:get("stale") end
  io.write(string.format("soak-5xx %d\nsoak-stale %d\n", e, s))
end
LUA
}

if [ -z "${RATE:-}" ]; then
  write_script 0 > "$work/calibrate.lua"
  wrk -t"$threads" -c32 -d"${calibrate}s" -s "$work/calibrate.lua" "$svc_url" > "$work/calibrate.out"
  measured=$(awk '/^Requests\/sec:/ {printf "%d", $2}' "$work/calibrate.out")
  RATE=$((measured * 8 / 10))
  echo "calibration (wrk, $threads threads, 32 connections, ${calibrate}s): $measured requests/s; soak rate: $RATE requests/s"
fi
connections=$(((RATE * pace_ms + 999) / 1000))
((connections < threads)) && connections=$threads
write_script "$pace_ms" > "$work/soak.lua"

# The fault loop: kill the registry every FAULT_EVERY s, start it again FAULT_DOWN s later.
(
  while :; do
    sleep "$((fault_every - fault_down))"
    kill "$(cat "$work/registry.pid")" 2>/dev/null || true
    echo "$(date +%T) registry stopped" >> "$work/faults.log"
    sleep "$fault_down"
    start_registry
    echo "$(date +%T) registry started" >> "$work/faults.log"
  done
) &
pids+=($!)

# RSS under load: a baseline once WARMUP has passed, the last sample just before the end.
(
  sleep "$warmup"
  rss_kib > "$work/rss.baseline"
  while sleep 5; do rss_kib > "$work/rss.last"; done
) &
pids+=($!)

echo "soak: ${duration}s at <= $RATE requests/s ($connections connections pacing ${pace_ms} ms), registry killed every ${fault_every}s for ${fault_down}s, TTL ${ttl}s"
timeout "$((duration + 60))" wrk -t"$threads" -c"$connections" -d"${duration}s" --timeout 10s --latency \
  -s "$work/soak.lua" "$svc_url" > "$work/soak.out"
rss_end=$(cat "$work/rss.last")
rss_base=$(cat "$work/rss.baseline")
rss_peak=$(awk '/VmHWM/{print $2}' "/proc/$svc/status")

achieved=$(awk '/^Requests\/sec:/ {print $2}' "$work/soak.out")
total=$(awk '/requests in/ {print $1}' "$work/soak.out")
p99=$(awk '$1 == "99%" {print $2}' "$work/soak.out")
non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $5}' "$work/soak.out")
socket=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$work/soak.out")
server_errors=$(awk '/^soak-5xx/ {print $2}' "$work/soak.out")
stale=$(awk '/^soak-stale/ {print $2}' "$work/soak.out")
outages=$(grep -c stopped "$work/faults.log" || true)
errors=$((${non2xx:-0} + ${socket:-0}))
growth=$(((rss_end - rss_base) * 100 / rss_base))

echo "requests: $total in ${duration}s ($achieved/s), p99 $p99"
echo "errors: $errors (non-2xx ${non2xx:-0}, socket ${socket:-0}); 5xx: $server_errors; stale answers: $stale; registry outages: $outages"
echo "RSS: $((rss_launch / 1024)) MiB at launch, $((rss_base / 1024)) MiB after ${warmup}s of load, $((rss_end / 1024)) MiB at the end (${growth}%), peak $((rss_peak / 1024)) MiB"
status=0
if ((server_errors > 0)); then
  echo "FAIL: $server_errors 5xx answers for warm keys" >&2
  status=1
fi
if ((rss_end * 10 > rss_base * 11)); then
  echo "FAIL: RSS grew by more than 10% under the same load" >&2
  status=1
fi
exit "$status"
