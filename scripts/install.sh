#!/usr/bin/env bash
# Builds queue_ext and installs it into a PostgreSQL installation without ever writing over
# a file in place: every file is copied next to its destination under a temporary name and
# then renamed over it (what install(1) and dpkg do). A running server keeps the library it
# has mapped (a file overwritten in place crashed the backends that had it loaded); it uses
# the new one after its next restart.
#
#   scripts/install.sh [PG_CONFIG]     (default: Debian's PostgreSQL 15)
#   QE_PG=18 scripts/install.sh        (the PostgreSQL 18 of scripts/setup.sh; cargo pgrx
#                                       builds with the pg18 feature for its pg_config)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pgversion.sh
pg_config=${1:-$PG_CONFIG}
stage=$(mktemp -d /tmp/queue_ext_stage.XXXXXX)
trap 'rm -rf "$stage"' EXIT
# The dev profile is the one the test suite and the benchmark build (Cargo.toml says why).
cargo pgrx package --profile dev --pg-config "$pg_config" --out-dir "$stage" >&2

pkglibdir=$("$pg_config" --pkglibdir)
extdir=$("$pg_config" --sharedir)/extension
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
place() {  # place SRC DESTDIR: copy under a temporary name in DESTDIR, then rename
  local src=$1 dest=$2/$(basename "$1")
  $SUDO install -m 0644 "$src" "$dest.new.$$"
  $SUDO mv -f "$dest.new.$$" "$dest"
}
place "$stage$pkglibdir/queue_ext.so" "$pkglibdir"
for f in "$stage$extdir"/queue_ext*; do place "$f" "$extdir"; done
echo "installed queue_ext $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1) into $pkglibdir and $extdir" >&2
