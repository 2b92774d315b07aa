"""What the one-connection measuring scripts (enqueue_split, drain_split, dispatch_turns,
sustained_drain) share: a backend's CPU time, and a database of their own with queue_ext."""
import os

import psycopg


def cpu_seconds(pid):
    """User + system CPU time of process `pid` so far (from /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def queue_ext_database(port, name):
    """The DSN of database `name`, created with queue_ext the first time."""
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            c.execute(f'CREATE DATABASE "{name}"')
            with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname={name}", autocommit=True) as d:
                d.execute("CREATE EXTENSION queue_ext")
    return f"host=127.0.0.1 port={port} user=postgres dbname={name}"
