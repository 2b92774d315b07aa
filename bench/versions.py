"""Two versions of queue_ext's SQL side by side, at the same time, on one cluster: what a change
costs per job, without the drift between runs minutes apart that the 4-client headline shows.

    python3 bench/versions.py --port PORT [--old 0.7.0] [--new 0.8.0] [--rounds 7]
                              [--modes drain,single,enqueue,enqueue1,enqueue20,retry,status]

The cluster must have the extension installed (scripts/install.sh installs every released
version's script beside the current one) and run as the benchmark's does. One database per
version (created once, named qe_versions_<version>), the same library; each round runs every
measure in both databases, alternating which goes first. Measured per job, from one connection
with synchronous_commit off: the backend's CPU time from /proc (user + system) and the WAL it
wrote. Prints the median and every round."""
import argparse
import statistics

import psycopg
from psycopg import sql

MODES = {
    # name: (jobs per round, what one step does)
    "drain": (20000, "get_next_jobs(100) + complete_jobs in one transaction"),
    "single": (3000, "get_next_job + complete_job, each its own transaction"),
    "enqueue": (100000, "enqueue_jobs, batches of 1,000"),
    "enqueue1": (10000, "enqueue_job, each its own transaction"),
    "enqueue20": (20000, "enqueue_jobs, batches of 20"),
    "retry": (3000, "enqueue_job + get_next_job + fail_job (a retry), each its own transaction"),
    "status": (5000, "job_status of one job, each its own transaction"),
}


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def database(port, version):
    name = "qe_versions_" + version.replace(".", "_")
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            c.execute(f'CREATE DATABASE "{name}"')
            with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname={name}", autocommit=True) as d:
                d.execute(sql.SQL("CREATE EXTENSION queue_ext VERSION {}").format(sql.Literal(version)))
                d.execute("SELECT queue_ext.create_queue('versions')")
    return f"host=127.0.0.1 port={port} user=postgres dbname={name}"


def one_round(dsn, mode):
    jobs, _ = MODES[mode]
    with psycopg.connect(dsn, autocommit=True) as c:
        # Failed jobs wait an hour here, so a round's claims take only its own new jobs.
        c.execute("SELECT queue_ext.create_queue('versions_retry', backoff_base => '1 hour', if_not_exists => true)")
        if mode == "status":
            status_of = c.execute("SELECT queue_ext.enqueue_job('versions', '{\"n\": 1}')").fetchone()[0]
        elif mode not in ("enqueue", "enqueue1", "enqueue20", "retry"):
            c.execute("SELECT count(*) FROM queue_ext.enqueue_jobs('versions', "
                      "array_fill('{\"n\": 1}'::jsonb, ARRAY[%s]))" % jobs)
        c.execute("VACUUM ANALYZE queue_ext.job_queue")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET synchronous_commit = off")
        pid = c.info.backend_pid
        lsn = c.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        start = cpu_seconds(pid)
        if mode == "enqueue":
            for _ in range(jobs // 1000):
                c.execute("SELECT count(*) FROM queue_ext.enqueue_jobs('versions', "
                          "array_fill('{\"n\": 1}'::jsonb, ARRAY[1000]))")
        elif mode == "enqueue1":
            for _ in range(jobs):
                c.execute("SELECT queue_ext.enqueue_job('versions', '{\"n\": 1}')", prepare=True)
        elif mode == "enqueue20":
            for _ in range(jobs // 20):
                c.execute("SELECT count(*) FROM queue_ext.enqueue_jobs('versions', "
                          "array_fill('{\"n\": 1}'::jsonb, ARRAY[20]))", prepare=True)
        elif mode == "retry":
            for _ in range(jobs):
                c.execute("SELECT queue_ext.enqueue_job('versions_retry', '{\"n\": 1}')", prepare=True)
                job, token = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('versions_retry')",
                                       prepare=True).fetchone()
                c.execute("SELECT queue_ext.fail_job(%s, 'boom', %s)", [job, token], prepare=True)
        elif mode == "status":
            for _ in range(jobs):
                c.execute("SELECT status FROM queue_ext.job_status(%s)", [status_of], prepare=True)
        elif mode == "drain":
            for _ in range(jobs // 100):
                with c.transaction():
                    c.execute("SELECT queue_ext.complete_jobs(array_agg(job_id), array_agg(lease_token)) "
                              "FROM queue_ext.get_next_jobs('versions', 100)")
        else:
            for _ in range(jobs):
                job, token = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('versions')").fetchone()
                c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job, token])
        cpu = (cpu_seconds(pid) - start) / jobs * 1e6
        wal = float(c.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", [lsn]).fetchone()[0]) / jobs
        left = c.execute("SELECT count(*) FROM queue_ext.job_queue "
                         "WHERE queue_name IN ('versions', 'versions_retry')").fetchone()[0]
        if mode.startswith("enqueue") or mode in ("retry", "status"):
            left -= 1 if mode == "status" else jobs  # removed, unmeasured, for the next round
            c.execute("DELETE FROM queue_ext.job_queue WHERE queue_name IN ('versions', 'versions_retry')")
    if left:
        raise SystemExit(f"{dsn}: {left} jobs left after the round")
    return cpu, wal


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--old", default="0.7.0")
    ap.add_argument("--new", default="0.8.0")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--modes", default="drain,single,enqueue")
    args = ap.parse_args()
    versions = [args.old, args.new]
    dsns = {v: database(args.port, v) for v in versions}
    for mode in args.modes.split(","):
        results = {v: [] for v in versions}
        for r in range(args.rounds):
            for v in (versions if r % 2 == 0 else versions[::-1]):
                results[v].append(one_round(dsns[v], mode))
        print(f"{mode}: {MODES[mode][1]}, {MODES[mode][0]:,} jobs per round, {args.rounds} rounds")
        for v in versions:
            cpus = sorted(round(x[0], 1) for x in results[v])
            wals = sorted(round(x[1]) for x in results[v])
            print(f"  {v}: backend CPU per job median {statistics.median(cpus):.1f} us {cpus}; "
                  f"WAL per job median {statistics.median(wals):.0f} B")


if __name__ == "__main__":
    main()
