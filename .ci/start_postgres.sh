#!/usr/bin/env bash
# Throwaway PostgreSQL for the astra_thepayne CI on Debian 12, run as root; no systemd needed. The fallback of
# .ci/start_services.sh when no server answers on 127.0.0.1:5432. Adapted from the project's shared CI
# infrastructure script; differences: trust authentication on 127.0.0.1 (throwaway data) and the role/database
# the tests expect by default (postgres / test), so THEPAYNE_TEST_POSTGRES_URL has no password.
#   bash .ci/start_postgres.sh        # install if needed, start, create role+db, print DSN
#   bash .ci/start_postgres.sh stop   # stop the server this script started
# Env overrides: PG_BASE PG_PORT PG_USER PG_PASSWORD PG_DB
# Writes $PG_BASE/env.sh (DATABASE_URL, PGHOST, PGPORT, ...) for `source`.
set -euo pipefail

BASE=${PG_BASE:-$(dirname "$(mktemp -u)")/thepayne-ci/pg}     # every parent dir must be o+x (not a home folder, not mktemp -d)
PORT=${PG_PORT:-5432}
DBUSER=${PG_USER:-postgres}
DBPASS=${PG_PASSWORD:-ci}
DBNAME=${PG_DB:-test}
DATA=$BASE/data
SOCK=$BASE/sock

# libpq env (e.g. from a sourced env.sh) would redirect the admin psql calls below
for v in $(compgen -e | grep -E '^PG[A-Z]+$' || true); do unset "$v"; done
as_pg() { runuser -u postgres -- "$@"; }
find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }

PGBIN=$(find_bin)
if [ "${1:-}" = stop ]; then
  [ -n "$PGBIN" ] && [ -f "$DATA/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop || true
  exit 0
fi

# 1. install (Debian 12 -> PostgreSQL 15). Block the package's own auto-start of
#    cluster "main" on 5432 (matters on machines with a working init system).
if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/initdb" ]; then
  added_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; added_policy=1
  fi
  mkdir -p "$BASE"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; } \
      >"$BASE/apt.log" 2>&1 || rc=$?
  [ $added_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "${rc:-0}" = 0 ] || { tail -n 30 "$BASE/apt.log" >&2; exit 1; }
  PGBIN=$(find_bin)
fi

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
running() { [ -f "$DATA/postmaster.pid" ] && as_pg "$PGBIN/pg_isready" -q -h "$SOCK" -p "$(sed -n 4p "$DATA/postmaster.pid")"; }

mkdir -p "$BASE"
install -d -o postgres -g postgres -m 0700 "$SOCK"

if running; then
  PORT=$(sed -n 4p "$DATA/postmaster.pid")
else
  # 2. initdb once (about 1 s)
  if [ ! -s "$DATA/PG_VERSION" ]; then
    rm -rf "$DATA"; install -d -o postgres -g postgres -m 0700 "$DATA"
    as_pg "$PGBIN/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
          --auth-local=trust --auth-host=trust -N >"$BASE/initdb.log" 2>&1
    cat >>"$DATA/postgresql.conf" <<'EOF'
# CI: throwaway data, trade durability for speed
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  fi
  rm -f "$DATA/postmaster.pid"                 # stale after a kill -9 / reboot
  if port_busy "$PORT"; then
    if [ -n "${PG_PORT:-}" ]; then echo "port $PORT already in use" >&2; exit 1; fi
    while port_busy "$PORT"; do PORT=$((PORT + 1)); done
    echo "note: 5432 busy, using port $PORT" >&2
  fi
  # 3. start (about 0.1-0.2 s); -w waits until it accepts connections
  as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $SOCK" start >/dev/null
fi

# 4. role + database, idempotent
as_pg "$PGBIN/psql" -h "$SOCK" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
      -v u="$DBUSER" -v p="$DBPASS" <<'EOF'
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'u')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'u') \gexec
ALTER ROLE :"u" WITH LOGIN CREATEDB PASSWORD :'p';
EOF
as_pg "$PGBIN/psql" -h "$SOCK" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
      -v u="$DBUSER" -v d="$DBNAME" <<'EOF'
SELECT format('CREATE DATABASE %I OWNER %I', :'d', :'u')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'d') \gexec
EOF

# 5. prove a login over TCP works
PGPASSWORD="$DBPASS" "$PGBIN/psql" -h 127.0.0.1 -p "$PORT" -U "$DBUSER" -d "$DBNAME" -qAtc 'select 1' >/dev/null

DSN="postgresql://$DBUSER@127.0.0.1:$PORT/$DBNAME"
cat >"$BASE/env.sh" <<EOF
export DATABASE_URL='$DSN'
export PGHOST=127.0.0.1 PGPORT=$PORT PGUSER='$DBUSER' PGPASSWORD='$DBPASS' PGDATABASE='$DBNAME'
EOF
echo "postgres ready: pid $(head -n1 "$DATA/postmaster.pid"), data $DATA, log $DATA/server.log"
echo "DSN: $DSN"
echo "env: source $BASE/env.sh"
