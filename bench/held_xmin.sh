#!/usr/bin/env bash
# The queue under a held xmin horizon (bench/held_xmin.py): a steady producer (500 jobs/s) and 4
# workers on a throwaway cluster, 2 minutes clean, 10 minutes with an idle-in-transaction
# session holding the horizon, 2 minutes after it ends; throughput, claim latency and dead
# tuples every 10 s, then a before/during/after table.
#   bash bench/held_xmin.sh [--rate 500] [--workers 4] [--before 2m] [--hold 10m] [--after 2m]
# It prints its settings (the server's and its own) first. QE_XMIN_NAME / QE_XMIN_PORT move the
# cluster (/tmp/queue_ext_<name>).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
name=${QE_XMIN_NAME:-soak_xmin}
exec 9>"/tmp/queue_ext_$name.lock"
if ! flock -n 9; then
  echo "bench/held_xmin.sh: another run holds /tmp/queue_ext_$name.lock; waiting for it" >&2
  flock 9
fi
exec python3 "$here/held_xmin.py" --name "$name" --port "${QE_XMIN_PORT:-25561}" "$@"
