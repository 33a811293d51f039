# Sourced by the benches that run the real CNCF registry (Debian: docker-registry) on loopback:
# a free port, waiting for an answer, the registry's configuration, and pushing an artifact with
# curl over the distribution API.

# A free loopback port.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 10 s for URL to answer 2xx; exits the script otherwise.
wait_http() { for _ in $(seq 200); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done; echo "no answer from $1" >&2; exit 1; }

# sha256:<hex> of a file.
file_digest() { echo "sha256:$(sha256sum "$1" | cut -d' ' -f1)"; }

# The configuration of a quiet, anonymous registry storing under DIR, on 127.0.0.1:PORT.
#   registry_config DIR PORT > registry.yml
registry_config() {
  cat <<YAML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $1/data}}
http: {addr: 127.0.0.1:$2, secret: bench}
YAML
}

# Uploads FILE as a blob of REPO.
#   registry_upload http://127.0.0.1:PORT REPO FILE
registry_upload() {
  local loc
  loc=$(curl -fsS -o /dev/null -D - -X POST "$1/v2/$2/blobs/uploads/" \
        | tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
  case "$loc" in http*) ;; *) loc="$1$loc";; esac
  curl -fsS -o /dev/null -X PUT -H "Content-Type: application/octet-stream" \
       --data-binary @"$3" "$loc&digest=$(file_digest "$3")"
}

# Pushes FILE as the one gzip layer of an OCI artifact REPO:TAG, with an empty config.
#   registry_push http://127.0.0.1:PORT REPO TAG FILE
registry_push() {
  local dir config layer
  dir=$(mktemp -d)
  config="$dir/config.json"
  printf '{}' > "$config"
  registry_upload "$1" "$2" "$4"
  registry_upload "$1" "$2" "$config"
  layer=$(file_digest "$4")
  cat > "$dir/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
 "config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"$(file_digest "$config")","size":2},
 "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"$layer","size":$(stat -c%s "$4")}]}
JSON
  curl -fsS -o /dev/null -X PUT -H "Content-Type: application/vnd.oci.image.manifest.v1+json" \
       --data-binary @"$dir/manifest.json" "$1/v2/$2/manifests/$3"
  rm -rf "$dir"
}
