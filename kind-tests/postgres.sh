#!/usr/bin/env bash
# Starts Debian's PostgreSQL on loopback (127.0.0.1:5432) with a `ballast` role and a
# `ballast_test` database, and prints the URL the tests use (BALLAST_TEST_PG_URL).
# Idempotent.
set -euo pipefail

# Only the URL goes to stdout (callers capture it); everything the tools print goes to stderr.
exec 3>&1 1>&2

ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$ver" ]; then
  echo "postgres.sh: PostgreSQL is not installed (run kind-tests/setup.sh)" >&2
  exit 1
fi
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -q "^$ver main$"; then
  pg_createcluster "$ver" main </dev/null >/dev/null 3>&-
fi
conf=/etc/postgresql/$ver/main/postgresql.conf
changed=0
grep -q "^listen_addresses = '127.0.0.1'" "$conf" || { echo "listen_addresses = '127.0.0.1'" >>"$conf"; changed=1; }
grep -q "^max_connections = 300" "$conf" || { echo "max_connections = 300" >>"$conf"; changed=1; }
# The server is a daemon: it must not inherit the caller's pipes. Holding fd 3 (the pipe of
# `$(bash postgres.sh)`) would keep the caller waiting for EOF forever; holding stdout or
# stderr would keep a CI log open after the run. Its own log is in /var/log/postgresql.
# A server killed a moment ago may still hold its socket lock, so a failed start is retried.
pg_ctl_quiet() {
  for attempt in 1 2 3; do
    pg_ctlcluster "$ver" main "$1" </dev/null >/dev/null 2>&1 3>&- && return 0
    echo "postgres.sh: pg_ctlcluster $ver main $1 failed (attempt $attempt of 3)" >&2
    sleep 2
  done
  echo "postgres.sh: giving up; the server's log:" >&2
  tail -n 20 "/var/log/postgresql/postgresql-$ver-main.log" >&2 || true
  exit 1
}
if ! pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
  pg_ctl_quiet start
elif [ "$changed" = 1 ]; then
  # Started before our settings were written (apt's postinst starts a new cluster).
  pg_ctl_quiet restart
fi
for _ in $(seq 1 50); do
  su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1 && break
  sleep 0.2
done
su postgres -c "psql -qAtc \"select 1 from pg_roles where rolname='ballast'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"create role ballast login superuser password 'ballast'\"" >/dev/null
su postgres -c "psql -qAtc \"select 1 from pg_database where datname='ballast_test'\"" | grep -q 1 ||
  su postgres -c "psql -qc 'create database ballast_test owner ballast'" >/dev/null
echo "postgres://ballast:ballast@127.0.0.1:5432/ballast_test" >&3
