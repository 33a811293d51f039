#!/usr/bin/env bash
# Profile-guided builds: a build instrumented to count (`-Cprofile-generate`), run on loopback
# through the requests it is to be fast at, then the build optimised with those counts
# (`-Cprofile-use`, merged by the `llvm-profdata` of rustc's own LLVM).
#
#   benches/pgo.sh            the service, as the Docker image ships it (its default text log
#                             at `info`), trained on what clients ask most: one extension
#                             (plain, revalidated, from a browser), lists and their gzip and br
#                             forms, versions, resolve, search, small downloads, 404s, health,
#                             metrics. Every kind must be answered as expected, and the optimised
#                             binary must answer three of them as the instrumented one did.
#   benches/pgo.sh baseline URI=CAPTURE...
#                             the bare-hyper baseline of benches/compare.sh, trained on those
#                             answers, so that both sides of its ratios are built alike.
#
# Prints the optimised binary's path last. Knobs: PROFILE (dist), TRAIN (2s per kind of
# request), CARGO_TARGET_DIR (target; the builds go under its pgo/, as the RUSTFLAGS they take
# would otherwise rebuild the plain builds, and replace any RUSTFLAGS of the caller's). Each run
# builds both from scratch, as the counts are new every time, and drops the builds of the one
# before. Needs wrk, curl and the llvm-profdata of rustc's LLVM major (Debian: llvm-22 for
# Rust 1.95); the baseline python3 too (a free port).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
source benches/registry.sh
profile=${PROFILE:-dist}
train=${TRAIN:-2s}
what=${1:-service}
target=${CARGO_TARGET_DIR:-target}/pgo/$what
work=$(mktemp -d)
pid=
# A clean stop, after which an instrumented process has written its counts: SIGTERM for the
# service (which, unlike SIGINT, is not ignored by a background job before the service takes
# it over), SIGINT for the baseline. Fails when the process did not exit 0.
stop() { # SIGNAL
  local status=0
  kill -"$1" "$pid" && wait "$pid" || {
    status=$?
    echo "the $what exited $status on SIG$1" >&2
    cat "$work/log" >&2 2>/dev/null || true
  }
  pid=
  return "$status"
}
trap '[ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null; rm -rf "$work"' EXIT

for tool in wrk curl; do
  command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install -y $tool" >&2; exit 1; }
done
llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
profdata=
for candidate in "llvm-profdata-$llvm" "/usr/lib/llvm-$llvm/bin/llvm-profdata" llvm-profdata; do
  command -v "$candidate" >/dev/null || continue
  if [[ "$("$candidate" --version)" == *"LLVM version $llvm."* ]]; then
    profdata=$candidate
    break
  fi
done
[ -n "$profdata" ] || { echo "no llvm-profdata of LLVM $llvm, rustc's: apt-get install -y llvm-$llvm" >&2; exit 1; }

# Builds WHAT into DIR with FLAGS and prints the binary's path.
#   build DIR FLAGS
build() {
  local bin
  case $what in
    service)
      RUSTFLAGS=$2 cargo build --profile "$profile" --locked --quiet --bin extension-registry \
        --target-dir "$1"
      bin="$1/$profile/extension-registry" ;;
    baseline)
      bin=$(RUSTFLAGS=$2 cargo build --profile "$profile" --locked --quiet --bench baseline \
        --target-dir "$1" --message-format=json-render-diagnostics \
        | sed -n 's/.*"executable":"\([^"]*\/baseline-[^"]*\)".*/\1/p') ;;
  esac
  [ -x "$bin" ] || { echo "no $what binary built in $1" >&2; exit 1; }
  echo "$bin"
}

# Starts the service binary BIN on the extensions below, sets `address`. Its log, one line a
# request, is read for the address and otherwise kept to its first 100 lines.
serve() {
  : >"$work/log"
  "$1" --config "$work/service.toml" > >(sed -u -n '1,100p' >"$work/log") 2>&1 &
  pid=$!
  address=
  for _ in $(seq 200); do
    address=$(sed -n 's/.* listening address=\([^ ]*\).*/\1/p' "$work/log")
    [ -n "$address" ] && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  echo "$1 did not start:" >&2
  cat "$work/log" >&2
  exit 1
}

