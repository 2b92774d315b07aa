#!/usr/bin/env bash
# Builds installable packages of queue_ext from this tree, with `cargo pgrx package`:
#
#   dist/postgresql-15-queue-ext_<version>_amd64.deb     for Debian's PostgreSQL 15
#   dist/queue_ext-<version>-pg18-linux-x86_64.tar.gz    for PostgreSQL 18 (lib/ and share/,
#                                                         relative to its pg_config dirs)
#
#   scripts/package.sh [15] [18]     (default: both; 18 needs scripts/setup.sh's PostgreSQL 18)
#
# The build is scripts/install.sh's (the dev profile, Cargo.toml says why), so a package holds
# exactly the files install.sh would put in place. dpkg, like install.sh, unpacks each file
# under a temporary name and renames it over the old one: installing the .deb beside a running
# server is safe, and the server uses the new library after its next restart.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
description=$(sed -n 's/^description = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p dist
stage=$(mktemp -d /tmp/queue_ext_package.XXXXXX)
trap 'rm -rf "$stage"' EXIT

for QE_PG in ${*:-15 18}; do
  source scripts/pgversion.sh
  out=$stage/pg$QE_PG
  cargo pgrx package --profile dev --pg-config "$PG_CONFIG" --out-dir "$out" >&2
  case "$QE_PG" in
    15)
      # Debian's layout already: the package's root is pgrx's output.
      mkdir -p "$out/DEBIAN"
      cat >"$out/DEBIAN/control" <<EOF
Package: postgresql-15-queue-ext
Version: $version
Architecture: amd64
Maintainer: queue_ext developers <queue_ext@localhost>
Depends: postgresql-15, libc6 (>= 2.34)
Section: database
Priority: optional
Description: $description
 queue_ext for PostgreSQL 15: a job queue in SQL (priorities, leases, retries, dead
 letters, rate and concurrency limits) and a background worker that delivers webhook
 jobs signed, retried and logged. Add queue_ext to shared_preload_libraries for the
 dispatcher, then CREATE EXTENSION queue_ext.
EOF
      deb=dist/postgresql-15-queue-ext_${version}_amd64.deb
      dpkg-deb --root-owner-group -Zxz --build "$out" "$deb" >&2
      echo "$root/$deb"
      ;;
    *)
      # Relative to the installation: lib/ is pg_config --pkglibdir, share/ --sharedir.
      tree=$stage/queue_ext-$version-pg$QE_PG
      mkdir -p "$tree/lib" "$tree/share/extension"
      cp "$out$("$PG_CONFIG" --pkglibdir)"/queue_ext.so "$tree/lib/"
      cp "$out$("$PG_CONFIG" --sharedir)"/extension/queue_ext* "$tree/share/extension/"
      tarball=dist/queue_ext-$version-pg$QE_PG-linux-x86_64.tar.gz
      tar -C "$stage" --owner=0 --group=0 -czf "$tarball" "$(basename "$tree")"
      echo "$root/$tarball"
      ;;
  esac
done
