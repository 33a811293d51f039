#!/usr/bin/env bash
# The cached path against a bare hyper server and nginx, on the same bytes.
#
# Captures the service's answers (one extension; a list of 100; the same list for a client
# accepting gzip/br), then serves the captured identity bytes from `benches/baseline` (bare
# hyper) and from nginx (1 worker, open_file_cache, if installed), and runs the service
# binary with its full default stack (rate limit on, with a quota the run cannot exhaust).
# Each server runs one worker (the service `[server] workers = 1`, the baseline one Tokio
# worker thread, nginx one worker process) pinned to core 0, and wrk runs on core 1, where
# `taskset` exists; wrk runs (-t1 -c64) are interleaved server by server, round by round,
# the servers' order reversed every other round, so a change in the machine's load hits every
# server alike. Prints, per answer and server: req/s (every round), p99, the server's CPU µs
# per request (utime+stime deltas of the server's processes in /proc/<pid>/stat over the
# requests wrk counted), and two ratios to bare hyper: of the means over all rounds, and the
# median of each round's own ratio (one slow spell on a shared machine moves the first with
# the round it fell in; with an odd number of rounds, the second only if it falls in most of
# them, and with an even number, which averages the two middle rounds, less than the first).
#
#   benches/compare.sh            knobs: DURATION (5s), ROUNDS (3), CONNECTIONS (64),
#                                 PROFILE (release, dist, or pgo: what the Docker image ships)
# Needs wrk, curl, python3 (free ports), for `pgo` what benches/pgo.sh needs (llvm-profdata);
# nginx optional (Debian nginx-light). Builds the
# service and the baseline with PROFILE, unless BASELINE names a baseline binary already built
# (then the service binary of PROFILE in target/ is used as it is). `pgo` builds both with
# benches/pgo.sh on the `dist` profile, each trained on its own (the baseline on the captured
# answers), which takes two pairs of full builds. PRELOAD names a shared library to
# preload into the service alone, e.g. another malloc (/usr/lib/x86_64-linux-gnu/libjemalloc.so.2)
# to measure it without a rebuild. Everything listens on 127.0.0.1 and stops on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/registry.sh
duration=${DURATION:-5s}
rounds=${ROUNDS:-3}
connections=${CONNECTIONS:-64}
profile=${PROFILE:-release}
case $profile in
  release | dist | pgo) ;;
  *) echo "PROFILE is release, dist or pgo, not $profile" >&2; exit 1 ;;
esac
if [ "$profile" = pgo ] && [ -n "${BASELINE:-}" ]; then
  echo "PROFILE=pgo builds its own baseline: leave BASELINE unset" >&2
  exit 1
fi
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 1; }
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  on_server=(taskset -c 0); on_client=(taskset -c 1)
else
  on_server=(); on_client=()
fi

if [ "$profile" = pgo ]; then
  service=$(PROFILE=dist benches/pgo.sh | tail -1)
elif [ -n "${BASELINE:-}" ]; then
  baseline=$BASELINE
