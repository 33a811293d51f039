#!/usr/bin/env bash
# Download throughput of a large OCI artifact straight from the registry, through nginx
# `proxy_pass` (1 worker, proxy_buffers 16 64k, no temp files; when nginx is installed) and
# through the service, as it ships and with one worker as nginx, interleaved round by round;
# the CPU seconds per GiB the proxy and the service spend (utime+stime deltas from
# /proc/<pid>/stat) and the kernel's part of it (stime), the CPU sha256 alone costs on this
# machine (the service verifies the bytes on the fly), what the service spends beyond that,
# and apart from that what its hashing thread and the threads moving the bytes spend, each
# against the same round's nginx; how long the hashing thread waited for a CPU; and the
# service's peak RSS while it streams. A failed download stops the script.
# Everything runs on loopback and stops by itself.
#   usage: benches/oci_download.sh [SIZE_MIB [ROUNDS]]
#          (default 256 MiB, 3 rounds; needs docker-registry, curl)
# Builds nothing: run `cargo build --release` first. PRELOAD names a shared library to
# preload into the service alone (another malloc, say), as in benches/compare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/registry.sh
size_mib=${1:-256}
rounds=${2:-3}
bin=${CARGO_TARGET_DIR:-target}/release/extension-registry
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

reg_port=$(free_port)
registry_config "$work" "$reg_port" > "$work/registry.yml"
docker-registry serve "$work/registry.yml" 2>"$work/registry.log" &
reg_pid=$!
pids+=("$reg_pid")
wait_http "http://127.0.0.1:$reg_port/v2/"

repo=bench/big-provider
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/big.tar.gz"
digest=$(file_digest "$work/big.tar.gz")
registry_push "http://127.0.0.1:$reg_port" "$repo" 1.0.0 "$work/big.tar.gz"

# The service twice: as it ships (a worker a core) and with one worker, as nginx has.
start_service() {
  local port
  port=$(free_port)
  cat > "$work/service-$1.toml" <<TOML
[server]
host = "127.0.0.1"
port = $port
workers = $1
[oci]
registry = "127.0.0.1:$reg_port"
namespace = "bench"
TOML
  env ${PRELOAD:+LD_PRELOAD="$PRELOAD"} "$bin" --config "$work/service-$1.toml" --log-level warn &
  svc_pid[$1]=$!
  pids+=($!)
  wait_http "http://127.0.0.1:$port/livez"
  # The threads it started with: its workers and the main thread, which accepts connections.
  # The threads that come later are the blocking pool's, where a download past its first MiB
  # is hashed.
  ls "/proc/${svc_pid[$1]}/task" > "$work/movers-$1"
  svc_url[$1]="http://127.0.0.1:$port/api/v1/extensions/provider/big/1.0.0"
}
declare -A svc_pid svc_url
start_service 0
start_service 1
rss_before=$(awk '/VmRSS/{print $2}' "/proc/${svc_pid[0]}/status")

blob="http://127.0.0.1:$reg_port/v2/$repo/blobs/$digest"
proxy=
if command -v nginx >/dev/null; then
  ngx_port=$(free_port)
  nginx_config "$work/nginx" "$ngx_port" "" \
    "location / { proxy_pass http://127.0.0.1:$reg_port; proxy_http_version 1.1; proxy_buffers 16 64k; proxy_max_temp_file_size 0; }"
  bash -c "source benches/registry.sh; nginx_run $work/nginx" &
  ngx=$!
  pids+=("$ngx")
  wait_http "http://127.0.0.1:$ngx_port/v2/"
  proxy="http://127.0.0.1:$ngx_port/v2/$repo/blobs/$digest"
fi

hz=$(getconf CLK_TCK)
cores=$(nproc)
# utime+stime ticks of the threads of process PID listed in FILE.
#   listed_ticks PID FILE
listed_ticks() {
  local total=0 tid
  while read -r tid; do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$1/task/$tid/stat" 2>/dev/null || echo 0)))
  done < "$2"
  echo "$total"
}
# "tid nanoseconds" for each thread of process PID not listed in FILE (the threads started
# later: the hashing thread), the time it has waited on a run queue, runnable but not running
# (`/proc/<pid>/task/<tid>/schedstat`, its second field; 0 where the kernel keeps no count).
#   unlisted_waits PID FILE
unlisted_waits() {
  local task
  for task in "/proc/$1/task/"*; do
    grep -qx "${task##*/}" "$2" && continue
    echo "${task##*/} $(awk '{print $2}' "$task/schedstat" 2>/dev/null || echo 0)"
  done
}
# Nanoseconds waited between two lists of unlisted_waits, thread by thread: a thread started
# in between counts from 0, one gone by the second list (idle blocking threads end after 10 s)
# is left out.
#   waited_between BEFORE AFTER
waited_between() {
  awk 'NR == FNR { before[$1] = $2; next } { total += $2 - before[$1] } END { print total + 0 }' \
    <(echo "$1") <(echo "$2")
}
# "MiB/s CPU-s/GiB kernel-s/GiB others-s/GiB" of one download of URL, CPU counted for process
# PID (and its children), all of it and the kernel's part, then what the registry and the
# client (curl) spent beside it; with FILE, two more figures: the CPU of the threads listed in
# it, and the time the others waited for a CPU.
#   fetch URL PID [FILE]
fetch() {
  local before after kernel listed=0 waits="" waited=0 speed registry client
  before=$(cpu_ticks "$2")
  kernel=$(cpu_ticks "$2" kernel)
  registry=$(cpu_ticks "$reg_pid")
  [ -n "${3:-}" ] && listed=$(listed_ticks "$2" "$3") && waits=$(unlisted_waits "$2" "$3")
  speed=$( { TIMEFORMAT='%U %S'; time curl -fsS -o /dev/null -w '%{speed_download}' "$1"; } \
    2>"$work/client-time") || { cat "$work/client-time" >&2; return 1; }
  after=$(cpu_ticks "$2")
  kernel=$(($(cpu_ticks "$2" kernel) - kernel))
  registry=$(($(cpu_ticks "$reg_pid") - registry))
  read -r client < <(awk '{print $1 + $2}' "$work/client-time")
  [ -n "${3:-}" ] && listed=$(($(listed_ticks "$2" "$3") - listed)) \
    && waited=$(waited_between "$waits" "$(unlisted_waits "$2" "$3")")
  awk -v s="$speed" -v t=$((after - before)) -v k="$kernel" -v l="$listed" -v w="$waited" \
    -v r="$registry" -v c="$client" -v hz="$hz" -v mib="$size_mib" -v with="${3:-}" 'BEGIN {
      printf "%.0f %.3f %.3f %.3f", s / 1048576, t / hz * 1024 / mib, k / hz * 1024 / mib,
        (r / hz + c) * 1024 / mib
      if (with != "") printf " %.3f %.3f", l / hz * 1024 / mib, w / 1e9 * 1024 / mib }'
}
# sha256 alone: in memory, as the service hashes what it has received. OpenSSL's SHA-NI digest
# (`openssl speed`, 64 KiB blocks; the sha2 crate the service uses runs at the same speed
# here), else coreutils' sha256sum over the file, which has no SHA-NI and reads the file too,
# and so overstates it. "CPU-s/GiB MiB/s"
if command -v openssl >/dev/null; then
  sha_alone=$(openssl speed -seconds 2 -evp sha256 -bytes 65536 2>/dev/null \
    | awk '$1 == "sha256" {k = $2; sub(/k$/, "", k); b = k * 1000
             printf "%.3f %.0f", 1073741824 / b, b / 1048576}')
  sha_how="openssl speed -evp sha256, in memory"
