"""The queue_ext benchmark. Run through bench/run.sh, which starts a throwaway cluster.

Workloads (fixed job counts, tiny JSON payloads, no-op work), each cell repeated and
interleaved, reported as median and range:
  enqueue      one job per call from 1 and 4 connections; batches of 1,000
  drain        claim+complete one job per call with 1, 4 and 8 workers; batches of 100;
               the unbatched drain with row level security off, to show what RLS costs
  latency      an idle worker woken by LISTEN queue_ext_events; enqueue -> claim p50/p95/p99
  webhooks     jobs delivered by the background dispatcher to a local sink: delivered/s,
               enqueue -> request p50/p99, lost and duplicated counted at the sink
  floor        raw SQL with pgbench (INSERT; UPDATE ... SKIP LOCKED; DELETE), what Postgres
               itself allows on this machine
Every drain checks that each job was processed exactly once. --quick: small counts, one
repetition, correctness only (the test suite's smoke test)."""
import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field, asdict
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent


@dataclass
class Cell:
    workload: str
    variant: str
    unit: str
    values: list = field(default_factory=list)

    def summary(self):
        v = sorted(self.values)
        return statistics.median(v), v[0], v[-1]


class Failure(Exception):
    pass


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


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

def enqueue_worker(dsn, queue, n, batch, start_evt):
    with connect(dsn) as c:
        start_evt.wait()
        if batch == 1:
            for _ in range(n):
                c.execute("SELECT queue_ext.enqueue_job(%s, '{\"n\":1}')", [queue], prepare=True)
        else:
            for _ in range(n // batch):
                c.execute("SELECT count(*) FROM queue_ext.enqueue_jobs(%s, array_fill('{\"n\":1}'::jsonb, ARRAY[%s]))",
                          [queue, batch], prepare=True)


def drain_worker(dsn, queue, batch, start_evt, out):
    done = 0
    with connect(dsn) as c:
        start_evt.wait()
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
                    c.execute("SELECT count(queue_ext.complete_job(j, NULL, t)) FROM unnest(%s::uuid[], %s::uuid[]) AS u(j, t)",
                              [[r[0] for r in rows], [r[1] for r in rows]], prepare=True)
                done += len(rows)
    out.put(done)


def run_procs(target, args_list):
    start_evt = mp.Event()
    out = mp.Queue()
    procs = [mp.Process(target=target, args=(*args, start_evt, out) if target is drain_worker else (*args, start_evt))
             for args in args_list]
    for p in procs:
        p.start()
    time.sleep(0.3)  # connections established
    t0 = time.perf_counter()
    start_evt.set()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in procs):
        raise Failure(f"{target.__name__} worker failed")
    counts = [out.get() for _ in procs] if target is drain_worker else []
    return elapsed, counts


def check_exactly_once(dsn, queue, expected):
    with connect(dsn) as c:
        live = c.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0]
        done, distinct = c.execute("SELECT count(*), count(DISTINCT id) FROM queue_ext.job_archive WHERE queue_name = %s AND status = 'completed'", [queue]).fetchone()
        twice = c.execute("""SELECT count(*) FROM (SELECT job_id FROM queue_ext.job_status_history
                             WHERE queue_name = %s AND to_status = 'completed' GROUP BY job_id HAVING count(*) > 1) d""",
                          [queue]).fetchone()[0]
    if live or done != expected or distinct != expected or twice:
        raise Failure(f"{queue}: {live} left, {done} completed ({distinct} distinct), {twice} completed twice; expected {expected}")


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
        elapsed, counts = run_procs(drain_worker, [(dsn, queue, batch)] * workers)
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


def pgbench_floor(port, clients, seconds):
    scripts = {
        "insert": "INSERT INTO floor_q (payload) VALUES ('{\"n\":1}');",
        "claim": "UPDATE floor_q SET status = 1 WHERE id = (SELECT id FROM floor_q WHERE status = 0 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id;",
        "delete": "DELETE FROM floor_q WHERE id = (SELECT id FROM floor_q WHERE status = 1 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED);",
    }
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "postgres"}
    psql = lambda sql: subprocess.run(["psql", "-q", "-c", sql, "postgres"], env=env, check=True, capture_output=True)
    psql("DROP TABLE IF EXISTS floor_q; CREATE TABLE floor_q (id bigserial PRIMARY KEY, status int NOT NULL DEFAULT 0, payload jsonb)")
    psql("CREATE INDEX ON floor_q (id) WHERE status = 0; CREATE INDEX ON floor_q (id) WHERE status = 1")
    out = {}
    for name in ("insert", "claim", "delete"):
        f = Path(f"/tmp/queue_ext_floor_{name}.sql")
        f.write_text(scripts[name])
        f.chmod(0o644)
        res = subprocess.run(["/usr/lib/postgresql/15/bin/pgbench", "-n", "-c", str(clients), "-j", str(clients),
                              "-T", str(seconds), "-f", str(f), "postgres"], env=env, capture_output=True, text=True, check=True)
        tps = [float(l.split("=")[1].split()[0]) for l in res.stdout.splitlines() if l.startswith("tps")]
        out[name] = tps[0]
    # One job's life is one of each; the floor for a full cycle is their harmonic combination.
    out["cycle"] = 1 / sum(1 / out[k] for k in ("insert", "claim", "delete"))
    out["claim_plus_delete"] = 1 / (1 / out["claim"] + 1 / out["delete"])
    return out


