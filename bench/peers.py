"""queue_ext side by side with pgmq and graphile-worker: same cluster, same run, same client.

    bash bench/peers.sh [--reps N] [--quick]

Each system has its own database on one throwaway cluster. Cells (no-op jobs, tiny payloads):
  enqueue   one per call from 1 and 4 connections; batches of 1,000
  drain     4 workers, one job per claim + complete (pgmq: read 1 + delete; graphile-worker:
            its own Node worker, concurrency 4); and batches of 100 (pgmq: read 100 + delete
            the array; graphile-worker: localQueue of 100; queue_ext: get_next_jobs 100 +
            complete_jobs)
  latency   an idle worker, jobs enqueued one at a time: enqueue -> start p50/p99
            (queue_ext: LISTEN queue_ext_events; graphile-worker: its LISTEN-based worker;
            pgmq has no wake-up of its own, so it has no cell)
Systems run interleaved within each round (A B C A B C); medians and ranges; every drain
checks that each job was processed exactly once.
"""
import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import time
from pathlib import Path

import psycopg

import bench as qe  # the queue_ext cells

HERE = Path(__file__).resolve().parent
NODE_SCRIPT = HERE / "peers" / "graphile.mjs"


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


# --- pgmq: its plain-SQL install (pgmq.sql, from the pgmq crate's embedded scripts)

def pgmq_fresh(dsn, q):
    with connect(dsn) as c:
        c.execute("SELECT pgmq.drop_queue(queue_name) FROM pgmq.list_queues() WHERE queue_name = %s", [q])
        c.execute("SELECT pgmq.create(%s)", [q])


def pgmq_enqueue_worker(dsn, q, n, batch, start):
    with connect(dsn) as c:
        start.wait(timeout=60)
        if batch == 1:
            for _ in range(n):
                c.execute("SELECT pgmq.send(%s, '{\"n\":1}'::jsonb)", [q], prepare=True)
        else:
            for _ in range(n // batch):
                c.execute("SELECT count(*) FROM pgmq.send_batch(%s, array_fill('{\"n\":1}'::jsonb, ARRAY[%s]))",
                          [q, batch], prepare=True)


def pgmq_drain_worker(dsn, q, batch, start, out):
    done = 0
    with connect(dsn) as c:
        start.wait(timeout=60)
        while True:
            ids = [r[0] for r in c.execute("SELECT msg_id FROM pgmq.read(%s, 30, %s)", [q, batch], prepare=True)]
            if not ids:
                break
            if batch == 1:
                c.execute("SELECT pgmq.delete(%s, %s::bigint)", [q, ids[0]], prepare=True)
            else:
                c.execute("SELECT count(*) FROM pgmq.delete(%s, %s::bigint[])", [q, ids], prepare=True)
            done += len(ids)
    out.put(done)


def run_procs(target, args_list, drain):
    start, out = mp.Barrier(len(args_list) + 1), mp.Queue()
    procs = [mp.Process(target=target, args=(*a, start, out) if drain else (*a, start)) for a in args_list]
    for p in procs:
        p.start()
    start.wait(timeout=60)
    t0 = time.perf_counter()
    counts = [out.get(timeout=600) for _ in procs] if drain else []
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in procs):
        raise qe.Failure(f"{target.__name__} failed")
    return elapsed, counts


def pgmq_enqueue(dsn, conns, batch, n):
    q = "bench_enqueue"
    pgmq_fresh(dsn, q)
    per = n // conns
    elapsed, _ = run_procs(pgmq_enqueue_worker, [(dsn, q, per, batch)] * conns, False)
    with connect(dsn) as c:
        got = c.execute("SELECT count(*) FROM pgmq.q_bench_enqueue").fetchone()[0]
    if got != per * conns:
        raise qe.Failure(f"pgmq enqueue: {got} stored of {per * conns}")
    return per * conns / elapsed


def pgmq_drain(dsn, workers, batch, n):
    q = "bench_drain"
    pgmq_fresh(dsn, q)
    with connect(dsn) as c:
        for s in range(0, n, 5000):
            c.execute("SELECT count(*) FROM pgmq.send_batch(%s, array_fill('{\"n\":1}'::jsonb, ARRAY[%s]))",
                      [q, min(5000, n - s)])
        c.execute("ANALYZE pgmq.q_bench_drain")
    elapsed, counts = run_procs(pgmq_drain_worker, [(dsn, q, batch)] * workers, True)
    with connect(dsn) as c:
        left = c.execute("SELECT count(*) FROM pgmq.q_bench_drain").fetchone()[0]
    if sum(counts) != n or left:
        raise qe.Failure(f"pgmq drain: {sum(counts)} processed of {n}, {left} left")
    return n / elapsed


# --- graphile-worker: SQL add_job / add_jobs, and its own Node worker

def gw_fresh(dsn):
    with connect(dsn) as c:
        c.execute("DELETE FROM graphile_worker._private_jobs")


