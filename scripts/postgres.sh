#!/usr/bin/env bash
# A throw-away PostgreSQL server for the tests: `source scripts/postgres.sh` installs Debian's
# `postgresql` when it is missing (as root), makes a new cluster in a temporary folder, starts it
# on a free port on 127.0.0.1, exports TRIPLINE_TEST_POSTGRES (its URL) and stops it and removes
# the folder when the calling shell exits. PostgreSQL refuses to run as root: as root, the
# cluster belongs to the `postgres` user the package made. Where it cannot be installed or
# started, it says so and exports nothing: the tests that need it then say they are skipped.

postgres_bin() {
  local initdb
  initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)
  [ -n "$initdb" ] && dirname "$initdb"
}

start_test_postgres() {
  local bin dir port as=()
  bin=$(postgres_bin)
  if [ -z "$bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing postgresql (Debian), the database the PostgreSQL store is tested on"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    bin=$(postgres_bin)
  fi
  if [ -z "$bin" ]; then
    echo "PostgreSQL is not installed and cannot be (needs root and apt-get): its tests are skipped"
    return 0
  fi
  dir=$(mktemp -d "${TMPDIR:-/tmp}/tripline-postgres.XXXXXX")
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$dir"
    as=(runuser -u postgres --)
  fi
  # A free port: the kernel's choice for a socket bound to port 0.
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  if ! "${as[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1; then
    echo "cannot make a PostgreSQL cluster (see $dir/initdb.log): its tests are skipped"
    return 0
  fi
  if ! "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o \
    "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null; then
    echo "cannot start PostgreSQL (see $dir/server.log): its tests are skipped"
    return 0
  fi
  TEST_POSTGRES_STOP=("${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop)
  TEST_POSTGRES_DIR=$dir
  trap 'stop_test_postgres' EXIT
  export TRIPLINE_TEST_POSTGRES="postgres://postgres@127.0.0.1:$port/postgres"
  export TRIPLINE_TEST_PGBIN="$bin"
  echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') for the tests at 127.0.0.1:$port"
}

stop_test_postgres() {
  "${TEST_POSTGRES_STOP[@]}" >/dev/null 2>&1 || true
  rm -rf "$TEST_POSTGRES_DIR"
}

start_test_postgres