def settings(dsn):
    with connect(dsn) as c:
        rows = dict(c.execute("""SELECT name, setting || coalesce(unit, '') FROM pg_settings
                                 WHERE name IN ('shared_buffers', 'synchronous_commit', 'max_connections', 'fsync', 'wal_level')""").fetchall())
        rows["server_version"] = c.execute("SHOW server_version").fetchone()[0]
        rows["queue_ext"] = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'queue_ext'").fetchone()[0]
    rows["cpus"] = os.cpu_count()
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
    n_enq, n_drain, n_lat, n_hooks = (400, 1_000, 50, 500) if quick else (20_000, 20_000, 1_000, 20_000)

    info = settings(args.dsn)
    print("# queue_ext benchmark")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    cells: dict[tuple, Cell] = {}

    def record(workload, variant, unit, value):
        cells.setdefault((workload, variant), Cell(workload, variant, unit)).values.append(value)
        print(f"  {workload:<10} {variant:<34} {value:>10.1f} {unit}", flush=True)

    extra = {}
    for rep in range(reps):
        print(f"round {rep + 1}/{reps}")
        if "enqueue" in only:
            record("enqueue", "1 per call, 1 connection", "jobs/s", bench_enqueue(args.dsn, 1, 1, n_enq // 2))
            record("enqueue", "1 per call, 4 connections", "jobs/s", bench_enqueue(args.dsn, 4, 1, n_enq))
            record("enqueue", "batches of 1,000", "jobs/s", bench_enqueue(args.dsn, 1, 1000 if not quick else 100, n_enq * 5))
        if "drain" in only:
            for w in (1, 4, 8):
                record("drain", f"claim+complete, {w} worker(s)", "jobs/s", bench_drain(args.dsn, w, 1, n_drain))
            record("drain", "claim+complete, 4 workers, RLS off", "jobs/s", bench_drain(args.dsn, 4, 1, n_drain, rls=False))
            for w in (1, 4):
                record("drain", f"complete_and_get_next, {w} worker(s)", "jobs/s", bench_drain(args.dsn, w, 0, n_drain))
            record("drain", "batches of 100, 4 workers", "jobs/s", bench_drain(args.dsn, 4, 100, n_drain * 5 if not quick else n_drain))
        if "latency" in only:
            lat = bench_latency(args.dsn, n_lat)
            for k, v in lat.items():
                record("latency", f"idle enqueue->claim {k}", "ms", v)
        if "webhooks" in only:
            hooks = bench_webhooks(args.dsn, args.sink_port, n_hooks)
            record("webhooks", "delivered per second", "jobs/s", hooks["per_s"])
            extra.setdefault("webhook_burst", []).append(hooks)
            beside = bench_webhooks_beside_slow(args.dsn, args.sink_port, n_hooks)
            record("webhooks", "delivered/s beside a 5 s endpoint", "jobs/s", beside["per_s"])
            paced = bench_webhooks(args.dsn, args.sink_port, 200 if not quick else 20, paced=True)
            for k in ("p50_ms", "p99_ms"):
                record("webhooks", f"idle enqueue->request {k}", "ms", paced[k])
    if not quick and "floor" in only:
        floor = pgbench_floor(args.port, 4, 10)
        extra["floor"] = floor
        for k, v in floor.items():
            record("floor", f"pgbench {k}, 4 clients", "ops/s", v)

    print("\n| workload | variant | median | range | unit |\n|---|---|---:|---:|---|")
    for cell in cells.values():
        med, lo, hi = cell.summary()
        print(f"| {cell.workload} | {cell.variant} | {med:,.1f} | {lo:,.1f} – {hi:,.1f} | {cell.unit} |")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    out = results / f"{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if quick else ''}.json"
    out.write_text(json.dumps({"settings": info, "cells": [asdict(c) for c in cells.values()], "extra": extra}, indent=2))
    print(f"\nwrote {out}")
    print("correctness: every drain processed each job exactly once; webhooks: none lost")


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        print(f"CORRECTNESS FAILURE: {e}", file=sys.stderr)
        sys.exit(1)
