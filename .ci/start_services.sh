#!/usr/bin/env bash
# Start the services the test suite needs, as root, and write $THEPAYNE_CI_BASE/env.sh for `source`:
#   - PostgreSQL on 127.0.0.1:5432 with a database `test` (trust auth): the machine's own cluster when it runs,
#     else that cluster started with pg_ctlcluster, else a throwaway server from .ci/start_postgres.sh;
#   - a single-node SLURM cluster (munged + slurmctld + slurmd) from .ci/start_slurm.sh;
#   - Debian's chromium (headless browser for the report test), installed with apt-get when missing;
#   - Debian's fitsverify (the products test checks every file with it), installed the same way; a failed
#     install only warns (that test then fails under CI=true, saying why), the other services are still started.
# Fails loudly (exit 1, with the reason) when a service cannot be reached afterwards.
#   bash .ci/start_services.sh && source /tmp/thepayne-ci/env.sh
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${THEPAYNE_CI_BASE:-/tmp/thepayne-ci}
PG_URL=postgresql://postgres@127.0.0.1:5432/test
mkdir -p "$BASE"

pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }

# --- PostgreSQL -------------------------------------------------------------------------------------------------
if ! pg_up && command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  if [ -n "$version" ] && [ -d "/etc/postgresql/$version/main" ]; then
    echo "starting PostgreSQL cluster $version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || echo "note: pg_ctlcluster failed" >&2
    for _ in $(seq 50); do pg_up && break; sleep 0.2; done
  fi
fi
if pg_up; then
  command -v psql >/dev/null || { echo "PostgreSQL answers on 127.0.0.1:5432 but psql is missing" >&2; exit 1; }
  # the tests connect as postgres without a password and create their own databases next to `test`
  psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -v ON_ERROR_STOP=1 -qAtc 'select 1' >/dev/null \
    || { echo "PostgreSQL on 127.0.0.1:5432 refuses user postgres without a password" >&2; exit 1; }
  psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -v ON_ERROR_STOP=1 -q <<'SQL'
SELECT 'CREATE DATABASE test' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'test') \gexec
SQL
else
  echo "no PostgreSQL on 127.0.0.1:5432: starting a throwaway server"
  PG_BASE=$BASE/pg bash "$HERE/start_postgres.sh"
  PG_URL=$(sed -n "s/^export DATABASE_URL='\(.*\)'$/\1/p" "$BASE/pg/env.sh")
fi
psql "$PG_URL" -qAtc 'select 1' >/dev/null || { echo "PostgreSQL unreachable at $PG_URL" >&2; exit 1; }
echo "postgres ready: $PG_URL"

# --- SLURM ------------------------------------------------------------------------------------------------------
SLURM_BASE=$BASE/slurm bash "$HERE/start_slurm.sh"
export SLURM_CONF=$BASE/slurm/slurm.conf
sinfo -h -o %a | grep -qx up || { echo "SLURM partition not up: $(sinfo 2>&1)" >&2; exit 1; }

# --- a headless browser: tests/integration/test_report.py opens `thepayne report`'s page in Debian's chromium ---
if ! command -v chromium >/dev/null; then
  echo "installing chromium (headless browser for the report test)"
  { apt-get install -y -q chromium >"$BASE/chromium-install.log" 2>&1 \
      || { apt-get update -q >>"$BASE/chromium-install.log" 2>&1 \
           && apt-get install -y -q chromium >>"$BASE/chromium-install.log" 2>&1; }; } \
    || { echo "cannot install chromium: see $BASE/chromium-install.log" >&2; exit 1; }
fi
chromium --version || { echo "chromium does not start" >&2; exit 1; }

# --- fitsverify: tests/integration/test_products.py checks the astraStar/astraVisit files with it -------------
if ! command -v fitsverify >/dev/null; then
  echo "installing fitsverify (FITS checker for the products test)"
  { apt-get install -y -q fitsverify >"$BASE/fitsverify-install.log" 2>&1 \
      || { apt-get update -q >>"$BASE/fitsverify-install.log" 2>&1 \
           && apt-get install -y -q fitsverify >>"$BASE/fitsverify-install.log" 2>&1; }; } \
    || echo "warning: cannot install fitsverify (see $BASE/fitsverify-install.log); under CI=true" \
            "test_products_pass_fitsverify fails" >&2
fi

cat >"$BASE/env.sh" <<ENV
export THEPAYNE_TEST_POSTGRES_URL='$PG_URL'
export SLURM_CONF='$SLURM_CONF'
ENV
echo "services ready: source $BASE/env.sh"
