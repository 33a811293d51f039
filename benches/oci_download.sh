#!/usr/bin/env bash
# Download throughput of a large OCI artifact straight from the registry, through nginx
# `proxy_pass` (1 worker, proxy_buffers 16 64k, no temp files; when nginx is installed) and
# through the service, in the same run; the CPU seconds per GiB the proxy and the service
# spend (utime+stime deltas from /proc/<pid>/stat), the CPU sha256 alone costs on this
# machine (`sha256sum` of the same bytes, which the service verifies on the fly), and the
# service's peak RSS while it streams. Everything runs on loopback and stops by itself.
#   usage: benches/oci_download.sh [SIZE_MIB]      (default 256; needs docker-registry, curl)
# Builds nothing: run `cargo build --release` first.
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
"$bin" --config "$work/service.toml" --log-level warn &
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
# sha256 alone over the same bytes: OpenSSL's (SHA-NI where the CPU has it, as the sha2 crate
# the service uses), else coreutils' sha256sum, which has no SHA-NI and so overstates it.
hasher=(sha256sum); command -v openssl >/dev/null && hasher=(openssl dgst -sha256)
sha_times=$( { TIMEFORMAT='%R %U %S'; time "${hasher[@]}" "$work/big.tar.gz" >/dev/null; } 2>&1 )
read -r sha_wall sha_user sha_sys <<<"$sha_times"
sha_cpu=$(awk -v u="$sha_user" -v s="$sha_sys" 'BEGIN {print u + s}')

echo "artifact: ${size_mib} MiB; load: $(uptime)"
direct=$(curl -fsS -o /dev/null -w '%{speed_download}' "$blob" | awk '{printf "%.0f", $1/1048576}')
echo "straight from the registry: ${direct} MiB/s"
[ -n "$proxy" ] && echo "nginx proxy_pass: $(fetch "$proxy" "$ngx")"
echo "through the service (sha256 verified): $(fetch "http://127.0.0.1:$svc_port/api/v1/extensions/provider/big/1.0.0" "$svc")"
awk -v c="$sha_cpu" -v mib="$size_mib" -v w="$sha_wall" \
  -v h="${hasher[*]}" 'BEGIN {printf "sha256 alone (%s, same bytes): %.3f CPU s/GiB, %.0f MiB/s\n", h, c * 1024 / mib, mib / w}'
peak=$(awk '/VmHWM/{print $2}' "/proc/$svc/status")
echo "service RSS: $((rss_before / 1024)) MiB before, peak $((peak / 1024)) MiB"
