#!/usr/bin/env bash
# Starts or stops a throwaway PostgreSQL cluster for the demo, the tests and the benchmark:
# PostgreSQL 15, or 18 with QE_PG=18 (scripts/pgversion.sh). Postgres refuses to run as root,
# so the cluster runs as the `postgres` user.
#
#   scripts/cluster.sh start DIR PORT [extra postgresql.conf lines...]
#   scripts/cluster.sh stop DIR
#   scripts/cluster.sh restart DIR
#
# The cluster preloads queue_ext (for its background worker) and pg_cron (15 only), listens on
# 127.0.0.1:PORT and keeps its socket and log in DIR. The project's ports are below 32768, outside
# Linux's ephemeral range, so that a client socket the kernel numbered cannot be holding one.
set -euo pipefail
source "$(dirname "$0")/pgversion.sh"
cmd=${1:?usage: cluster.sh start|stop|restart DIR [PORT]}
dir=${2:?cluster directory}
as_pg() { if [ "$(id -un)" = postgres ]; then "$@"; else sudo -u postgres "$@"; fi; }

case "$cmd" in
  start)
    port=${3:?port}
    shift 3
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      mkdir -p "$dir"
      chown postgres "$dir"
      as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log"
      {
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$dir'"
        echo "max_connections = 200"
        echo "shared_buffers = 256MB"
        echo "shared_preload_libraries = '$PRELOAD'"
        case "$PRELOAD" in *pg_cron*) echo "cron.database_name = 'postgres'" ;; esac
        echo "log_line_prefix = '%m [%p] %q%a '"
        for line in "$@"; do echo "$line"; done
      } | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
    fi
    if ! as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null; then
      # Say why (a port in use, a bad setting) where the caller's output shows it.
      echo "cluster.sh: the server in $dir did not start; the end of $dir/server.log:" >&2
      tail -n 20 "$dir/server.log" >&2 || true
      exit 1
    fi
    ;;
  stop)
    [ -f "$dir/data/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    ;;
  restart)
    as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m fast -w -t 60 restart >/dev/null
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
