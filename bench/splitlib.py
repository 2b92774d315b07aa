"""What the one-connection measuring scripts (enqueue_split, drain_split, dispatch_turns,
sustained_drain, hot_table_variants) share: a backend's or a whole cluster's CPU time, and a
database of their own with queue_ext (and pgmq's SQL beside it)."""
import os

import psycopg


def _stat(pid):
    """The fields of /proc/PID/stat after the command name (state first)."""
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()


def cpu_seconds(pid):
    """User + system CPU time of process `pid` so far (from /proc)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster_cpu_seconds(postmaster_pid):
    """User + system CPU time of a whole cluster so far: the postmaster, every process it still
    runs (backends, WAL writer, checkpointer, autovacuum, queue_ext's workers) and the ones it
    has reaped. A backend that ends between two readings moves from the second term to the
    third, so keep the connections being measured open until the last reading."""
    own = _stat(postmaster_pid)
    ticks = int(own[11]) + int(own[12]) + int(own[13]) + int(own[14])
    for child in open(f"/proc/{postmaster_pid}/task/{postmaster_pid}/children").read().split():
        try:
            f = _stat(child)
        except FileNotFoundError:  # ended meanwhile: the postmaster reaps it into its own count
            continue
        ticks += int(f[11]) + int(f[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def postmaster_of(conn):
    """The postmaster's pid: the parent of this connection's backend."""
    return int(_stat(conn.info.backend_pid)[1])


def queue_ext_database(port, name):
    """The DSN of database `name`, created with queue_ext the first time."""
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            c.execute(f'CREATE DATABASE "{name}"')
            with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname={name}", autocommit=True) as d:
                d.execute("CREATE EXTENSION queue_ext")
    return f"host=127.0.0.1 port={port} user=postgres dbname={name}"


def fresh_database_with_pgmq(port, name, pgmq_sql, queue):
    """The DSN of database `name`, created afresh with queue_ext and pgmq's SQL, and a queue
    `queue` in each."""
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        c.execute(f'CREATE DATABASE "{name}"')
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname={name}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION queue_ext")
        c.execute("SELECT queue_ext.create_queue(%s)", [queue])
        c.execute(open(pgmq_sql).read())
        c.execute("SELECT pgmq.create(%s)", [queue])
    return dsn
