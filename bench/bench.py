"""The queue_ext benchmark. Run through bench/run.sh, which starts a throwaway cluster.

Workloads (fixed job counts, tiny JSON payloads, no-op work), each cell repeated and
interleaved, reported as median and range:
  enqueue      one job per call from 1 and 4 connections; batches of 1,000
  drain        claim+complete one job per call with 1, 4 and 8 workers; complete_and_get_next;
               batches of 100; the unbatched drain with row level security off, to show what
               RLS costs a claim. Drain workers log in as an ordinary queue_ext_worker role.
  latency      an idle worker woken by LISTEN queue_ext_events; enqueue -> claim p50/p95/p99
  webhooks     jobs delivered by the background dispatcher to a local sink: delivered/s,
               enqueue -> request p50/p99, lost and duplicated counted at the sink
  floor        raw SQL with pgbench on a plain table (INSERT; UPDATE ... SKIP LOCKED; DELETE),
               1 and 4 clients, fixed transaction counts: what Postgres itself allows on this
               machine; the queue's cells are then printed as a % of it
Every drain checks that each job was processed exactly once. --quick: small counts, one
repetition, correctness only (the test suite's smoke test): exits 1 if any check fails,
never asserts on speed."""
import argparse
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field, asdict
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"


@dataclass
class Cell:
    workload: str
    variant: str
    unit: str
    values: list = field(default_factory=list)

    def summary(self):
        v = sorted(self.values)
        return statistics.median(v), v[0], v[-1]


@dataclass
class Counts:
    """Jobs per cell, by workload."""
    enqueue: int          # one per call, shared among the connections
    enqueue_batch: int
    enqueue_batched: int
    drain: int            # pre-filled, then claimed and completed one at a time
    drain_batched: int    # the same, 100 per claim
    latency: int
    webhooks: int
    webhooks_paced: int
    floor: int            # pgbench transactions per script, shared among the clients

    @staticmethod
    def full():
        return Counts(5_000, 1_000, 50_000, 5_000, 30_000, 500, 10_000, 200, 4_000)

    @staticmethod
    def quick():
        return Counts(200, 100, 1_000, 400, 1_000, 30, 300, 20, 200)


class Failure(Exception):
    pass


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


WORKER_ROLE = "bench_worker"


def as_worker(dsn):
    """The DSN of an ordinary worker: a login role with queue_ext_worker, not a superuser."""
    with connect(dsn) as c:
        if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [WORKER_ROLE]).fetchone():
            c.execute(f"CREATE ROLE {WORKER_ROLE} LOGIN IN ROLE queue_ext_worker")
    return f"{dsn} user={WORKER_ROLE}"


def fresh_queue(dsn, name, **settings):
    with connect(dsn) as c:
        c.execute("SELECT queue_ext.drop_queue(q.queue_name, force => true) FROM queue_ext.queues q WHERE q.queue_name = %s", [name])
        c.execute("DELETE FROM queue_ext.job_archive WHERE queue_name = %s", [name])
        c.execute("DELETE FROM queue_ext.job_status_history WHERE queue_name = %s", [name])
        named = "".join(f", {k} => %s" for k in settings)
        c.execute(f"SELECT queue_ext.create_queue(%s{named})", [name, *settings.values()])
        c.execute("VACUUM ANALYZE queue_ext.job_queue")


def prefill(dsn, queue, n):
    with connect(dsn) as c:
        for start in range(0, n, 5000):
            c.execute("SELECT count(*) FROM queue_ext.enqueue_jobs(%s, array_fill('{\"n\":1}'::jsonb, ARRAY[%s]))",
                      [queue, min(5000, n - start)])
        c.execute("ANALYZE queue_ext.job_queue")


# --- workers (separate processes, so the client is not the bottleneck)

