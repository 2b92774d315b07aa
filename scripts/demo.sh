#!/usr/bin/env bash
# The queue_ext demo: builds and installs the extension, starts a throwaway Postgres with it
# preloaded, enqueues jobs, drains them with two SQL workers, delivers webhook jobs to a
# local receiver, and prints what happened. Everything it starts, it stops.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "Building and installing queue_ext..."
bash scripts/install.sh >/tmp/queue_ext_demo_build.log 2>&1 \
  || { tail -30 /tmp/queue_ext_demo_build.log; exit 1; }

dir=/tmp/queue_ext_demo
port=25460
receiver_port=25461
secret="whsec_$(head -c 24 /dev/urandom | base64)"
scripts/cluster.sh stop "$dir" 2>/dev/null || true
rm -rf "$dir"
python3 scripts/webhook_receiver.py "$receiver_port" "$secret" &
receiver_pid=$!
trap 'kill $receiver_pid 2>/dev/null; scripts/cluster.sh stop "$dir"' EXIT
scripts/cluster.sh start "$dir" "$port" "queue_ext.http_allowlist = '127.0.0.1'"
psql -q -h 127.0.0.1 -p "$port" -U postgres -c "CREATE EXTENSION queue_ext" postgres
python3 scripts/demo.py "host=127.0.0.1 port=$port user=postgres dbname=postgres" "http://127.0.0.1:$receiver_port" "$secret"

# The dashboard over the same database: its JSON and a few Prometheus series.
cargo build -q -p queue_ext-dashboard
dashboard_port=25462
target/debug/queue_ext-dashboard --database-url "postgres://postgres@127.0.0.1:$port/postgres" \
  --listen "127.0.0.1:$dashboard_port" 2>/dev/null &
dashboard_pid=$!
trap 'kill $receiver_pid $dashboard_pid 2>/dev/null; scripts/cluster.sh stop "$dir"' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$dashboard_port/api/queues" >/dev/null && break; sleep 0.1; done
echo; echo "5. The dashboard (queue_ext-dashboard --listen 127.0.0.1:$dashboard_port):"
curl -s "http://127.0.0.1:$dashboard_port/api/queues"; echo
curl -s "http://127.0.0.1:$dashboard_port/metrics" | grep -E '^queue_ext_(jobs_completed_last_5m|dispatcher_up)'
