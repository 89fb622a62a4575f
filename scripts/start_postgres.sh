#!/usr/bin/env bash
# Starts (or reuses) a PostgreSQL server on loopback for the PostgreSQL-backed Feast test, and
# prints its SQLAlchemy URL on stdout (everything else goes to stderr):
#
#   export LLMFEAT_TEST_POSTGRES_URL=$(bash scripts/start_postgres.sh)
#   .venv/bin/python -m pytest tests/test_postgres_store.py
#
# Idempotent: if a server already answers on the port and the role can log in, it is reused;
# if it answers but the role or database is missing, they are created through the superuser's
# unix socket. Otherwise a private cluster is created in $LLMFEAT_PG_DIR (initdb) and started
# with pg_ctl, listening on 127.0.0.1 only. Without server binaries, PostgreSQL is installed with
# apt-get when running as root (CI); elsewhere the script stops and says what to install.
#
# Stop the private cluster with:  pg_ctl -D "$LLMFEAT_PG_DIR/data" stop   (as its owner)
#
# Settings (environment): LLMFEAT_PG_PORT (5432), LLMFEAT_PG_USER / LLMFEAT_PG_PASSWORD /
# LLMFEAT_PG_DATABASE (llmfeat), LLMFEAT_PG_DIR (${TMPDIR:-/tmp}/llmfeat-postgres).
set -euo pipefail

HOST=127.0.0.1
PORT=${LLMFEAT_PG_PORT:-5432}
ROLE=${LLMFEAT_PG_USER:-llmfeat}
PASSWORD=${LLMFEAT_PG_PASSWORD:-llmfeat}
DATABASE=${LLMFEAT_PG_DATABASE:-llmfeat}
PGDIR=${LLMFEAT_PG_DIR:-${TMPDIR:-/tmp}/llmfeat-postgres}
URL="postgresql+psycopg://$ROLE:$PASSWORD@$HOST:$PORT/$DATABASE"

log() { echo "[start_postgres] $*" >&2; }
die() { echo "[start_postgres] error: $*" >&2; exit 1; }