else
  cargo build --profile "$profile" --quiet --bin extension-registry
  baseline=$(cargo build --profile "$profile" --quiet --bench baseline --message-format=json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="baseline" and m.get("executable"): print(m["executable"])')
fi
[ "$profile" = pgo ] || service=${CARGO_TARGET_DIR:-target}/$profile/extension-registry

root="$work/extensions"
bench_extensions "$root"

svc_port=$(free_port)
bench_config "$root" "$svc_port" > "$work/service.toml"
"${on_server[@]}" env ${PRELOAD:+LD_PRELOAD="$PRELOAD"} "$service" --config "$work/service.toml" \
  --log-level warn,extension_registry=info,extension_registry::telemetry=warn >"$work/service.log" 2>&1 &
svc=$!; pids+=("$svc")
wait_http "http://127.0.0.1:$svc_port/livez"

single=/api/v1/extensions/provider/ext042
list='/api/v1/extensions?limit=100'
gzip_header='Accept-Encoding: gzip, deflate, br'
capture() { # NAME URI [HEADER]: the service's answer, warmed, as NAME.headers and NAME.body
  curl -fsS ${3:+-H "$3"} -o /dev/null "http://127.0.0.1:$svc_port$2"
  curl -fsS ${3:+-H "$3"} -D "$work/$1.headers" -o "$work/$1.body" "http://127.0.0.1:$svc_port$2"
}
capture single "$single"
capture list "$list"
capture gzip "$list" "$gzip_header"
if [ "$profile" = pgo ]; then
  baseline=$(PROFILE=dist benches/pgo.sh baseline "$single=$work/single" "$list=$work/list" | tail -1)
fi

bare_port=$(free_port)
"${on_server[@]}" env TOKIO_WORKER_THREADS=1 "$baseline" "127.0.0.1:$bare_port" "$single=$work/single" "$list=$work/list" &
bare=$!; pids+=("$bare")
wait_http "http://127.0.0.1:$bare_port$single"

servers=(bare service)
if command -v nginx >/dev/null; then
  nginx_port=$(free_port)
  nginx_config "$work/nginx" "$nginx_port" \
    "open_file_cache max=16 inactive=60s; open_file_cache_valid 60s; default_type application/json;" \
    "location = $single { alias $work/single.body; } location = ${list%%\?*} { alias $work/list.body; }"
  "${on_server[@]}" bash -c "source benches/registry.sh; nginx_run $work/nginx" &
  ngx=$!; pids+=("$ngx")
  wait_http "http://127.0.0.1:$nginx_port$single"
  servers=(bare nginx service)
fi

port_of() { case $1 in bare) echo "$bare_port";; nginx) echo "$nginx_port";; service) echo "$svc_port";; esac; }
pid_of() { case $1 in bare) echo "$bare";; nginx) echo "$ngx";; service) echo "$svc";; esac; }
hz=$(getconf CLK_TCK)

echo "load before: $(uptime)"
results="$work/results"
for round in $(seq "$rounds"); do
  order=("${servers[@]}")
  if [ $((round % 2)) = 0 ]; then
    for ((i = ${#servers[@]} - 1, j = 0; i >= 0; i--, j++)); do order[j]=${servers[i]}; done
  fi
  for answer in single list gzip; do
    for server in "${order[@]}"; do
      uri=$single; [ "$answer" = single ] || uri=$list
      header=(); [ "$answer" = gzip ] && header=(-H "$gzip_header")
      pid=$(pid_of "$server"); before=$(cpu_ticks "$pid")
      out=$("${on_client[@]}" wrk -t1 -c"$connections" -d"$duration" --latency "${header[@]}" \
        "http://127.0.0.1:$(port_of "$server")$uri")
      after=$(cpu_ticks "$pid")
      requests=$(awk '/requests in/ {print $1}' <<<"$out")
      rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
      p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
      bad=$(awk '/Non-2xx/ {print $5}' <<<"$out")
      cpu=$(awk -v t=$((after - before)) -v hz="$hz" -v n="$requests" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
      printf '%s %s %s %s %s %s %s\n' "$answer" "$server" "${rps:-0}" "${p99:-NA}" "${cpu:-NA}" \
        "${bad:-0}" "$round" >> "$results"
      printf 'round %s  %-6s %-7s %7s req/s  p99 %-8s %6s µs CPU/req%s\n' \
        "$round" "$answer" "$server" "$rps" "$p99" "$cpu" "${bad:+  ($bad non-2xx!)}"
    done
  done
done
echo "load after: $(uptime)"
echo
echo "answer  bytes  server    req/s (each round)      p99 (each round)     CPU µs/req   x bare (means, median of rounds)"
for answer in single list gzip; do
  bytes=$(stat -c%s "$work/$answer.body")
  for server in "${servers[@]}"; do
    awk -v a="$answer" -v s="$server" -v bytes="$bytes" '
      $1 == a && $2 == "bare" {bare[$7] = $3; bare_sum += $3; bare_n++}
      $1 == a && $2 == s {rps[$7] = $3; r = r sep $3; p = p sep $4; c = c sep $5; sep = " "; sum += $3; n++}
      END {
        for (round in rps) if (bare[round] > 0) ratio[++k] = rps[round] / bare[round]
        for (i = 2; i <= k; i++) for (j = i; j > 1 && ratio[j - 1] > ratio[j]; j--) {
          t = ratio[j]; ratio[j] = ratio[j - 1]; ratio[j - 1] = t
        }
        median = k == 0 ? "-" : sprintf("%.2f", k % 2 ? ratio[(k + 1) / 2] : (ratio[k / 2] + ratio[k / 2 + 1]) / 2)
        printf "%-7s %6s %-8s %-23s %-20s %-12s %.2f  %s\n", a, bytes, s, r, p, c,
          sum / n / (bare_sum / bare_n), median
      }' "$results"
  done
done