def gw_enqueue_worker(dsn, n, batch, start):
    with connect(dsn) as c:
        start.wait(timeout=60)
        if batch == 1:
            for _ in range(n):
                c.execute("SELECT graphile_worker.add_job('noop', '{\"n\":1}'::json)", prepare=True)
        else:
            for _ in range(n // batch):
                c.execute("""SELECT count(*) FROM graphile_worker.add_jobs(
                               (SELECT array_agg(ROW('noop', '{"n":1}'::json, NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec)
                                FROM generate_series(1, %s)))""", [batch], prepare=True)


def gw_count(dsn):
    with connect(dsn) as c:
        return c.execute("SELECT count(*) FROM graphile_worker._private_jobs").fetchone()[0]


def gw_enqueue(dsn, conns, batch, n):
    gw_fresh(dsn)
    per = n // conns
    elapsed, _ = run_procs(gw_enqueue_worker, [(dsn, per, batch)] * conns, False)
    got = gw_count(dsn)
    if got != per * conns:
        raise qe.Failure(f"graphile enqueue: {got} stored of {per * conns}")
    gw_fresh(dsn)
    return per * conns / elapsed


def node(*args):
    r = subprocess.run(["node", str(NODE_SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise qe.Failure(f"graphile.mjs {args[0]} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def gw_drain(dsn, url, workers, batch, n):
    gw_fresh(dsn)
    with connect(dsn) as c:
        for s in range(0, n, 5000):
            c.execute("""SELECT count(*) FROM graphile_worker.add_jobs(
                           (SELECT array_agg(ROW('noop', '{"n":1}'::json, NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec)
                            FROM generate_series(1, %s)))""", [min(5000, n - s)])
    r = node("drain", url, workers, n, batch)
    if r["processed"] != n or r["twice"] or r["left"]:
        raise qe.Failure(f"graphile drain: {r}")
    return r["per_s"]


def qe_drain_batched(dsn, workers, n):
    return qe.bench_drain(dsn, workers, 100, n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    dsn = lambda db: f"host={a.host} port={a.port} user=postgres dbname={db}"
    url = lambda db: f"postgres://postgres@{a.host}:{a.port}/{db}"
    QE, PGMQ, GW = dsn("qe_bench"), dsn("pgmq_bench"), dsn("graphile_bench")
    n_enq, n_batch, n_drain, n_drain_b, n_lat = (300, 2000, 400, 2000, 30) if a.quick else (3000, 50000, 5000, 30000, 300)
    reps = 1 if a.quick else a.reps
    cells = {}

    def record(system, cell, value):
        cells.setdefault((cell, system), []).append(value)
        print(f"  {system:15s} {cell:45s} {value:10.1f}", flush=True)

    for rep in range(reps):
        print(f"round {rep + 1}", flush=True)
        for conns in (1, 4):
            record("queue_ext", f"enqueue 1 per call, {conns} conn", qe.bench_enqueue(QE, conns, 1, n_enq))
            record("pgmq", f"enqueue 1 per call, {conns} conn", pgmq_enqueue(PGMQ, conns, 1, n_enq))
            record("graphile-worker", f"enqueue 1 per call, {conns} conn", gw_enqueue(GW, conns, 1, n_enq))
        record("queue_ext", "enqueue batches of 1,000, 1 conn", qe.bench_enqueue(QE, 1, 1000, n_batch))
        record("pgmq", "enqueue batches of 1,000, 1 conn", pgmq_enqueue(PGMQ, 1, 1000, n_batch))
        record("graphile-worker", "enqueue batches of 1,000, 1 conn", gw_enqueue(GW, 1, 1000, n_batch))
        for workers in (1, 4):
            record("queue_ext", f"drain 1 per claim, {workers} workers", qe.bench_drain(QE, workers, 1, n_drain))
            record("pgmq", f"drain 1 per claim, {workers} workers", pgmq_drain(PGMQ, workers, 1, n_drain))
            record("graphile-worker", f"drain 1 per claim, {workers} workers", gw_drain(GW, url("graphile_bench"), workers, 1, n_drain))
        record("queue_ext", "drain 1 per call, complete_and_get_next, 4 workers", qe.bench_drain(QE, 4, 0, n_drain))
        record("queue_ext", "drain batches of 100, 4 workers", qe.bench_drain(QE, 4, 100, n_drain_b))
        record("pgmq", "drain batches of 100, 4 workers", pgmq_drain(PGMQ, 4, 100, n_drain_b))
        record("graphile-worker", "drain batches of 100, 4 workers", gw_drain(GW, url("graphile_bench"), 4, 100, n_drain_b))
        lat = qe.bench_latency(QE, n_lat)
        record("queue_ext", "idle latency p50 ms", lat["p50_ms"])
        record("queue_ext", "idle latency p99 ms", lat["p99_ms"])
        lat = node("latency", url("graphile_bench"), n_lat)
        record("graphile-worker", "idle latency p50 ms", lat["p50_ms"])
        record("graphile-worker", "idle latency p99 ms", lat["p99_ms"])

    systems = ["queue_ext", "pgmq", "graphile-worker"]
    order = list(dict.fromkeys(cell for cell, _ in cells))
    print()
    print("| cell | " + " | ".join(systems) + " |")
    print("|---|" + "---:|" * len(systems))
    for cell in order:
        row = []
        for s in systems:
            v = cells.get((cell, s))
            row.append("—" if not v else f"{statistics.median(v):,.1f}" + (f" ({min(v):,.0f}–{max(v):,.0f})" if len(v) > 1 else ""))
        print(f"| {cell} | " + " | ".join(row) + " |")
    out = HERE / "results" / f"peers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({f"{c} | {s}": v for (c, s), v in cells.items()}, indent=1))
    print(f"\nwrote {out}\ncorrectness: every drain of every system processed each job exactly once")


if __name__ == "__main__":
    main()
