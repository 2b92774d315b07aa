#!/usr/bin/env bash
# Installs everything queue_ext needs on a fresh Debian bookworm machine, skipping what is
# already there. Safe to run repeatedly; every other script calls it first.
set -euo pipefail

PG_MAJOR=15
PGRX_VERSION=0.18.0

need_apt=()
for pkg in postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR libclang-dev clang sudo \
           postgresql-$PG_MAJOR-cron python3 curl chromium chromium-driver; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts a default cluster on 5432; we run our own throwaway clusters instead.
  $SUDO pg_ctlcluster $PG_MAJOR main stop 2>/dev/null || true
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  echo "setup: installing cargo-pgrx $PGRX_VERSION (about 5 minutes)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# Python client side of the tests, demo and benchmark (real connections to a real cluster).
if ! python3 -c "import psycopg, pytest" 2>/dev/null; then
  echo "setup: installing psycopg and pytest from PyPI"
  python3 -m pip install -q "psycopg[binary]==3.3.9" "pytest>=8"
fi

# The dashboard's tests: a real browser (Debian's chromium, above), the Prometheus parser.
if ! python3 -c "import selenium, prometheus_client, requests" 2>/dev/null; then
  echo "setup: installing selenium, prometheus_client and requests from PyPI"
  python3 -m pip install -q "selenium==4.40.0" "prometheus_client==0.26.0" "requests==2.34.2"
fi

# The examples' webhook receivers verify signatures with the Standard Webhooks library; the
# Node examples install exactly their committed package-lock.json.
if ! python3 -c "import standardwebhooks" 2>/dev/null; then
  echo "setup: installing standardwebhooks from PyPI"
  python3 -m pip install -q "standardwebhooks==1.1.0"
fi
for dir in examples/node-worker examples/node-receiver; do
  dir="$(dirname "$0")/../$dir"
  if [ ! -d "$dir/node_modules" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    echo "setup: npm ci in ${dir#*/../}"
    npm ci --prefix "$dir" --no-audit --no-fund --silent
  fi
done

PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
if ! grep -qs "pg$PG_MAJOR" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
  echo "setup: cargo pgrx init --pg$PG_MAJOR $PG_CONFIG"
  cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG"
fi