for name in ROLE DATABASE; do
  [[ ${!name} =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "$name '${!name}' must be a plain SQL identifier"
done
[[ $PASSWORD != *"'"* && $PASSWORD != *@* && $PASSWORD != *:* && $PASSWORD != */* ]] \
  || die "LLMFEAT_PG_PASSWORD must not contain quotes, '@', ':' or '/' (it goes into a URL as is)"

# Server binaries: Debian's versioned directories first, then whatever is on PATH.
find_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -rn); do
    [[ -x $d/postgres && -x $d/initdb && -x $d/pg_ctl ]] && { echo "$d"; return 0; }
  done
  if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"
    return 0
  fi
  return 1
}

BINDIR=$(find_bindir || true)
if [[ -z $BINDIR ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    log "installing PostgreSQL with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    BINDIR=$(find_bindir || true)
  fi
  [[ -n $BINDIR ]] || die "no PostgreSQL server binaries (initdb, pg_ctl) found; install PostgreSQL \
(Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql) or set LLMFEAT_TEST_POSTGRES_URL \
to an existing server"
fi
PSQL=$BINDIR/psql
command -v "$PSQL" >/dev/null 2>&1 || PSQL=psql
PG_ISREADY=$BINDIR/pg_isready
[[ -x $PG_ISREADY ]] || PG_ISREADY=pg_isready

# Run a server-side command as the cluster owner: postgres refuses to run as root.
if [[ $(id -u) == 0 ]]; then
  OWNER=postgres
  id "$OWNER" >/dev/null 2>&1 || useradd --system --home-dir "$PGDIR" --shell /usr/sbin/nologin "$OWNER"
  as_owner() { runuser -u "$OWNER" -- "$@"; }
else
  OWNER=$(id -un)
  as_owner() { "$@"; }
fi

role_can_login() {
  PGPASSWORD=$PASSWORD PGCONNECT_TIMEOUT=5 "$PSQL" -h "$HOST" -p "$PORT" -U "$ROLE" -d "$DATABASE" \
    -qtAc 'select 1' >/dev/null 2>&1
}

# Create the role and the database through a superuser unix-socket connection in $1.
ensure_role_and_db() {
  local sock=$1 super=$2
  local psql=("$PSQL" -h "$sock" -p "$PORT" -U "$super" -d postgres -v ON_ERROR_STOP=1 -qtA)
  if [[ -z $(as_owner "${psql[@]}" -c "select 1 from pg_roles where rolname = '$ROLE'") ]]; then
    as_owner "${psql[@]}" -c "create role \"$ROLE\" login password '$PASSWORD'" >&2
  else
    as_owner "${psql[@]}" -c "alter role \"$ROLE\" login password '$PASSWORD'" >&2
  fi
  if [[ -z $(as_owner "${psql[@]}" -c "select 1 from pg_database where datname = '$DATABASE'") ]]; then
    as_owner "${psql[@]}" -c "create database \"$DATABASE\" owner \"$ROLE\"" >&2
  fi
}

if "$PG_ISREADY" -q -h "$HOST" -p "$PORT" 2>/dev/null; then
  if role_can_login; then
    log "reusing the server on $HOST:$PORT"
    echo "$URL"
    exit 0
  fi
  log "a server answers on $HOST:$PORT but $ROLE cannot log in to $DATABASE; creating them"
  done_=0
  # Our own cluster (socket in $PGDIR/run, superuser = its owner), or a Debian cluster (postgres).
  for candidate in "$PGDIR/run:$OWNER" "/var/run/postgresql:postgres" "/tmp:$OWNER"; do
    sock=${candidate%%:*}
    super=${candidate#*:}
    [[ -S $sock/.s.PGSQL.$PORT ]] || continue
    if ensure_role_and_db "$sock" "$super" 2>/dev/null; then
      done_=1
      break
    fi
  done
  [[ $done_ == 1 ]] && role_can_login \
    || die "cannot create role $ROLE / database $DATABASE on the server at $HOST:$PORT; create them \
yourself, choose another LLMFEAT_PG_PORT, or set LLMFEAT_TEST_POSTGRES_URL"
  echo "$URL"
  exit 0
fi

# A private cluster: initdb once, then pg_ctl start.
mkdir -p "$PGDIR/run"
[[ $(id -u) == 0 ]] && chown -R "$OWNER" "$PGDIR"
if [[ ! -f $PGDIR/data/PG_VERSION ]]; then
  log "initdb $PGDIR/data ($BINDIR)"
  as_owner "$BINDIR/initdb" -D "$PGDIR/data" -U "$OWNER" --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"$PGDIR/initdb.log" 2>&1 \
    || as_owner "$BINDIR/initdb" -D "$PGDIR/data" -U "$OWNER" --auth-local=trust \
      --auth-host=scram-sha-256 -E UTF8 --locale=C >"$PGDIR/initdb.log" 2>&1 \
    || { cat "$PGDIR/initdb.log" >&2; die "initdb failed"; }
fi
log "starting PostgreSQL on $HOST:$PORT (data $PGDIR/data, log $PGDIR/postgres.log)"
as_owner "$BINDIR/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/postgres.log" -w -t 60 \
  -o "-c listen_addresses=$HOST -p $PORT -k $PGDIR/run -c shared_buffers=64MB -c max_connections=50 \
-c fsync=off -c synchronous_commit=off -c full_page_writes=off" start >&2 \
  || { tail -n 30 "$PGDIR/postgres.log" >&2 || true; die "pg_ctl start failed"; }
ensure_role_and_db "$PGDIR/run" "$OWNER"
role_can_login || die "the server started, but $ROLE cannot log in to $DATABASE at $HOST:$PORT"
log "ready: $HOST:$PORT database $DATABASE role $ROLE"
echo "$URL"
