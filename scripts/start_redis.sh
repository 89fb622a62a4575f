#!/usr/bin/env bash
# Starts (or reuses) a Redis server on loopback for the Redis-backed Feast test and the serving
# benchmark, and prints its connection string host:port on stdout (everything else goes to stderr):
#
#   export LLMFEAT_TEST_REDIS=$(bash scripts/start_redis.sh)
#   .venv/bin/python -m pytest tests/test_redis_store.py
#   LLMFEAT_REDIS=$LLMFEAT_TEST_REDIS python bench/bench_serving.py      # or --redis host:port
#
# Idempotent: a server this script started earlier (pid and port recorded in $LLMFEAT_REDIS_DIR)
# that still answers PING is reused, as is any server answering on $LLMFEAT_REDIS_PORT when that is
# set. Otherwise redis-server is started on 127.0.0.1 only, on $LLMFEAT_REDIS_PORT or a free port,
# with no persistence (no RDB snapshots, no AOF; its working dir is $LLMFEAT_REDIS_DIR). Without
# redis-server, it is installed with apt-get when running as root (CI); elsewhere the script stops
# and says what to install.
#
# Stop it with:  redis-cli -p "$(cat "$LLMFEAT_REDIS_DIR/port")" shutdown nosave
#
# Settings (environment): LLMFEAT_REDIS_PORT (default: a free port), LLMFEAT_REDIS_DIR
# (${TMPDIR:-/tmp}/llmfeat-redis).
set -euo pipefail

HOST=127.0.0.1
RDIR=${LLMFEAT_REDIS_DIR:-${TMPDIR:-/tmp}/llmfeat-redis}
PORT=${LLMFEAT_REDIS_PORT:-}

log() { echo "[start_redis] $*" >&2; }
die() { echo "[start_redis] error: $*" >&2; exit 1; }

[[ -z $PORT || $PORT =~ ^[0-9]+$ ]] || die "LLMFEAT_REDIS_PORT '$PORT' must be a port number"

# PING over a plain TCP connection (no redis-cli needed): true when a Redis answers +PONG.
answers_ping() {
  local port=$1 reply=""
  (
    exec 3<>"/dev/tcp/$HOST/$port" || exit 1
    printf 'PING\r\n' >&3
    IFS= read -r -t 2 reply <&3 || exit 1
    [[ $reply == "+PONG"* ]]
  ) 2>/dev/null
}

# A server this script started before: its pid file and port file in $RDIR.
if [[ -f $RDIR/port && -f $RDIR/redis.pid ]]; then
  old_port=$(cat "$RDIR/port")
  old_pid=$(cat "$RDIR/redis.pid")
  if [[ -z $PORT || $PORT == "$old_port" ]] && kill -0 "$old_pid" 2>/dev/null && answers_ping "$old_port"; then
    log "reusing the server on $HOST:$old_port (pid $old_pid)"
    echo "$HOST:$old_port"
    exit 0
  fi
fi
if [[ -n $PORT ]] && answers_ping "$PORT"; then
  log "reusing the server answering on $HOST:$PORT"
  echo "$HOST:$PORT"
  exit 0
fi

if ! command -v redis-server >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    log "installing redis-server with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends redis-server >&2
  fi
  command -v redis-server >/dev/null 2>&1 || die "redis-server not found; install Redis (Debian/Ubuntu: \
apt-get install redis-server; macOS: brew install redis) or set LLMFEAT_TEST_REDIS to an existing server (host:port)"
fi

if [[ -z $PORT ]]; then
  # a free port from the kernel (bind to port 0); a race with another process is caught below
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

mkdir -p "$RDIR"
rm -f "$RDIR/redis.pid" "$RDIR/port"
log "starting redis-server on $HOST:$PORT (dir $RDIR, log $RDIR/redis.log, no persistence)"
redis-server --bind "$HOST" --port "$PORT" --protected-mode yes --daemonize yes \
  --dir "$RDIR" --pidfile "$RDIR/redis.pid" --logfile "$RDIR/redis.log" \
  --save "" --appendonly no --databases 16 >&2 \
  || { tail -n 20 "$RDIR/redis.log" >&2 || true; die "redis-server failed to start"; }
for _ in $(seq 1 100); do
  answers_ping "$PORT" && break
  sleep 0.1
done
answers_ping "$PORT" || { tail -n 20 "$RDIR/redis.log" >&2 || true; die "redis-server does not answer on $HOST:$PORT"; }
echo "$PORT" > "$RDIR/port"
log "ready: $HOST:$PORT (pid $(cat "$RDIR/redis.pid" 2>/dev/null || echo '?'))"
echo "$HOST:$PORT"
