"""The queue under a held xmin horizon: what an idle-in-transaction session does to it.

    bash bench/held_xmin.sh [--rate 500] [--workers 4] [--before 2m] [--hold 10m] [--after 2m]

One throwaway PostgreSQL 15 cluster (tests/pgcluster.py over scripts/cluster.sh, queue_ext
preloaded, default settings: autovacuum on, synchronous_commit on). A producer enqueues at a
steady rate (enqueue_jobs batches on a fixed schedule); W worker processes claim one job per
call (get_next_job) and complete it (complete_job with its lease token), polling every 10 ms
when the queue is empty. After a clean period a session runs BEGIN; SELECT txid_current(); and
stays idle in its transaction for the hold, so no dead row newer than its snapshot can be
vacuumed (nor skipped by index scans as dead to everyone); then it ends and the run measures
the recovery.

Every interval (10 s) one line: completed jobs/s, enqueued/s, claim latency p50/p99 (the
get_next_job call of claims that returned a job, client-side), the empty poll's p50, dead
tuples of queue_ext.job_queue (pg_stat_user_tables.n_dead_tup, and pgstattuple's exact count
when the contrib module is installed), its size with indexes, the backlog and the age of the
oldest xmin. At the end a before / during / after table (and the hold's last minute), and JSON
in bench/results/held-xmin-<time>.json."""
import argparse
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import re
import sys
import time
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
from bench import Failure, as_worker, connect, fresh_queue  # noqa: E402
from pgcluster import Cluster  # noqa: E402

QUEUE = "held_xmin"


