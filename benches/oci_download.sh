#!/usr/bin/env bash
# Download throughput of a large OCI artifact straight from the registry and through the
# service, and the service's peak RSS while it streams. Everything runs on loopback and stops
# by itself.
#   usage: benches/oci_download.sh [SIZE_MIB]      (default 256; needs docker-registry, curl)
# Builds nothing: run `cargo build --release` first.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-256}
bin=${CARGO_TARGET_DIR:-target}/release/extension-registry
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done; echo "no answer from $1" >&2; exit 1; }

reg_port=$(free_port)
cat > "$work/registry.yml" <<YAML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/data}}
http: {addr: 127.0.0.1:$reg_port, secret: bench}
YAML
docker-registry serve "$work/registry.yml" 2>"$work/registry.log" &
pids+=($!)
wait_http "http://127.0.0.1:$reg_port/v2/"

repo=bench/big-provider
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/big.tar.gz"
digest="sha256:$(sha256sum "$work/big.tar.gz" | cut -d' ' -f1)"
upload() {
  local loc
  loc=$(curl -fsS -o /dev/null -D - -X POST "http://127.0.0.1:$reg_port/v2/$repo/blobs/uploads/" \
        | tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
  case "$loc" in http*) ;; *) loc="http://127.0.0.1:$reg_port$loc";; esac
  curl -fsS -o /dev/null -X PUT -H "Content-Type: application/octet-stream" \
       --data-binary @"$1" "$loc&digest=$2"
}
upload "$work/big.tar.gz" "$digest"
printf '{}' > "$work/config.json"
config_digest="sha256:$(sha256sum "$work/config.json" | cut -d' ' -f1)"
upload "$work/config.json" "$config_digest"
cat > "$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
 "config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"$config_digest","size":2},
 "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"$digest","size":$(stat -c%s "$work/big.tar.gz")}]}
JSON
curl -fsS -o /dev/null -X PUT -H "Content-Type: application/vnd.oci.image.manifest.v1+json" \
     --data-binary @"$work/manifest.json" "http://127.0.0.1:$reg_port/v2/$repo/manifests/1.0.0"

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