def enqueue_worker(dsn, queue, n, batch, start):
    with connect(dsn) as c:
        start.wait(timeout=60)
        if batch == 1:
            for _ in range(n):
                c.execute("SELECT queue_ext.enqueue_job(%s, '{\"n\":1}')", [queue], prepare=True)
        else:
            for _ in range(n // batch):
                c.execute("SELECT count(*) FROM queue_ext.enqueue_jobs(%s, array_fill('{\"n\":1}'::jsonb, ARRAY[%s]))",
                          [queue, batch], prepare=True)


def drain_worker(dsn, queue, batch, start, out):
    done = 0
    with connect(dsn) as c:
        start.wait(timeout=60)
        me = f"bench-{os.getpid()}"
        row = None
        while True:
            if batch == 0:  # complete_and_get_next: one round trip and one commit per job
                if row is None:
                    row = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s, %s)", [queue, me], prepare=True).fetchone()
                    if row is None:
                        break
                row = c.execute("SELECT job_id, lease_token FROM queue_ext.complete_and_get_next(%s, %s, NULL, %s, %s)",
                                [row[0], queue, row[1], me], prepare=True).fetchone()
                done += 1
            elif batch == 1:
                row = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s, %s)", [queue, me], prepare=True).fetchone()
                if row is None:
                    break
                c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", row, prepare=True)
                done += 1
            else:
                with c.transaction():
                    rows = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_jobs(%s, %s, %s)",
                                     [queue, batch, me], prepare=True).fetchall()
                    if not rows:
                        break
                    c.execute("SELECT count(*) FROM queue_ext.complete_jobs(%s::uuid[], %s::uuid[])",
                              [[r[0] for r in rows], [r[1] for r in rows]], prepare=True)
                done += len(rows)
    out.put(done)


def run_procs(target, args_list):
    """Starts one process per args, waits until each has connected, then times them all."""
    start = mp.Barrier(len(args_list) + 1)
    out = mp.Queue()
    procs = [mp.Process(target=target, args=(*args, start, out) if target is drain_worker else (*args, start))
             for args in args_list]
    for p in procs:
        p.start()
    start.wait(timeout=60)  # every worker is connected
    t0 = time.perf_counter()
    counts = []
    while target is drain_worker and len(counts) < len(procs):
        try:
            counts.append(out.get(timeout=1))  # before join: a process with queued output cannot exit
        except queue_mod.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in procs):
        raise Failure(f"{target.__name__} worker failed")
    return elapsed, counts


def check_exactly_once(dsn, queue, expected):
    with connect(dsn) as c:
        live = c.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0]
        done, distinct = c.execute("SELECT count(*), count(DISTINCT id) FROM queue_ext.job_archive WHERE queue_name = %s AND status = 'completed'", [queue]).fetchone()
        dead = c.execute("SELECT count(*) FROM queue_ext.job_dead_letter WHERE queue_name = %s", [queue]).fetchone()[0]
        twice = c.execute("""SELECT count(*) FROM (SELECT job_id FROM queue_ext.job_status_history
                             WHERE queue_name = %s AND to_status = 'completed' GROUP BY job_id HAVING count(*) > 1) d""",
                          [queue]).fetchone()[0]
    if live or dead or done != expected or distinct != expected or twice:
        raise Failure(f"{queue}: {live} left, {dead} dead, {done} completed ({distinct} distinct), "
                      f"{twice} completed twice; expected {expected}")


def bench_enqueue(dsn, conns, batch, n):
    queue = "bench_enqueue"
    fresh_queue(dsn, queue, notify_events=False)
    per = n // conns
    elapsed, _ = run_procs(enqueue_worker, [(dsn, queue, per, batch)] * conns)
    with connect(dsn) as c:
        got = c.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0]
    if got != per * conns:
        raise Failure(f"enqueue: {got} jobs stored, {per * conns} sent")
    return per * conns / elapsed


def bench_drain(dsn, workers, batch, n, rls=True):
    queue = "bench_drain"
    fresh_queue(dsn, queue, notify_events=False)
    prefill(dsn, queue, n)
    with connect(dsn) as c:
        c.execute(f"ALTER TABLE queue_ext.job_queue {'ENABLE' if rls else 'DISABLE'} ROW LEVEL SECURITY")
    try:
        elapsed, counts = run_procs(drain_worker, [(as_worker(dsn), queue, batch)] * workers)
    finally:
        with connect(dsn) as c:
            c.execute("ALTER TABLE queue_ext.job_queue ENABLE ROW LEVEL SECURITY")
    if sum(counts) != n:
        raise Failure(f"drain: workers processed {sum(counts)} of {n}")
    check_exactly_once(dsn, queue, n)
    return n / elapsed