# Runs wrk with ARGS and fails when a request went unanswered or, unless the first argument is
# `--any-status`, was answered 4xx or 5xx.
run() {
  local out any=
  [ "$1" != --any-status ] || { any=1; shift; }
  out=$(wrk -t1 -c16 -d"$train" "$@")
  if [[ $out == *"Socket errors"* ]] || { [ -z "$any" ] && [[ $out == *"Non-2xx"* ]]; }; then
    echo "training run failed: wrk $*" >&2
    echo "$out" >&2
    exit 1
  fi
}
# What the service answers at the URIs the optimised build is checked on, into FILE.
answers() {
  local uri
  for uri in /extensions/provider/ext042 '/extensions?limit=100' /extensions/provider/ext042/versions; do
    curl -fsS "http://$address/api/v1$uri"
    echo
  done >"$1"
}

train_service() { # BIN
  # The extensions of benches/compare.sh, with three or four versions each.
  local root="$work/extensions"
  bench_extensions "$root" 1.0.0 1.1.0 2.0.0-rc.1
  # The allowed path is trained, not the 429.
  bench_config "$root" 0 >"$work/service.toml"
  serve "$1"
  local base="http://$address/api/v1" etag
  answers "$work/expected"
  etag=$(curl -fsS -D - -o /dev/null "$base/extensions/provider/ext042" \
    | tr -d '\r' | awk 'tolower($1) == "etag:" {print $2}')
  [ -n "$etag" ] || { echo "no ETag on $base/extensions/provider/ext042" >&2; exit 1; }
  run "$base/extensions/provider/ext042"
  run -H "If-None-Match: $etag" "$base/extensions/provider/ext042"
  run -H 'Origin: https://example.com' "$base/extensions/provider/ext007"
  run "$base/extensions?limit=100"
  run -H 'Accept-Encoding: gzip' "$base/extensions?limit=100"
  run -H 'Accept-Encoding: gzip, deflate, br' "$base/extensions?type=provider&limit=20&offset=40"
  run "$base/extensions/provider/ext042/versions"
  run "$base/resolve/provider/ext042?constraint=%5E1.0"
  run "$base/extensions/search?q=ext01"
  run "$base/extensions/provider/ext042/1.1.0"
  run --any-status "$base/extensions/provider/nope"
  run "http://$address/livez"
  run "$base/health"
  run "$base/metrics"
  stop TERM
}

train_baseline() { # BIN URI=CAPTURE...
  local bin=$1 port route
  shift
  port=$(free_port)
  TOKIO_WORKER_THREADS=1 "$bin" "127.0.0.1:$port" "$@" >&2 &
  pid=$!
  wait_http "http://127.0.0.1:$port${1%=*}"
  for route in "$@"; do
    run "http://127.0.0.1:$port${route%=*}"
  done
  stop INT
}

case $what in
  service) ;;
  baseline) [ $# -ge 2 ] || { echo "usage: benches/pgo.sh baseline URI=CAPTURE..." >&2; exit 1; } ;;
  *) echo "benches/pgo.sh builds the service or the baseline, not $what" >&2; exit 1 ;;
esac
# The flags name this run's own directory, so nothing of an earlier run's builds is reused.
rm -rf "$target"
instrumented=$(build "$target/generate" "-Cprofile-generate=$work/profiles")
# Build scripts and proc macros ran instrumented too: only the trained run's counts are kept.
rm -rf "$work/profiles"
if [ "$what" = service ]; then train_service "$instrumented"; else train_baseline "$instrumented" "${@:2}"; fi
compgen -G "$work/profiles/*.profraw" >/dev/null \
  || { echo "the instrumented $what wrote no counts" >&2; cat "$work/log" 2>/dev/null >&2; exit 1; }
"$profdata" merge -o "$work/merged.profdata" "$work/profiles"
optimised=$(build "$target/use" "-Cprofile-use=$work/merged.profdata")
if [ "$what" = service ]; then
  serve "$optimised"
  answers "$work/optimised"
  stop TERM
  cmp -s "$work/expected" "$work/optimised" \
    || { echo "the optimised build answers otherwise than the instrumented one" >&2; exit 1; }
fi
echo "$optimised"
