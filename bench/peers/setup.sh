#!/usr/bin/env bash
# Brings the benchmark's peers onto this machine when they are missing (bench/run.sh calls it):
#   pgmq             PGMQ's plain-SQL install script (no C extension), shipped inside the `pgmq`
#                    crate (pinned below, install-sql-embedded). Fetched with cargo's ordinary
#                    client (a fetch of bench/peers/pgmq-sql/Cargo.toml: download only, nothing is
#                    built), checked against a pinned SHA-256 and cached as
#                    bench/peers/cache/pgmq-$PGMQ_VERSION.sql.
#   graphile-worker  npm ci from the committed bench/peers/package-lock.json into
#                    bench/peers/node_modules.
# Both caches are gitignored; once they exist nothing here touches the network.
#   bash bench/peers/setup.sh [pgmq] [graphile]      (default: both)
# Prints the path of the pgmq SQL script when pgmq was asked for.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PGMQ_CRATE=0.33.7        # keep in step with pgmq-sql/Cargo.toml
PGMQ_VERSION=1.11.1      # the PGMQ version that crate's pgmq.sql installs
PGMQ_SQL_SHA256=71cf82eaf1d81394a99f56ddf184c3dc8bf5eeb6f204ef9bad6e146e141eca2e
GRAPHILE_VERSION=0.17.3  # keep in step with package.json / package-lock.json

want=("$@")
[ ${#want[@]} -gt 0 ] || want=(pgmq graphile)
for peer in "${want[@]}"; do
  case "$peer" in
    pgmq)
      sql="$here/cache/pgmq-$PGMQ_VERSION.sql"
      if [ ! -f "$sql" ] || ! echo "$PGMQ_SQL_SHA256  $sql" | sha256sum -c --status; then
        mkdir -p "$here/cache"
        cargo fetch -q --manifest-path "$here/pgmq-sql/Cargo.toml" >&2
        src=$(cargo metadata -q --format-version 1 --manifest-path "$here/pgmq-sql/Cargo.toml" |
          python3 -c "import json, sys, os
p = [p for p in json.load(sys.stdin)['packages'] if p['name'] == 'pgmq' and p['version'] == '$PGMQ_CRATE']
print(os.path.join(os.path.dirname(p[0]['manifest_path']), 'src/install/embedded/sql/pgmq.sql'))")
        echo "$PGMQ_SQL_SHA256  $src" | sha256sum -c --status || {
          echo "bench/peers/setup.sh: $src does not have the pinned SHA-256" >&2; exit 1; }
        cp "$src" "$sql.tmp" && mv "$sql.tmp" "$sql"
      fi
      echo "$sql"
      ;;
    graphile)
      have=$(node -p "try { require('$here/node_modules/graphile-worker/package.json').version } catch { '' }")
      if [ "$have" != "$GRAPHILE_VERSION" ]; then
        (cd "$here" && npm ci --no-audit --no-fund --loglevel=error >&2)
      fi
      ;;
    *) echo "bench/peers/setup.sh: unknown peer $peer" >&2; exit 2 ;;
  esac
done
