# Sourced by the benches that run servers on loopback: a free port, waiting for an answer, the
# CPU a process spent, nginx with one worker beside the service, and, for the real CNCF
# registry (Debian: docker-registry), its configuration and pushing an artifact with curl over
# the distribution API.

# A free loopback port.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 10 s for URL to answer 2xx; exits the script otherwise.
wait_http() { for _ in $(seq 200); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done; echo "no answer from $1" >&2; exit 1; }

# 120 local extensions, provider/ext000 to ext119, under ROOT, with realistic descriptive
# fields, so a list of 100 is ~50 KB; each has a 4 KiB artifact at 1.<i>.0 and at each VERSION.
#   bench_extensions ROOT [VERSION...]
bench_extensions() {
  local root=$1 i dir version
  shift
  for i in $(seq -w 0 119); do
    dir="$root/provider/ext$i"
    for version in "1.$((10#$i)).0" "$@"; do
      mkdir -p "$dir/$version"
      head -c 4096 /dev/zero > "$dir/$version/ext$i-$version.tar.gz"
    done
    cat > "$dir/extension.toml" <<TOML
description = "Extension number $i, provisioning things in a realistic way"
author = "provisioning-team"
repository = "https://git.example.com/extensions/ext${i}_prov"
tags = ["cloud", "bench"]
TOML
  done
}

# The service's configuration for the benches: one worker on 127.0.0.1:PORT over the local
# extensions under ROOT. The shipped burst (100), earned back at once: never a 429, and
# RateLimit-* values as small as a client's (RateLimit-Reset is 0 here, 1-2 s for a client at
# the shipped rate). One worker, too, because at this rate the quota's tolerance is 100 ns: with
# two, a request whose clock reading another worker's request overtook is refused.
#   bench_config ROOT PORT > service.toml
bench_config() {
  cat <<TOML
[server]
host = "127.0.0.1"
port = $2
workers = 1
[local]
path = "$1"
[rate_limit]
requests_per_second = 4000000000
TOML
}

# utime+stime (clock ticks, `getconf CLK_TCK` a second) of process PID and its children
# (nginx's worker); with `kernel`, stime alone (system calls and the kernel's work for them).
#   cpu_ticks PID [kernel]
cpu_ticks() {
  local total=0 p fields='$14 + $15'
  [ "${2:-}" = kernel ] && fields='$15'
  for p in $1 $(pgrep -P "$1" || true); do
    total=$((total + $(awk "{print $fields}" "/proc/$p/stat")))
  done
  echo "$total"
}

# Writes DIR/nginx.conf for one worker, quiet, everything kept under DIR, HTTP_LINES in its
# http block and SERVER_LINES in a server on 127.0.0.1:PORT; run it with nginx_run.
#   nginx_config DIR PORT HTTP_LINES SERVER_LINES
nginx_config() {
  mkdir -p "$1"
  cat > "$1/nginx.conf" <<CONF
$( [ "$(id -u)" = 0 ] && echo "user root;" )
worker_processes 1;
error_log $1/error.log warn;
pid $1/nginx.pid;
daemon off;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $1; proxy_temp_path $1; fastcgi_temp_path $1;
  uwsgi_temp_path $1; scgi_temp_path $1;
  $3
  server {
    listen 127.0.0.1:$2;
    $4
  }
}
CONF
}

# Runs nginx in the foreground on DIR/nginx.conf (start it with `&`; `exec` keeps its pid).
#   nginx_run DIR
nginx_run() { exec nginx -e "$1/error.log" -p "$1" -c "$1/nginx.conf"; }

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
       -T "$3" "$loc&digest=$(file_digest "$3")"
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
