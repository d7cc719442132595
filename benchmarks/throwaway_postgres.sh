#!/usr/bin/env bash
# A throwaway PostgreSQL server for benchmarks on a node that has none (a GPU node, say), from the server binaries
# of the `pgserver` wheel (`pip download --no-deps pgserver`: PostgreSQL 16 built for manylinux):
#   bash benchmarks/throwaway_postgres.sh WHEEL [PORT]     -> prints postgresql://postgres@127.0.0.1:PORT/test
# Everything lives under /tmp/thepayne-pg; a server left there by an earlier call is stopped first, so the script
# can run again on the same machine. As root, the server runs as a user `thepaynepg` (PostgreSQL refuses root).
set -euo pipefail
wheel=$(readlink -f "${1:?usage: throwaway_postgres.sh WHEEL [PORT]}")
port=${2:-5432}
[ -f "$wheel" ] || { echo "no such wheel: $1" >&2; exit 2; }
case "$port" in ''|*[!0-9]*) echo "port must be a number, not '$port'" >&2; exit 2 ;; esac  # it goes into su -c
root=/tmp/thepayne-pg
bin=$root/pgserver/pginstall/bin
as_owner() { if [ "$(id -u)" = 0 ]; then su thepaynepg -c "$1"; else bash -c "$1"; fi; }
if [ -x "$bin/pg_ctl" ] && [ -d "$root/data" ]; then
  as_owner "$bin/pg_ctl -D $root/data -m immediate -t 20 stop" >/dev/null 2>&1 || true
fi
rm -rf "$root" && mkdir -p "$root"
python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$wheel" "$root"
chmod -R a+rX "$root" && chmod -R a+rx "$bin"  # zip files keep no permissions
if [ "$(id -u)" = 0 ]; then
  id thepaynepg >/dev/null 2>&1 || useradd -M -s /bin/bash thepaynepg
  chown thepaynepg "$root"
fi
as_owner "timeout 120 $bin/initdb -D $root/data -U postgres --auth=trust -E UTF8 >$root/initdb.log 2>&1" \
  || { cat "$root/initdb.log" >&2; exit 1; }
as_owner "$bin/pg_ctl -D $root/data -t 60 -w -l $root/server.log start -o \
'-p $port -k $root -c listen_addresses=127.0.0.1 -c max_connections=200'" >/dev/null \
  || { cat "$root/server.log" >&2; exit 1; }
as_owner "timeout 30 $bin/createdb -h 127.0.0.1 -p $port -U postgres test"
echo "postgresql://postgres@127.0.0.1:$port/test"
