#!/usr/bin/env bash
# Runs every test layer of queue_ext on this machine, installing what is missing first.
# This is the README's test command, and what CI runs (.ci/run).
#
#   1. formatting and lints
#   2. cargo pgrx test: pure-Rust unit tests and the #[pg_test] tests inside Postgres
#   3. install the extension into the system Postgres 15
#   4. pg_regress golden-output SQL tests (pg_test/) against a real cluster, and the upgrade
#      test: every released version, ALTER EXTENSION UPDATE, compared with a fresh install
#   5. pytest: concurrency, the webhook dispatcher over real HTTP, crashes, pg_cron (tests/)
#   6. the benchmark in --quick mode, as a correctness smoke test
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

step() { echo; echo "=== $* ==="; }

step "1/6 released files unchanged, cargo fmt --check and clippy"
bash scripts/check_released.sh
cargo fmt --all -- --check
cargo clippy --all-targets --features pg_test -- -D warnings
cargo clippy -p queue_ext-dashboard --all-targets -- -D warnings
cargo clippy -p queue_ext-rust-worker --all-targets -- -D warnings

step "2/6 cargo pgrx test (unit and in-database tests)"
pgdata=/tmp/queue_ext_pgrx_test
# cargo pgrx test writes the library in place: give the path a new inode first, so that a
# server already running here keeps the file it mapped (why scripts/install.sh renames).
lib=$(/usr/lib/postgresql/15/bin/pg_config --pkglibdir)/queue_ext.so
if [ -f "$lib" ]; then cp -p "$lib" "$lib.new.$$" && mv -f "$lib.new.$$" "$lib"; fi
rm -rf "$pgdata"  # pgrx runs initdb itself (as postgres, in world-writable /tmp)
cargo pgrx test pg15 --runas postgres --pgdata "$pgdata"

step "3/6 install (scripts/install.sh: atomic, safe beside a running server)"
bash scripts/install.sh

step "4/6 pg_regress and the upgrade test (pg_test/)"
bash pg_test/run.sh
bash pg_test/isolation/run.sh
bash pg_test/upgrade.sh

step "5/6 pytest (tests/)"
# tests/test_dashboard.py runs this binary (target/debug/queue_ext-dashboard).
cargo build -p queue_ext-dashboard
# tests/test_examples.py runs the example worker (target/debug/queue_ext-rust-worker).
cargo build -p queue_ext-rust-worker
cargo test -p queue_ext-dashboard
python3 -m pytest -q tests

step "6/6 benchmark smoke test (bench --quick)"
bash bench/run.sh --quick

echo; echo "All queue_ext tests passed."