def latency_listener(dsn, queue, n, ready, out):
    """An idle worker: sleeps in LISTEN, claims when an event says a job was queued."""
    lat = []
    with connect(dsn) as listen, connect(dsn) as work:
        listen.execute("LISTEN queue_ext_events")
        ready.set()
        while len(lat) < n:
            for note in listen.notifies(timeout=5, stop_after=1):
                ev = json.loads(note.payload)
                if ev["status"] != "queued" or ev["queue"] != queue:
                    continue
                row = work.execute("SELECT payload, job_id, lease_token FROM queue_ext.get_next_job(%s, 'idle')",
                                   [queue], prepare=True).fetchone()
                if row:
                    lat.append(time.time() - row[0]["t0"])
                    work.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [row[1], row[2]], prepare=True)
    out.put(lat)


def bench_latency(dsn, n):
    queue = "bench_latency"
    fresh_queue(dsn, queue)
    ready, out = mp.Event(), mp.Queue()
    p = mp.Process(target=latency_listener, args=(dsn, queue, n, ready, out))
    p.start()
    ready.wait(10)
    with connect(dsn) as c:
        for _ in range(n):
            c.execute("SELECT queue_ext.enqueue_job(%s, jsonb_build_object('t0', %s::float8))", [queue, time.time()], prepare=True)
            time.sleep(0.003)
    lat = sorted(out.get(timeout=60))
    p.join()
    check_exactly_once(dsn, queue, n)
    return percentiles(lat)


def percentiles(values):
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))] * 1000
    return {"p50_ms": pick(0.50), "p95_ms": pick(0.95), "p99_ms": pick(0.99)}


def sink_stats(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__stats") as r:
        return json.loads(r.read())


def bench_webhooks(dsn, sink_port, n, paced=False):
    queue = "bench_hooks"
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{sink_port}/__reset", method="POST")).read()
    fresh_queue(dsn, queue, notify_events=False, webhook_url=f"http://127.0.0.1:{sink_port}/hook",
                webhook_max_in_flight=1000)
    t0 = time.perf_counter()
    with connect(dsn) as c:
        if paced:  # one at a time, idle dispatcher: latency
            for _ in range(n):
                c.execute("SELECT queue_ext.enqueue_job(%s, jsonb_build_object('t0', %s::float8))", [queue, time.time()], prepare=True)
                time.sleep(0.005)
        else:      # a burst, committed in batches of 500: throughput
            for start in range(0, n, 500):
                c.execute("""SELECT count(*) FROM queue_ext.enqueue_jobs(%s,
                               array_fill(jsonb_build_object('t0', extract(epoch FROM clock_timestamp())), ARRAY[%s]))""",
                          [queue, min(500, n - start)])
        deadline = time.time() + 120
        while c.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0]:
            if time.time() > deadline:
                raise Failure("webhooks: not all delivered within 120 s")
            time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    with connect(dsn) as c:
        ours = {f"msg_{r[0]}" for r in c.execute("SELECT id FROM queue_ext.job_archive WHERE queue_name = %s", [queue])}
    arrivals = {k: v for k, v in sink_stats(sink_port).items() if k in ours}
    lost = n - len(arrivals)
    dup = sum(len(v) - 1 for v in arrivals.values())
    check_exactly_once(dsn, queue, n)
    if lost:
        raise Failure(f"webhooks: {lost} of {n} never reached the sink")
    lat = [v[0][0] - v[0][1] for v in arrivals.values() if v[0][1]]
    return {"per_s": n / elapsed, "lost": lost, "duplicated": dup, **percentiles(lat)}


def bench_webhooks_beside_slow(dsn, sink_port, n):
    """Fast-queue throughput while another queue's endpoint takes 5 s per request."""
    slow = "bench_slow"
    fresh_queue(dsn, slow, notify_events=False, webhook_url=f"http://127.0.0.1:{sink_port}/slow",
                webhook_max_in_flight=50, webhook_timeout="30 seconds")
    with connect(dsn) as c:
        c.execute("SELECT count(*) FROM queue_ext.enqueue_jobs(%s, array_fill('{}'::jsonb, ARRAY[200]))", [slow])
    time.sleep(0.5)  # the slow requests are in flight
    try:
        return bench_webhooks(dsn, sink_port, n)
    finally:
        with connect(dsn) as c:
            c.execute("SELECT queue_ext.pause_queue(%s)", [slow])


FLOOR_SCRIPTS = {
    "insert": """INSERT INTO floor_q (payload) VALUES ('{"n":1}');""",
    "claim": "UPDATE floor_q SET status = 1 WHERE id = (SELECT id FROM floor_q WHERE status = 0 ORDER BY id "
             "LIMIT 1 FOR UPDATE SKIP LOCKED);",
    "delete": "DELETE FROM floor_q WHERE id = (SELECT id FROM floor_q WHERE status = 1 ORDER BY id "
              "LIMIT 1 FOR UPDATE SKIP LOCKED);",
}


