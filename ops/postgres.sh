#!/usr/bin/env bash
# A private PostgreSQL server for the shared Hive metastore, from Debian's packages (not the
# system service): `ops/postgres.sh start DIR PORT` / `ops/postgres.sh stop DIR`.
# Idempotent: initdb only into an empty DIR; role and database created when missing.
# PostgreSQL refuses to run as root: as root it runs as the `postgres` user the package made.
set -euo pipefail

action=${1:?usage: postgres.sh start DIR PORT | stop DIR}
base=$(realpath -m "${2:?DIR}")
port=${3:-55432}
bin=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
db=${METASTORE_DB:-metastore}
role=${METASTORE_USER:-hive}
password=${HIERARCHY_METASTORE_PASSWORD:-hive}
data=$base/pgdata sock=$base/sock log=$base/postgres.log

[ -x "$bin/pg_ctl" ] || { echo "no PostgreSQL server (apt-get install postgresql)" >&2; exit 2; }
if [ "$(id -u)" = 0 ]; then runas=(runuser -u postgres --); owner=postgres; else runas=(); owner=$(id -un); fi

case $action in
start)
  mkdir -p "$data" "$sock"
  chmod 755 "$base"
  chown "$owner": "$data" "$sock"; chmod 700 "$data"
  touch "$log"; chown "$owner": "$log"
  if [ ! -s "$data/PG_VERSION" ]; then
    "${runas[@]}" "$bin/initdb" -D "$data" -U postgres -E UTF8 --locale=C.UTF-8 \
      --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  fi
  if ! "${runas[@]}" "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    # fsync off: a test/demo metastore, rebuilt at will; a production one is a managed server
    "${runas[@]}" "$bin/pg_ctl" -D "$data" -l "$log" -w -t 60 start -o \
      "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$sock \
       -c shared_buffers=16MB -c max_connections=50 -c fsync=off -c synchronous_commit=off \
       -c full_page_writes=off" >/dev/null
  fi
  psql=("${runas[@]}" "$bin/psql" -h "$sock" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt)
  [ "$("${psql[@]}" -c "select 1 from pg_roles where rolname='$role'")" = 1 ] ||
    "${psql[@]}" -c "create role $role login password '$password'"
  [ "$("${psql[@]}" -c "select 1 from pg_database where datname='$db'")" = 1 ] ||
    "${psql[@]}" -c "create database $db owner $role"
  echo "jdbc:postgresql://127.0.0.1:$port/$db"
  ;;
stop)
  if [ -s "$data/postmaster.pid" ]; then
    "${runas[@]}" "$bin/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null
  fi
  ;;
*) echo "usage: postgres.sh start DIR PORT | stop DIR" >&2; exit 2 ;;
esac
