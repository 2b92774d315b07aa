#!/usr/bin/env bash
# Runs every test layer of queue_ext on this machine, installing what is missing first.
# This is the README's test command, and what CI runs (.ci/run).
#
#   1. formatting and lints
#   then for each PostgreSQL version (15, Debian's, then 18, from scripts/setup.sh):
#   2. cargo pgrx test: pure-Rust unit tests and the #[pg_test] tests inside Postgres
#   3. install the extension into that Postgres (scripts/install.sh)
#   4. pg_regress golden-output SQL tests (pg_test/) against a real cluster, and the upgrade
#      test: every released version, ALTER EXTENSION UPDATE, compared with a fresh install
#   5. pytest: concurrency, the webhook dispatcher over real HTTP, crashes, pg_cron (tests/)
#   6. the benchmark in --quick mode, as a correctness smoke test (PostgreSQL 15)
#
#   QE_PG_VERSIONS="15 18" bash scripts/test.sh   (the default: both)
#   QE_PG_VERSIONS=15 bash scripts/test.sh        (quick local work: 15 only)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

versions=${QE_PG_VERSIONS:-15 18}
step() { echo; echo "=== $* === (${SECONDS}s since the start)"; }

step "1/6 released files unchanged, cargo fmt --check and clippy"
bash scripts/check_released.sh
cargo fmt --all -- --check
cargo clippy --all-targets --features pg_test -- -D warnings
cargo clippy -p queue_ext-dashboard --all-targets -- -D warnings
cargo clippy -p queue_ext-rust-worker --all-targets -- -D warnings
case " $versions " in
  *" 18 "*) cargo clippy --all-targets --no-default-features --features pg18,pg_test -- -D warnings ;;
esac

for version in $versions; do
  # A subshell per version: QE_PG (read by every script through scripts/pgversion.sh) does
  # not leak into the next version or the benchmark.
  (
  export QE_PG=$version
  source scripts/pgversion.sh

  step "2/6 PostgreSQL $QE_PG: cargo pgrx test (unit and in-database tests)"
  pgdata=/tmp/queue_ext_${QE_TAG}pgrx_test
  # cargo pgrx test writes the library in place: give the path a new inode first, so that a
  # server already running here keeps the file it mapped (why scripts/install.sh renames).
  lib=$("$PG_CONFIG" --pkglibdir)/queue_ext.so
  if [ -f "$lib" ]; then cp -p "$lib" "$lib.new.$$" && mv -f "$lib.new.$$" "$lib"; fi
  rm -rf "$pgdata"  # pgrx runs initdb itself (as postgres, in world-writable /tmp)
  cargo pgrx test "pg$QE_PG" --runas postgres --pgdata "$pgdata"

  step "3/6 PostgreSQL $QE_PG: install (scripts/install.sh: atomic, safe beside a running server)"
  bash scripts/install.sh

  step "4/6 PostgreSQL $QE_PG: pg_regress and the upgrade test (pg_test/)"
  bash pg_test/run.sh
  bash pg_test/isolation/run.sh
  bash pg_test/upgrade.sh

  step "5/6 PostgreSQL $QE_PG: pytest (tests/)"
  # tests/test_dashboard.py runs this binary (target/debug/queue_ext-dashboard).
  cargo build -p queue_ext-dashboard
  # tests/test_examples.py runs the example worker (target/debug/queue_ext-rust-worker).
  cargo build -p queue_ext-rust-worker
  cargo test -p queue_ext-dashboard
  # On 18 the tests that need pg_cron are skipped (tests/conftest.py says which).
  python3 -m pytest -q tests
  )
done

case " $versions " in
  *" 15 "*)  # the benchmark starts PostgreSQL 15 clusters, with the build installed above
    step "6/6 benchmark smoke test (bench --quick)"
    bash bench/run.sh --quick ;;
esac

echo; echo "All queue_ext tests passed."