def pgbench_floor(port, clients, per_client):
    """Raw SQL on a plain table with pgbench: what Postgres itself allows on this machine.
    A fixed number of transactions per client (not a duration), and each claim and delete
    is checked to have found a row: an UPDATE/DELETE that matches nothing commits without
    writing WAL and would inflate the figure."""
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "postgres"}

    def psql(sql):
        res = subprocess.run(["psql", "-qAtX", "-v", "ON_ERROR_STOP=1", "-c", sql, "postgres"],
                             env=env, check=True, capture_output=True, text=True)
        return res.stdout.strip()

    psql("DROP TABLE IF EXISTS floor_q")
    psql("CREATE TABLE floor_q (id bigserial PRIMARY KEY, status int NOT NULL DEFAULT 0, payload jsonb)")
    psql("CREATE INDEX ON floor_q (id) WHERE status = 0")
    psql("CREATE INDEX ON floor_q (id) WHERE status = 1")
    total = clients * per_client
    out = {}
    for name in ("insert", "claim", "delete"):
        f = Path(f"/tmp/queue_ext_floor_{name}.sql")
        f.write_text(FLOOR_SCRIPTS[name] + "\n")
        f.chmod(0o644)
        psql("VACUUM ANALYZE floor_q")
        res = subprocess.run([PGBENCH, "-n", "-c", str(clients), "-j", str(clients), "-t", str(per_client),
                              "-f", str(f), "postgres"], env=env, capture_output=True, text=True, check=True)
        tps = [float(line.split("=")[1].split()[0]) for line in res.stdout.splitlines() if line.startswith("tps")]
        out[name] = tps[0]
        # The inserts made `total` rows; the claims must have marked each, the deletes removed each.
        queued, claimed = map(int, psql("SELECT count(*) FILTER (WHERE status = 0), "
                                        "count(*) FILTER (WHERE status = 1) FROM floor_q").split("|"))
        want = {"insert": (total, 0), "claim": (0, total), "delete": (0, 0)}[name]
        if (queued, claimed) != want:
            raise Failure(f"floor {name}: {queued} queued, {claimed} claimed rows; expected {want}")
    # One job's life is one of each; the floor for a full cycle is their harmonic combination.
    out["cycle"] = 1 / sum(1 / out[k] for k in ("insert", "claim", "delete"))
    out["claim_plus_delete"] = 1 / (1 / out["claim"] + 1 / out["delete"])
    return out


def print_vs_floor(cells):
    """The queue's figures as a share of the raw-SQL floor with as many connections."""
    def median(workload, variant):
        cell = cells.get((workload, variant))
        return cell.summary()[0] if cell else None

    rows = []
    for c in (1, 4):
        floor_insert = median("floor", f"pgbench insert, {c} client(s)")
        floor_drain = median("floor", f"pgbench claim_plus_delete, {c} client(s)")
        pairs = [(f"enqueue, 1 per call, {c} connection(s)", median("enqueue", f"1 per call, {c} connection(s)"),
                  "INSERT", floor_insert),
                 (f"drain, claim+complete, {c} worker(s)", median("drain", f"claim+complete, {c} worker(s)"),
                  "UPDATE SKIP LOCKED + DELETE", floor_drain),
                 (f"drain, complete_and_get_next, {c} worker(s)", median("drain", f"complete_and_get_next, {c} worker(s)"),
                  "UPDATE SKIP LOCKED + DELETE", floor_drain)]
        rows += [(name, value, ref, floor) for name, value, ref, floor in pairs if value and floor]
    if rows:
        print("\n| queue_ext cell | jobs/s | raw SQL floor, same connections | ops/s | % of floor |\n|---|---:|---|---:|---:|")
        for name, value, ref, floor in rows:
            print(f"| {name} | {value:,.1f} | {ref} | {floor:,.1f} | {100 * value / floor:.0f}% |")


