#!/usr/bin/env bash
# The soak (bench/soak.py): N jobs (default 1,000,000) through 16 SQL workers on a throwaway
# cluster while backends, the dispatcher and the postmaster are killed, then an exact count.
#   bash bench/soak.sh [--jobs N] [--rate JOBS_PER_S] [--fault-every S] [--seed N] ...
# (python3 bench/soak.py --help lists every option.) It prints its settings (the server's and
# its own) before it starts; QE_SOAK_NAME / QE_SOAK_PORT / QE_SOAK_SINK_PORT move the cluster
# (/tmp/queue_ext_<name>) and the webhook sink.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
name=${QE_SOAK_NAME:-soak}
# Two runs on one cluster directory would stop and delete each other's cluster: take turns.
exec 9>"/tmp/queue_ext_$name.lock"
if ! flock -n 9; then
  echo "bench/soak.sh: another run holds /tmp/queue_ext_$name.lock; waiting for it" >&2
  flock 9
fi
exec python3 "$here/soak.py" --name "$name" --port "${QE_SOAK_PORT:-25560}" \
  --sink-port "${QE_SOAK_SINK_PORT:-25660}" "$@"
