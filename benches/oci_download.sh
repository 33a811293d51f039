#!/usr/bin/env bash
# Download throughput of a large OCI artifact straight from the registry, through nginx
# `proxy_pass` (1 worker, proxy_buffers 16 64k, no temp files; when nginx is installed) and
# through the service, in the same run; the CPU seconds per GiB the proxy and the service
# spend (utime+stime deltas from /proc/<pid>/stat), the CPU sha256 alone costs on this
# machine (the service verifies the bytes on the fly), what the service spends beyond that
# against nginx, and the service's peak RSS while it streams. Everything runs on loopback and
# stops by itself.
#   usage: benches/oci_download.sh [SIZE_MIB]      (default 256; needs docker-registry, curl)
# Builds nothing: run `cargo build --release` first. PRELOAD names a shared library to
# preload into the service alone (another malloc, say), as in benches/compare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/registry.sh
size_mib=${1:-256}
bin=${CARGO_TARGET_DIR:-target}/release/extension-registry
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

reg_port=$(free_port)
registry_config "$work" "$reg_port" > "$work/registry.yml"
docker-registry serve "$work/registry.yml" 2>"$work/registry.log" &
pids+=($!)
wait_http "http://127.0.0.1:$reg_port/v2/"

repo=bench/big-provider
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/big.tar.gz"
digest=$(file_digest "$work/big.tar.gz")
registry_push "http://127.0.0.1:$reg_port" "$repo" 1.0.0 "$work/big.tar.gz"

svc_port=$(free_port)
cat > "$work/service.toml" <<TOML
[server]
host = "127.0.0.1"
port = $svc_port
[oci]
registry = "127.0.0.1:$reg_port"
namespace = "bench"
TOML
env ${PRELOAD:+LD_PRELOAD="$PRELOAD"} "$bin" --config "$work/service.toml" --log-level warn &
svc=$!
pids+=("$svc")
wait_http "http://127.0.0.1:$svc_port/livez"
rss_before=$(awk '/VmRSS/{print $2}' "/proc/$svc/status")

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
# "MiB/s CPU-s/GiB" of one download of URL, CPU counted for process PID.
fetch() {
  local before after speed
  before=$(cpu_ticks "$2")
  speed=$(curl -fsS -o /dev/null -w '%{speed_download}' "$1")
  after=$(cpu_ticks "$2")
  awk -v s="$speed" -v t=$((after - before)) -v hz="$hz" -v mib="$size_mib" \
    'BEGIN {printf "%.0f MiB/s, %.3f CPU s/GiB", s / 1048576, t / hz * 1024 / mib}'
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

echo "artifact: ${size_mib} MiB; load: $(uptime)"
direct=$(curl -fsS -o /dev/null -w '%{speed_download}' "$blob" | awk '{printf "%.0f", $1/1048576}')
echo "straight from the registry: ${direct} MiB/s"
nginx=
if [ -n "$proxy" ]; then
  nginx=$(fetch "$proxy" "$ngx")
  echo "nginx proxy_pass: $nginx"
fi
service=$(fetch "http://127.0.0.1:$svc_port/api/v1/extensions/provider/big/1.0.0" "$svc")
echo "through the service (sha256 verified): $service"
echo "sha256 alone ($sha_how): $sha_cpu CPU s/GiB, $sha_speed MiB/s"
if [ -n "$nginx" ]; then
  awk -v s="${service#*, }" -v h="$sha_cpu" -v n="${nginx#*, }" 'BEGIN {
    split(s, a, " "); split(n, b, " ")
    printf "the service beyond sha256: %.3f CPU s/GiB, %.2fx nginx\n", a[1] - h, (a[1] - h) / b[1] }'
fi
peak=$(awk '/VmHWM/{print $2}' "/proc/$svc/status")
echo "service RSS: $((rss_before / 1024)) MiB before, peak $((peak / 1024)) MiB"