else
  sha_times=$( { TIMEFORMAT='%R %U %S'; time sha256sum "$work/big.tar.gz" >/dev/null; } 2>&1 )
  read -r sha_wall sha_user sha_sys <<<"$sha_times"
  sha_alone=$(awk -v w="$sha_wall" -v u="$sha_user" -v s="$sha_sys" -v mib="$size_mib" \
    'BEGIN {printf "%.3f %.0f", (u + s) * 1024 / mib, mib / w}')
  sha_how="sha256sum of the file"
fi
read -r sha_cpu sha_speed <<<"$sha_alone"

echo "artifact: ${size_mib} MiB, $rounds rounds; load: $(uptime)"
direct=$(curl -fsS -o /dev/null -w '%{speed_download}' "$blob" | awk '{printf "%.0f", $1/1048576}')
echo "straight from the registry: ${direct} MiB/s"
echo "sha256 alone ($sha_how): $sha_cpu CPU s/GiB, $sha_speed MiB/s"
# One row per download, interleaved round by round, with the part of the CPU spent in the
# kernel (its copies into and out of the sockets, loopback TCP), what the registry and the
# client spent beside it ("others"), and the ceiling all of that leaves: the MiB/s this
# machine's cores could carry if every one of them were busy with the download and nothing
# else, and nothing waited on anything. For the service, what it
# spends beyond sha256 alone (the line above), and apart from that the CPU of its hashing
# thread and of the threads that moved the bytes, each "moving" figure also against the same
# round's nginx. "waited": the time the hashing thread was ready to run and waited for a CPU.
# The digest is the slowest step of a large download, so a download takes about its hashing
# plus that wait.
printf '%-5s %-28s %6s %9s %6s %6s %7s %13s %7s %8s %7s %7s %7s\n' round path MiB/s \
  "CPU s/GiB" kernel others ceiling "beyond sha256" "x nginx" hashing waited moving "x nginx"
row() {
  local speed cpu kernel others movers waited
  read -r speed cpu kernel others movers waited <<<"$3"
  awk -v r="$1" -v p="$2" -v s="$speed" -v c="$cpu" -v k="$kernel" -v o="$others" \
    -v n="$cores" 'BEGIN {
      printf "%-5s %-28s %6s %9s %6s %6.3f %7.0f", r, p, s, c, k, o, n * 1024 / (c + o) }'
  if [ -n "$movers" ]; then
    awk -v c="$cpu" -v m="$movers" -v w="$waited" -v h="$sha_cpu" -v n="$4" 'BEGIN {
      x = n == "" || n == 0 ? "-" : sprintf("%.2f", (c - h) / n)
      y = n == "" || n == 0 ? "-" : sprintf("%.2f", m / n)
      printf " %13.3f %7s %8.3f %7.3f %7.3f %7s", c - h, x, c - m, w, m, y }'
  fi
  echo
}
for round in $(seq "$rounds"); do
  nginx=
  if [ -n "$proxy" ]; then
    nginx=$(fetch "$proxy" "$ngx")
    row "$round" "nginx proxy_pass" "$nginx"
    read -r _ nginx _ <<<"$nginx"
  fi
  shipped=$(fetch "${svc_url[0]}" "${svc_pid[0]}" "$work/movers-0")
  row "$round" "service (sha256 verified)" "$shipped" "$nginx"
  one=$(fetch "${svc_url[1]}" "${svc_pid[1]}" "$work/movers-1")
  row "$round" "service, one worker" "$one" "$nginx"
done
for w in 0 1; do
  peak[$w]=$(awk '/VmHWM/{print $2}' "/proc/${svc_pid[$w]}/status")
done
echo "service RSS: $((rss_before / 1024)) MiB before, peak $((peak[0] / 1024)) MiB" \
  "(one worker: $((peak[1] / 1024)) MiB)"