def settings(dsn):
    with connect(dsn) as c:
        names = ("shared_buffers", "synchronous_commit", "max_connections", "fsync", "wal_level")
        rows = {n: c.execute("SELECT current_setting(%s)", [n]).fetchone()[0] for n in names}
        rows["server_version"] = c.execute("SHOW server_version").fetchone()[0]
        rows["queue_ext"] = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'queue_ext'").fetchone()[0]
    rows["cpus"] = os.cpu_count()
    rows["loadavg_1m_at_start"] = os.getloadavg()[0]  # other load on the machine skews every figure
    rows["machine"] = platform.machine()
    rows["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sink-port", type=int, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="enqueue,drain,latency,webhooks,floor",
                    help="comma-separated workloads to run")
    args = ap.parse_args()
    only = set(args.only.split(","))
    quick = args.quick
    reps = 1 if quick else args.reps
    # Fixed job counts per workload (each cell of a workload uses the same count).
    n = Counts.quick() if quick else Counts.full()

    info = settings(args.dsn)
    print("# queue_ext benchmark")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"job counts: {asdict(n)}; {reps} round(s), cells interleaved", flush=True)
    cells: dict[tuple, Cell] = {}

    def record(workload, variant, unit, value):
        cells.setdefault((workload, variant), Cell(workload, variant, unit)).values.append(value)
        print(f"  {workload:<10} {variant:<44} {value:>10.1f} {unit}", flush=True)

    extra = {}
    for rep in range(reps):
        print(f"round {rep + 1}/{reps}")
        if "enqueue" in only:
            for c in (1, 4):
                record("enqueue", f"1 per call, {c} connection(s)", "jobs/s", bench_enqueue(args.dsn, c, 1, n.enqueue))
            record("enqueue", f"batches of {n.enqueue_batch:,}", "jobs/s",
                   bench_enqueue(args.dsn, 1, n.enqueue_batch, n.enqueue_batched))
        if "drain" in only:
            for w in (1, 4, 8):
                record("drain", f"claim+complete, {w} worker(s)", "jobs/s", bench_drain(args.dsn, w, 1, n.drain))
            for w in (1, 4):  # the same drain with row level security off (what RLS costs a claim)
                record("drain", f"claim+complete, {w} worker(s), RLS off", "jobs/s",
                       bench_drain(args.dsn, w, 1, n.drain, rls=False))
            for w in (1, 4):
                record("drain", f"complete_and_get_next, {w} worker(s)", "jobs/s", bench_drain(args.dsn, w, 0, n.drain))
            for w in (1, 4):
                record("drain", f"batches of 100, {w} worker(s)", "jobs/s", bench_drain(args.dsn, w, 100, n.drain_batched))
        if "latency" in only:
            lat = bench_latency(args.dsn, n.latency)
            for k, v in lat.items():
                record("latency", f"idle enqueue->claim {k}", "ms", v)
        if "webhooks" in only:
            hooks = bench_webhooks(args.dsn, args.sink_port, n.webhooks)
            record("webhooks", "delivered per second", "jobs/s", hooks["per_s"])
            extra.setdefault("webhook_burst", []).append(hooks)
            beside = bench_webhooks_beside_slow(args.dsn, args.sink_port, n.webhooks)
            record("webhooks", "delivered/s beside a 5 s endpoint", "jobs/s", beside["per_s"])
            paced = bench_webhooks(args.dsn, args.sink_port, n.webhooks_paced, paced=True)
            for k in ("p50_ms", "p99_ms"):
                record("webhooks", f"idle enqueue->request {k}", "ms", paced[k])
        if "floor" in only:
            for c in (1, 4):
                floor = pgbench_floor(args.port, c, n.floor // c)
                extra.setdefault(f"floor_{c}", []).append(floor)
                for k, v in floor.items():
                    record("floor", f"pgbench {k}, {c} client(s)", "ops/s", v)

    print("\n| workload | variant | median | range | unit |\n|---|---|---:|---:|---|")
    for cell in cells.values():
        med, lo, hi = cell.summary()
        print(f"| {cell.workload} | {cell.variant} | {med:,.1f} | {lo:,.1f} – {hi:,.1f} | {cell.unit} |")
    print_vs_floor(cells)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    out = results / f"{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if quick else ''}.json"
    out.write_text(json.dumps({"settings": info, "counts": asdict(n), "reps": reps, "cells": [asdict(c) for c in cells.values()], "extra": extra}, indent=2))
    print(f"\nwrote {out}")
    print("correctness: every drain processed each job exactly once; webhooks: none lost")


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        print(f"CORRECTNESS FAILURE: {e}", file=sys.stderr)
        sys.exit(1)