def seconds(text):
    """'600', '30s', '10m', '1h' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 10m, 600)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def producer(dsn, rate, batch, stop, enqueued):
    """Enqueues `batch` jobs every batch/rate seconds on a fixed schedule: when a call runs
    late the next ones follow without sleeping until the schedule is met again."""
    payloads = ['{"n":1}'] * batch
    with connect(dsn) as c:
        t_next = time.time()
        while not stop.is_set():
            t_next += batch / rate
            pause = t_next - time.time()
            if pause > 0:
                time.sleep(pause)
            c.execute("SELECT count(*) FROM queue_ext.enqueue_jobs(%s, %s::jsonb[])", [QUEUE, payloads], prepare=True)
            with enqueued.get_lock():
                enqueued.value += batch


def worker(dsn, i, stop, out):
    """get_next_job + complete_job, timed per call; one bucket per wall-clock second sent to
    `out`: (second, claim latencies of claims that got a job, of empty claims, completion
    latencies)."""
    me = f"xmin-{i}"
    buckets = {}
    flushed = int(time.time())
    with connect(dsn) as c:
        while not stop.is_set():
            t = time.perf_counter()
            row = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s, %s)", [QUEUE, me],
                            prepare=True).fetchone()
            claim = time.perf_counter() - t
            now = int(time.time())
            b = buckets.setdefault(now, ([], [], []))
            if row is None:
                b[1].append(claim)
                time.sleep(0.01)
            else:
                b[0].append(claim)
                t = time.perf_counter()
                if c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", row, prepare=True).fetchone()[0] != "completed":
                    raise Failure(f"complete_job of {row[0]} did not complete it")
                b[2].append(time.perf_counter() - t)
            if now != flushed:
                for sec in [s for s in buckets if s < now]:
                    out.put((sec, *buckets.pop(sec)))
                flushed = now
    for sec, b in buckets.items():
        out.put((sec, *b))


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)


def count(value):
    return "-" if value is None else f"{value:,}"


def ms(value):
    return "-" if value is None else f"{value:.2f}"


def table_stats(c, pgstattuple):
    t = time.perf_counter()
    row = c.execute("""SELECT n_dead_tup, n_live_tup, autovacuum_count, vacuum_count,
                              pg_total_relation_size('queue_ext.job_queue'),
                              (SELECT count(*) FROM queue_ext.job_queue WHERE status IN ('queued', 'retrying')),
                              (SELECT max(age(backend_xmin)) FROM pg_stat_activity)
                       FROM pg_stat_user_tables WHERE relid = 'queue_ext.job_queue'::regclass""").fetchone()
    s = dict(zip(("n_dead_tup", "n_live_tup", "autovacuums", "vacuums", "total_bytes", "backlog", "oldest_xmin_age"), row))
    s["stats_query_ms"] = round((time.perf_counter() - t) * 1000, 1)
    if pgstattuple:
        # A full read of the table: its cost is recorded, as it competes with the workers.
        t = time.perf_counter()
        s["pgstattuple_dead"], s["pgstattuple_live"], s["table_bytes"] = c.execute(
            "SELECT dead_tuple_count, tuple_count, table_len FROM pgstattuple('queue_ext.job_queue')").fetchone()
        s["pgstattuple_ms"] = round((time.perf_counter() - t) * 1000, 1)
    return s


def summarize(windows, label):
    """One row of the before/during/after table over the given samples."""
    if not windows:
        return None
    secs = sum(w["seconds"] for w in windows)
    claims = [x for w in windows for x in w["_claims"]]
    empty = [x for w in windows for x in w["_empty"]]
    done = [x for w in windows for x in w["_done"]]
    last = windows[-1]
    return {"phase": label, "seconds": secs,
            "completed_per_s": round(sum(w["completed"] for w in windows) / secs, 1),
            "enqueued_per_s": round(sum(w["enqueued"] for w in windows) / secs, 1),
            "claim_p50_ms": pct(claims, 0.5), "claim_p99_ms": pct(claims, 0.99), "empty_claim_p50_ms": pct(empty, 0.5),
            "complete_p50_ms": pct(done, 0.5), "complete_p99_ms": pct(done, 0.99),
            "n_dead_tup_end": last["n_dead_tup"], "n_dead_tup_max": max(w["n_dead_tup"] for w in windows),
            "pgstattuple_dead_last": next((w["pgstattuple_dead"] for w in reversed(windows) if "pgstattuple_dead" in w), None),
            "pgstattuple_dead_max": max((w["pgstattuple_dead"] for w in windows if "pgstattuple_dead" in w), default=None),
            "total_mb_end": round(last["total_bytes"] / 2**20, 1), "backlog_end": last["backlog"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=500, help="producer rate, jobs/s")
    ap.add_argument("--enqueue-batch", type=int, default=10)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--before", type=seconds, default=120.0, help="clean period, e.g. 2m")
    ap.add_argument("--hold", type=seconds, default=600.0, help="how long the xmin horizon is held, e.g. 10m or 30s")
    ap.add_argument("--after", type=seconds, default=120.0, help="period after the release")
    ap.add_argument("--interval", type=seconds, default=10.0, help="seconds per report line")
    ap.add_argument("--pgstattuple-every", type=int, default=3,
                    help="run pgstattuple (a full read of job_queue) every Nth report line; 0: never")
    ap.add_argument("--name", default="soak_xmin", help="cluster directory /tmp/queue_ext_<name>")
    ap.add_argument("--port", type=int, default=25561)
    args = ap.parse_args()
    cluster = Cluster(args.name, args.port, [])
    cluster.start(fresh=True)
    try:
        run(args, cluster)
    finally:
        cluster.stop()


def run(args, cluster):
    dsn = cluster.dsn
    with connect(dsn) as c:
        c.execute("CREATE EXTENSION queue_ext")
        pgstattuple = bool(c.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pgstattuple'").fetchone())
        if pgstattuple:
            c.execute("CREATE EXTENSION pgstattuple")
        settings = dict(c.execute("""SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN
            ('server_version', 'synchronous_commit', 'fsync', 'shared_buffers', 'autovacuum', 'autovacuum_naptime',
             'autovacuum_vacuum_scale_factor', 'autovacuum_vacuum_threshold', 'autovacuum_vacuum_insert_threshold',
             'idle_in_transaction_session_timeout', 'old_snapshot_threshold')""").fetchall())
        settings["queue_ext"] = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'queue_ext'").fetchone()[0]
    fresh_queue(dsn, QUEUE, notify_events=False)
    worker_dsn = as_worker(dsn)
    params = vars(args)
    print("held_xmin settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print("held_xmin run: " + ", ".join(f"{k}={v}" for k, v in params.items())
          + f", pgstattuple={'yes' if pgstattuple else 'not installed'}", flush=True)

    stop, out, enqueued = mp.Event(), mp.Queue(), mp.Value("q", 0)
    procs = [mp.Process(target=worker, args=(worker_dsn, i, stop, out)) for i in range(args.workers)]
    procs.append(mp.Process(target=producer, args=(dsn, args.rate, args.enqueue_batch, stop, enqueued)))
    for p in procs:
        p.start()
    t0 = time.time()
    hold_at, release_at, end_at = t0 + args.before, t0 + args.before + args.hold, t0 + args.before + args.hold + args.after
    holder, held_xid = None, None
    per_second = {}
    samples = []
    last_enqueued = 0
    k = 1
    print(f"\n{'t s':>6} {'phase':<7} {'done/s':>7} {'enq/s':>7} {'claim p50':>9} {'p99 ms':>7} {'empty p50':>9} "
          f"{'n_dead_tup':>10} {'pgstattuple':>11} {'MB':>6} {'backlog':>8} {'xmin age':>9}")
    with connect(dsn) as mon:
        while True:
            boundary = t0 + k * args.interval
            # The table is sampled at the boundary itself (before a hold starts or ends there);
            # the workers' buckets of the window arrive within the next second.
            sampled = None
            while time.time() < boundary + 1.2:
                now = time.time()
                if sampled is None and now >= boundary:
                    sampled = table_stats(mon, pgstattuple and args.pgstattuple_every > 0
                                          and k % args.pgstattuple_every == 0)
                if holder is None and hold_at <= now < release_at:
                    holder = psycopg.connect(dsn)  # not autocommit: the SELECT opens the transaction
                    held_xid = holder.execute("SELECT txid_current()").fetchone()[0]
                    print(f"  {now - t0:6.1f}s holding the xmin horizon: BEGIN; SELECT txid_current() -> {held_xid}; idle",
                          flush=True)
                if holder is not None and now >= release_at and not holder.closed:
                    holder.rollback()
                    holder.close()
                    print(f"  {now - t0:6.1f}s released", flush=True)
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise Failure("a worker or the producer failed")
                try:
                    sec, claims, empty, done = out.get(timeout=0.2)
                    b = per_second.setdefault(sec, ([], [], []))
                    b[0].extend(claims)
                    b[1].extend(empty)
                    b[2].extend(done)
                except queue_mod.Empty:
                    pass
            lo = boundary - args.interval
            secs = [s for s in per_second if lo <= s < boundary]
            w = {"t": round(boundary - t0), "seconds": args.interval,
                 "phase": "before" if boundary <= hold_at + 0.5 else "during" if boundary <= release_at + 0.5 else "after",
                 "_claims": [x for s in secs for x in per_second[s][0]],
                 "_empty": [x for s in secs for x in per_second[s][1]],
                 "_done": [x for s in secs for x in per_second[s][2]]}
            for s in secs:
                del per_second[s]
            w["completed"] = len(w["_done"])
            now_enq = enqueued.value
            w["enqueued"], last_enqueued = now_enq - last_enqueued, now_enq
            w.update(sampled)
            w.update(claim_p50_ms=pct(w["_claims"], 0.5), claim_p99_ms=pct(w["_claims"], 0.99),
                     empty_claim_p50_ms=pct(w["_empty"], 0.5))
            samples.append(w)
            print(f"{w['t']:>6} {w['phase']:<7} {w['completed'] / args.interval:>7.0f} {w['enqueued'] / args.interval:>7.0f} "
                  f"{ms(w['claim_p50_ms']):>9} {ms(w['claim_p99_ms']):>7} {ms(w['empty_claim_p50_ms']):>9} "
                  f"{w['n_dead_tup']:>10,} {count(w.get('pgstattuple_dead')):>11} {w['total_bytes'] / 2**20:>6.1f} "
                  f"{w['backlog']:>8,} {w['oldest_xmin_age'] or 0:>9,}", flush=True)
            k += 1
            if boundary >= end_at - 0.5:
                break
    stop.set()
    for p in procs:
        p.join(30)
    if holder is not None and not holder.closed:
        holder.close()

    phases = [summarize([w for w in samples if w["phase"] == p], p) for p in ("before", "during", "after")]
    during = [w for w in samples if w["phase"] == "during"]
    last_min = during[-max(1, int(60 / args.interval)):]
    phases.append(summarize(last_min, "during, last minute") if during else None)
    phases = [p for p in phases if p]
    cols = [("phase", "{}"), ("seconds", "{:.0f}"), ("completed_per_s", "{:,.0f}"), ("enqueued_per_s", "{:,.0f}"),
            ("claim_p50_ms", "{}"), ("claim_p99_ms", "{}"), ("empty_claim_p50_ms", "{}"),
            ("complete_p50_ms", "{}"), ("complete_p99_ms", "{}"), ("n_dead_tup_max", "{:,}"),
            ("pgstattuple_dead_max", "{:,}"), ("n_dead_tup_end", "{:,}"), ("pgstattuple_dead_last", "{:,}"),
            ("total_mb_end", "{}"), ("backlog_end", "{:,}")]
    print("\n| " + " | ".join(c for c, _ in cols) + " |\n|" + "---|" * len(cols))
    for p in phases:
        print("| " + " | ".join("-" if p[c] is None else f.format(p[c]) for c, f in cols) + " |")
    for w in samples:
        for key in ("_claims", "_empty", "_done"):
            del w[key]
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    path = results / f"held-xmin-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"settings": settings, "params": params, "pgstattuple": pgstattuple,
                                "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
                                "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
                                "held_xid": held_xid, "phases": phases, "samples": samples}, indent=2, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        print(f"HELD_XMIN FAILURE: {e}", file=sys.stderr)
        sys.exit(1)
