#!/usr/bin/env bash
# Download throughput of a large OCI artifact straight from the registry and through the
# service, and the service's peak RSS while it streams. Everything runs on loopback and stops
# by itself.
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

speed() { curl -fsS -o /dev/null -w '%{speed_download}' "$1" | awk '{printf "%.0f", $1/1048576}'; }
direct=$(speed "http://127.0.0.1:$reg_port/v2/$repo/blobs/$digest")
through=$(speed "http://127.0.0.1:$svc_port/api/v1/extensions/provider/big/1.0.0")
peak=$(awk '/VmHWM/{print $2}' "/proc/$svc/status")
echo "artifact: ${size_mib} MiB"
echo "straight from the registry: ${direct} MiB/s"
echo "through the service (sha256 verified): ${through} MiB/s"
echo "service RSS: $((rss_before / 1024)) MiB before, peak $((peak / 1024)) MiB"
