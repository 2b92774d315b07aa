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
  history      the 4-worker claim+complete drain with an empty history and with 5,000,000
               finished jobs retained (job_archive + 2-3 job_status_history rows each), in two
               databases of the cluster, interleaved; reported as % of the empty-history figure
Peers, side by side in the same rounds, on the same cluster (each in its own database), driven
by the same Python client (graphile-worker's drains and latency by its own Node worker):
  pgmq             PGMQ's plain-SQL install (bench/peers/setup.sh): send / send_batch; read 1 +
                   delete (and + archive); read 100 + delete; idle latency via its
                   enable_notify_insert LISTEN channel
  graphile-worker  add_job / add_jobs from Python; its run() with concurrency 1/4/8 and a no-op
                   task; batched: its localQueue (batched claim) + batched completions; idle
                   latency with its LISTEN-based worker (bench/peers/graphile.mjs)
Within a round every cell runs each system back to back, the order rotating by round.
Every drain checks that each job was processed exactly once (queue_ext: archive + audit
trail; pgmq: every message id deleted once, or archived with read_ct 1; graphile-worker:
every job id run once and its jobs table empty). --quick: small counts, one repetition,
correctness only (the test suite's smoke test): exits 1 if any check fails, never asserts on
speed; it runs no peer and no history cell unless --only names them (then small ones)."""
import argparse
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import re
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
    system: str = "queue_ext"

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
    history_drain: int    # the history cell's drain (4 workers, one per claim)
    history_retained: int # finished jobs retained for it

    @staticmethod
    def full():
        return Counts(5_000, 1_000, 50_000, 5_000, 30_000, 1_000, 10_000, 200, 4_000, 10_000, 5_000_000)

    @staticmethod
    def quick():
        return Counts(200, 100, 1_000, 400, 1_000, 30, 300, 20, 200, 400, 20_000)


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
    """Claims and completes until the queue is empty; puts the ids it completed on `out`.
    A completion that did not take effect (stale lease, job not running) fails the run."""
    done = []
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
                done.append(row[0])  # complete_and_get_next raises unless the completion took effect
                row = c.execute("SELECT job_id, lease_token FROM queue_ext.complete_and_get_next(%s, %s, NULL, %s, %s)",
                                [row[0], queue, row[1], me], prepare=True).fetchone()
            elif batch == 1:
                row = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s, %s)", [queue, me], prepare=True).fetchone()
                if row is None:
                    break
                state = c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", row, prepare=True).fetchone()[0]
                if state != "completed":
                    raise Failure(f"complete_job returned {state}")
                done.append(row[0])
            else:
                with c.transaction():
                    rows = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_jobs(%s, %s, %s)",
                                     [queue, batch, me], prepare=True).fetchall()
                    if not rows:
                        break
                    ok = c.execute("SELECT count(*) FILTER (WHERE status = 'completed') "
                                   "FROM queue_ext.complete_jobs(%s::uuid[], %s::uuid[])",
                                   [[r[0] for r in rows], [r[1] for r in rows]], prepare=True).fetchone()[0]
                    if ok != len(rows):
                        raise Failure(f"complete_jobs completed {ok} of {len(rows)}")
                done += [r[0] for r in rows]
    out.put(done)


def run_procs(target, args_list, collect=None):
    """Starts one process per args, waits until each has connected, then times them all.
    A collecting target (a drain) also gets a queue to put its result on."""
    collect = target is drain_worker if collect is None else collect
    start = mp.Barrier(len(args_list) + 1)
    out = mp.Queue()
    procs = [mp.Process(target=target, args=(*args, start, out) if collect else (*args, start))
             for args in args_list]
    for p in procs:
        p.start()
    start.wait(timeout=60)  # every worker is connected
    t0 = time.perf_counter()
    counts = []
    while collect and len(counts) < len(procs):
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


def check_exactly_once(dsn, queue, expected, ids=None, lean=False):
    """Each job processed once: the workers' completed ids are distinct and complete (when
    given), nothing is left or dead, and (with history) the archive and the audit trail agree."""
    if ids is not None and (len(ids) != expected or len(set(ids)) != expected):
        raise Failure(f"{queue}: workers completed {len(ids)} jobs ({len(set(ids))} distinct); expected {expected}")
    if lean:
        with connect(dsn) as c:
            live, dead, kept = c.execute(
                """SELECT (SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %(q)s),
                          (SELECT count(*) FROM queue_ext.job_dead_letter WHERE queue_name = %(q)s),
                          (SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = %(q)s)""", {"q": queue}).fetchone()
        if live or dead or kept:
            raise Failure(f"{queue}: {live} left, {dead} dead, {kept} archived (keep_history is off)")
        return
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


def bench_enqueue(dsn, conns, batch, n, lean=False):
    queue = "bench_enqueue"
    fresh_queue(dsn, queue, notify_events=False, keep_history=not lean)
    per = n // conns
    elapsed, _ = run_procs(enqueue_worker, [(dsn, queue, per, batch)] * conns)
    with connect(dsn) as c:
        got = c.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0]
    if got != per * conns:
        raise Failure(f"enqueue: {got} jobs stored, {per * conns} sent")
    return per * conns / elapsed


def bench_drain(dsn, workers, batch, n, rls=True, lean=False):
    queue = "bench_drain"
    fresh_queue(dsn, queue, notify_events=False, keep_history=not lean)
    prefill(dsn, queue, n)
    with connect(dsn) as c:
        c.execute(f"ALTER TABLE queue_ext.job_queue {'ENABLE' if rls else 'DISABLE'} ROW LEVEL SECURITY")
    try:
        elapsed, counts = run_procs(drain_worker, [(as_worker(dsn), queue, batch)] * workers)
    finally:
        with connect(dsn) as c:
            c.execute("ALTER TABLE queue_ext.job_queue ENABLE ROW LEVEL SECURITY")
    ids = [i for done in counts for i in done]
    check_exactly_once(dsn, queue, n, ids, lean)
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


def bench_latency(dsn, n, lean=False):
    queue = "bench_latency"
    fresh_queue(dsn, queue, keep_history=not lean)
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
    if len(lat) != n:
        raise Failure(f"latency: {len(lat)} of {n} jobs claimed")
    check_exactly_once(dsn, queue, n, lean=lean)
    return percentiles(lat)


def percentiles(values):
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))] * 1000
    return {"p50_ms": pick(0.50), "p95_ms": pick(0.95), "p99_ms": pick(0.99)}


def sink_stats(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__stats") as r:
        return json.loads(r.read())


def bench_webhooks(dsn, sink_port, n, paced=False, lean=False):
    queue = "bench_hooks"
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{sink_port}/__reset", method="POST")).read()
    fresh_queue(dsn, queue, notify_events=False, webhook_url=f"http://127.0.0.1:{sink_port}/hook",
                webhook_max_in_flight=1000, keep_history=not lean)
    ids = []
    t0 = time.perf_counter()
    with connect(dsn) as c:
        if paced:  # one at a time, idle dispatcher: latency
            for _ in range(n):
                ids += c.execute("SELECT queue_ext.enqueue_job(%s, jsonb_build_object('t0', %s::float8))",
                                 [queue, time.time()], prepare=True).fetchone()
                time.sleep(0.005)
        else:      # a burst, committed in batches of 500: throughput
            for start in range(0, n, 500):
                ids += c.execute("""SELECT array_agg(id) FROM queue_ext.enqueue_jobs(%s,
                               array_fill(jsonb_build_object('t0', extract(epoch FROM clock_timestamp())), ARRAY[%s])) AS id""",
                                 [queue, min(500, n - start)]).fetchone()[0]
        deadline = time.time() + 120
        while c.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0]:
            if time.time() > deadline:
                raise Failure("webhooks: not all delivered within 120 s")
            time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    ours = {f"msg_{i}" for i in ids}
    arrivals = {k: v for k, v in sink_stats(sink_port).items() if k in ours}
    lost = n - len(arrivals)
    dup = sum(len(v) - 1 for v in arrivals.values())
    check_exactly_once(dsn, queue, n, lean=lean)
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


# --- pgmq: PGMQ's plain-SQL install, in its own database (bench/peers/setup.sh fetches it)

def pgmq_fresh(dsn, q, notify=False):
    with connect(dsn) as c:
        c.execute("SELECT pgmq.drop_queue(queue_name) FROM pgmq.list_queues() WHERE queue_name = %s", [q])
        c.execute("SELECT pgmq.create(%s)", [q])
        if notify:  # its LISTEN channel pgmq.q_<queue>.INSERT, one notification per send (no throttle)
            c.execute("SELECT pgmq.enable_notify_insert(%s, 0)", [q])


def pgmq_count(dsn, table):
    with connect(dsn) as c:
        return c.execute(f"SELECT count(*) FROM pgmq.{table}").fetchone()[0]


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


def pgmq_enqueue(dsn, conns, batch, n):
    q = "bench_enqueue"
    pgmq_fresh(dsn, q)
    per = n // conns
    elapsed, _ = run_procs(pgmq_enqueue_worker, [(dsn, q, per, batch)] * conns)
    got = pgmq_count(dsn, f"q_{q}")
    if got != per * conns:
        raise Failure(f"pgmq enqueue: {got} messages stored, {per * conns} sent")
    return per * conns / elapsed


def pgmq_drain_worker(dsn, q, batch, finish, start, out):
    """read (visibility timeout 30 s) then delete or archive: one per call in two autocommit
    statements like queue_ext's get_next_job + complete_job; a batch of 100 in one
    transaction like queue_ext's get_next_jobs + complete_jobs."""
    ids = []
    with connect(dsn) as c:
        start.wait(timeout=60)
        while True:
            if batch == 1:
                got = [r[0] for r in c.execute("SELECT msg_id FROM pgmq.read(%s, 30, 1)", [q], prepare=True)]
                if not got:
                    break
                if not c.execute(f"SELECT pgmq.{finish}(%s, %s::bigint)", [q, got[0]], prepare=True).fetchone()[0]:
                    raise Failure(f"pgmq {finish} of message {got[0]} found nothing")
            else:
                with c.transaction():
                    got = [r[0] for r in c.execute("SELECT msg_id FROM pgmq.read(%s, 30, %s)", [q, batch], prepare=True)]
                    if not got:
                        break
                    done = c.execute(f"SELECT count(*) FROM pgmq.{finish}(%s, %s::bigint[])", [q, got], prepare=True).fetchone()[0]
                    if done != len(got):
                        raise Failure(f"pgmq {finish}: {done} of {len(got)} messages")
            ids += got
    out.put(ids)


def pgmq_prefill(dsn, q, n):
    with connect(dsn) as c:
        for s in range(0, n, 5000):
            c.execute("SELECT count(*) FROM pgmq.send_batch(%s, array_fill('{\"n\":1}'::jsonb, ARRAY[%s]))",
                      [q, min(5000, n - s)])
        c.execute(f"ANALYZE pgmq.q_{q}")


def pgmq_drain(dsn, workers, batch, n, finish="delete"):
    q = "bench_drain"
    pgmq_fresh(dsn, q)
    pgmq_prefill(dsn, q, n)
    elapsed, per_worker = run_procs(pgmq_drain_worker, [(dsn, q, batch, finish)] * workers, collect=True)
    ids = [i for got in per_worker for i in got]
    left = pgmq_count(dsn, f"q_{q}")
    if len(ids) != n or len(set(ids)) != n or left:
        raise Failure(f"pgmq drain: {len(ids)} processed ({len(set(ids))} distinct) of {n}, {left} left")
    if finish == "archive":
        with connect(dsn) as c:
            archived, distinct, reread = c.execute(
                f"SELECT count(*), count(DISTINCT msg_id), count(*) FILTER (WHERE read_ct <> 1) FROM pgmq.a_{q}").fetchone()
        if archived != n or distinct != n or reread:
            raise Failure(f"pgmq archive: {archived} archived ({distinct} distinct, {reread} read more than once) of {n}")
    return n / elapsed


def pgmq_latency_listener(dsn, q, n, ready, out):
    """An idle pgmq consumer: sleeps in LISTEN on pgmq's insert channel, reads when woken."""
    lat, ids = [], []
    deadline = time.time() + 300
    with connect(dsn) as listen, connect(dsn) as work:
        listen.execute(f'LISTEN "pgmq.q_{q}.INSERT"')
        ready.set()
        while len(lat) < n and time.time() < deadline:
            for _ in listen.notifies(timeout=5, stop_after=1):
                while True:  # everything visible now (notifications without payload may coalesce)
                    row = work.execute("SELECT msg_id, message FROM pgmq.read(%s, 30, 1)", [q], prepare=True).fetchone()
                    if row is None:
                        break
                    lat.append(time.time() - row[1]["t0"])
                    work.execute("SELECT pgmq.delete(%s, %s::bigint)", [q, row[0]], prepare=True)
                    ids.append(row[0])
    out.put((lat, ids))


def pgmq_latency(dsn, n):
    q = "bench_latency"
    pgmq_fresh(dsn, q, notify=True)
    ready, out = mp.Event(), mp.Queue()
    p = mp.Process(target=pgmq_latency_listener, args=(dsn, q, n, ready, out))
    p.start()
    ready.wait(10)
    with connect(dsn) as c:
        for _ in range(n):
            c.execute("SELECT pgmq.send(%s, jsonb_build_object('t0', %s::float8))", [q, time.time()], prepare=True)
            time.sleep(0.003)
    lat, ids = out.get(timeout=360)
    p.join()
    left = pgmq_count(dsn, f"q_{q}")
    if len(ids) != n or len(set(ids)) != n or left:
        raise Failure(f"pgmq latency: {len(ids)} read ({len(set(ids))} distinct) of {n}, {left} left")
    return percentiles(lat)


# --- graphile-worker: add_job / add_jobs from Python; its own Node worker (bench/peers/graphile.mjs)

GW_NODE = HERE / "peers" / "graphile.mjs"
GW_SPECS = """(SELECT array_agg(ROW('noop', '{"n":1}'::json, NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec)
               FROM generate_series(1, %s))"""


def gw_fresh(dsn):
    with connect(dsn) as c:  # like fresh_queue: no dead rows of an earlier cell in the way
        c.execute("DELETE FROM graphile_worker._private_jobs")
        c.execute("VACUUM ANALYZE graphile_worker._private_jobs")


def gw_count(dsn):
    with connect(dsn) as c:
        return c.execute("SELECT count(*) FROM graphile_worker._private_jobs").fetchone()[0]


def gw_enqueue_worker(dsn, n, batch, start):
    with connect(dsn) as c:
        start.wait(timeout=60)
        if batch == 1:
            for _ in range(n):
                c.execute("SELECT graphile_worker.add_job('noop', '{\"n\":1}'::json)", prepare=True)
        else:
            for _ in range(n // batch):
                c.execute(f"SELECT count(*) FROM graphile_worker.add_jobs({GW_SPECS})", [batch], prepare=True)


def gw_enqueue(dsn, conns, batch, n):
    gw_fresh(dsn)
    per = n // conns
    elapsed, _ = run_procs(gw_enqueue_worker, [(dsn, per, batch)] * conns)
    got = gw_count(dsn)
    if got != per * conns:
        raise Failure(f"graphile-worker enqueue: {got} jobs stored, {per * conns} sent")
    gw_fresh(dsn)
    return per * conns / elapsed


def gw_node(*args, timeout=900):
    r = subprocess.run(["node", str(GW_NODE), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise Failure(f"graphile.mjs {args[0]} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def gw_drain(dsn, url, workers, batch, n):
    gw_fresh(dsn)
    with connect(dsn) as c:
        for s in range(0, n, 5000):
            c.execute(f"SELECT count(*) FROM graphile_worker.add_jobs({GW_SPECS})", [min(5000, n - s)])
        c.execute("ANALYZE graphile_worker._private_jobs")
    r = gw_node("drain", url, workers, n, batch)
    if r["processed"] != n or r["twice"] or r["left"]:
        raise Failure(f"graphile-worker drain: {r['processed']} run of {n}, {r['twice']} twice, {r['left']} left")
    return r["per_s"]


def gw_latency(dsn, url, n):
    gw_fresh(dsn)
    proc = subprocess.Popen(["node", str(GW_NODE), "latency", url, str(n)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line.strip() or not json.loads(line).get("ready"):
            raise Failure(f"graphile.mjs latency did not start: {line} {proc.stderr.read()[-2000:]}")
        with connect(dsn) as c:
            for _ in range(n):
                c.execute("SELECT graphile_worker.add_job('lat', json_build_object('t0', %s::float8))",
                          [time.time()], prepare=True)
                time.sleep(0.003)
        rest, err = proc.communicate(timeout=360)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise Failure(f"graphile.mjs latency failed: {err[-2000:]}")
    r = json.loads(rest.strip().splitlines()[-1])
    if r["processed"] != n or r["twice"] or r["left"]:
        raise Failure(f"graphile-worker latency: {r['processed']} run of {n}, {r['twice']} twice, {r['left']} left")
    return percentiles(r["latencies_s"])


# --- history growth: the same drain with an empty history and with millions of finished jobs

HISTORY_DBS = ("qe_history_empty", "qe_history_full")


def db_dsn(dsn, db):
    return f"{dsn} dbname={db}"  # libpq: the last dbname wins


def history_setup(dsn, retained):
    """Two databases with queue_ext, identical but for the history: one gets `retained`
    finished jobs (95% completed: queued, running, completed history rows; 5% cancelled while
    queued: two rows), spread over a week and four other queues, one INSERT ... SELECT per
    table, then VACUUM ANALYZE and a checkpoint."""
    with connect(dsn) as c:
        for db in HISTORY_DBS:
            c.execute(f"DROP DATABASE IF EXISTS {db}")
            c.execute(f"CREATE DATABASE {db}")
    for db in HISTORY_DBS:
        with connect(db_dsn(dsn, db)) as c:
            c.execute("CREATE EXTENSION queue_ext")
    t0 = time.perf_counter()
    with connect(db_dsn(dsn, HISTORY_DBS[1])) as c:
        c.execute("ALTER TABLE queue_ext.job_status_history DISABLE TRIGGER publish_transitions")  # no NOTIFY storm
        c.execute("""
            INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
                                               worker_id, result, progress, enqueued_by, created_at, run_at,
                                               started_at, finished_at)
            SELECT queue_ext.uuid_generate_v7(), (ARRAY['emails', 'reports', 'webhooks', 'thumbnails'])[1 + i %% 4],
                   jsonb_build_object('n', i, 'to', 'user' || i || '@example.com'),
                   'normal', CASE WHEN cancelled THEN 'cancelled' ELSE 'completed' END::queue_ext.job_state,
                   CASE WHEN cancelled THEN 0 ELSE 1 END, 5,
                   CASE WHEN cancelled THEN NULL ELSE 'worker-' || i %% 8 END,
                   CASE WHEN cancelled THEN NULL ELSE '{"ok": true}'::jsonb END,
                   CASE WHEN cancelled THEN NULL ELSE 100 END, 'app',
                   t, t, CASE WHEN cancelled THEN NULL ELSE t + interval '40 ms' END, t + interval '90 ms'
            FROM (SELECT i, i %% 20 = 0 AS cancelled,
                         now() - interval '7 days' + (interval '7 days' / %s) * i AS t
                  FROM generate_series(1, %s) AS i) AS s""", [retained, retained])
        c.execute("""
            INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt,
                                                      worker_id, enqueued_by, at)
            SELECT a.id, a.queue_name, h.from_status::queue_ext.job_state, h.to_status::queue_ext.job_state,
                   h.attempt, CASE WHEN h.to_status = 'queued' THEN NULL ELSE a.worker_id END, a.enqueued_by,
                   a.created_at + h.after
            FROM queue_ext.job_archive AS a
            JOIN (VALUES ('completed', NULL, 'queued', 0, interval '0'),
                         ('completed', 'queued', 'running', 1, interval '40 ms'),
                         ('completed', 'running', 'completed', 1, interval '90 ms'),
                         ('cancelled', NULL, 'queued', 0, interval '0'),
                         ('cancelled', 'queued', 'cancelled', 0, interval '90 ms'))
                 AS h(job_status, from_status, to_status, attempt, after)
              ON h.job_status::queue_ext.job_state = a.status""")
        c.execute("ALTER TABLE queue_ext.job_status_history ENABLE TRIGGER publish_transitions")
        c.execute("VACUUM ANALYZE queue_ext.job_archive")
        c.execute("VACUUM ANALYZE queue_ext.job_status_history")
        c.execute("CHECKPOINT")
        jobs, rows, size = c.execute("""
            SELECT (SELECT count(*) FROM queue_ext.job_archive), (SELECT count(*) FROM queue_ext.job_status_history),
                   pg_size_pretty(pg_total_relation_size('queue_ext.job_archive')
                                  + pg_total_relation_size('queue_ext.job_status_history'))""").fetchone()
    if jobs != retained:
        raise Failure(f"history fill: {jobs} archived jobs, wanted {retained}")
    info = {"retained_jobs": jobs, "history_rows": rows, "size": size, "fill_s": round(time.perf_counter() - t0, 1)}
    print(f"history: {jobs:,} finished jobs and {rows:,} history rows retained ({size}) in {info['fill_s']} s",
          flush=True)
    return info


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
        cell = cells.get(("queue_ext", workload, variant))
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


def settings(dsn, peers):
    with connect(dsn) as c:
        names = ("shared_buffers", "synchronous_commit", "max_connections", "fsync", "wal_level", "jit")
        rows = {n: c.execute("SELECT current_setting(%s)", [n]).fetchone()[0] for n in names}
        rows["server_version"] = c.execute("SHOW server_version").fetchone()[0]
        rows["queue_ext"] = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'queue_ext'").fetchone()[0]
    pins = dict(re.findall(r"^(PGMQ_CRATE|PGMQ_VERSION)=(\S+)", (HERE / "peers" / "setup.sh").read_text(), re.M))
    if "pgmq" in peers:
        rows["pgmq"] = f"{pins['PGMQ_VERSION']} (plain-SQL install from the pgmq crate {pins['PGMQ_CRATE']})"
    if "graphile" in peers:
        rows["graphile-worker"] = json.loads((HERE / "peers" / "node_modules" / "graphile-worker" / "package.json").read_text())["version"]
        rows["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    rows["cpus"] = os.cpu_count()
    rows["loadavg_1m_at_start"] = os.getloadavg()[0]  # other load on the machine skews every figure
    rows["machine"] = platform.machine()
    rows["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return rows


# queue_ext twice: as installed (every job's enqueue, claim and completion recorded in the
# audit trail, completed jobs archived) and with keep_history off (what pgmq and
# graphile-worker keep: nothing once a job is done).
LEAN = "queue_ext, keep_history off"
SYSTEMS = ("queue_ext", LEAN, "pgmq", "graphile-worker")
OURS = ("queue_ext", LEAN)
PEER_OF = {"pgmq": "pgmq", "graphile-worker": "graphile"}  # system -> its --only name
WORKLOADS = ("enqueue", "drain", "latency", "webhooks", "floor", "history")
QUICK_WORKLOADS = ("enqueue", "drain", "latency", "webhooks", "floor")
PEER_WORDS = {"pgmq": {"pgmq"}, "graphile": {"graphile"}, "peers": {"pgmq", "graphile"}}


def selection(only, quick):
    """(workloads, peers) a run covers. Default: every workload and both peers; --quick:
    queue_ext's workloads only. --only names workloads and/or peers (pgmq, graphile, peers);
    peers alone mean enqueue, drain and latency. Peers join only enqueue, drain and latency,
    and in --quick only one small drain cell each."""
    if only is None:
        workloads, peers = (set(QUICK_WORKLOADS), set()) if quick else (set(WORKLOADS), {"pgmq", "graphile"})
    else:
        words = set(only.split(","))
        unknown = words - set(WORKLOADS) - set(PEER_WORDS)
        if unknown:
            raise SystemExit(f"--only: unknown {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(WORKLOADS + tuple(PEER_WORDS))}")
        peers = set().union(*(PEER_WORDS[w] for w in words & set(PEER_WORDS)))
        workloads = (words & set(WORKLOADS)) or ({"enqueue", "drain", "latency"} if peers else set())
    if not workloads & ({"drain"} if quick else {"enqueue", "drain", "latency"}):
        peers = set()
    return workloads, peers


def fmt(value, unit):
    return f"{value:,.1f}" if unit == "ms" else f"{value:,.0f}"


def print_side_by_side(cells):
    systems = [s for s in SYSTEMS if any(c.system == s for c in cells.values())]
    rows = {}
    for c in cells.values():
        if c.workload in ("enqueue", "drain", "latency"):
            rows.setdefault((c.workload, c.variant), {})[c.system] = c
    rows = {k: v for k, v in rows.items()
            if set(v) - {"queue_ext"} or k[1].startswith("complete_and_get_next")}
    if len(systems) < 2 or not rows:
        return
    print("\n## Side by side (median, range in brackets)\n")
    print("| workload | variant | unit | " + " | ".join(systems) + " |\n|---|---|---|" + "---:|" * len(systems))
    for (workload, variant), by in rows.items():
        unit = next(iter(by.values())).unit
        out = []
        for s in systems:
            if s not in by:
                out.append("—")
                continue
            med, lo, hi = by[s].summary()
            out.append(fmt(med, unit) + (f" ({fmt(lo, unit)}–{fmt(hi, unit)})" if len(by[s].values) > 1 else ""))
        print(f"| {workload} | {variant} | {unit} | " + " | ".join(out) + " |")
    print("\nqueue_ext: enqueue_job / enqueue_jobs; get_next_job + complete_job (2 commits per job), as an "
          "ordinary worker role; batches: get_next_jobs(100) + complete_jobs in one transaction; latency: "
          "LISTEN queue_ext_events.\npgmq: send / send_batch; read(q, 30, 1) + delete (2 commits per message), "
          "or + archive where named; batches: read(q, 30, 100) + delete(ids) in one transaction; latency: "
          "LISTEN on its enable_notify_insert channel (no throttle).\ngraphile-worker: add_job / add_jobs from "
          "Python; drains and latency by its own Node worker, run() with concurrency = workers, a no-op task, "
          "timed from the first task start until its jobs table is empty; batches: localQueue size 100 and "
          "completeJobBatchDelay 0 (its batched claim and completion).")


def targets(cells, history):
    """The issue's targets, from the medians of this run."""
    def med(system, workload, variant):
        c = cells.get((system, workload, variant))
        return c.summary()[0] if c else None

    def best(workload, variant, lower=False):
        """queue_ext's best median of the cell, with history kept or not: (value, label)."""
        got = [(med(s, workload, variant), s) for s in OURS]
        got = [(v, "" if s == "queue_ext" else " (keep_history off)") for v, s in got if v is not None]
        return (min if lower else max)(got, key=lambda g: g[0]) if got else (None, "")

    out = []

    def add(target, value, ref, ref_name, ratio, met, unit="jobs/s"):
        out.append({"target": target, "queue_ext": value, "reference": ref, "reference_is": ref_name,
                    "ratio": ratio, "met": met, "unit": unit})

    for c in (1, 4):
        v = f"1 per call, {c} connection(s)"
        (q, how), p = best("enqueue", v), med("pgmq", "enqueue", v)
        if q and p:
            add(f"single-call enqueue ≥ 2× pgmq send, {c} connection(s){how}", q, p, "pgmq send", q / p, q >= 2 * p)
    for w in (1, 4, 8):
        mine = {}
        for k in ("claim+complete", "complete_and_get_next"):
            v, how = best("drain", f"{k}, {w} worker(s)")
            if v:
                mine[k + how] = v
        theirs = {"pgmq read+delete": med("pgmq", "drain", f"claim+complete, {w} worker(s)"),
                  "pgmq read+archive": med("pgmq", "drain", f"claim+complete, {w} worker(s), read + archive"),
                  "graphile-worker": med("graphile-worker", "drain", f"claim+complete, {w} worker(s)")}
        theirs = {k: v for k, v in theirs.items() if v}
        if mine and theirs:
            tk, tv = max(theirs.items(), key=lambda kv: kv[1])
            for mk, mv in mine.items():
                add(f"unbatched claim+complete ≥ 2× best peer unbatched drain, {w} worker(s) (queue_ext: {mk})",
                    mv, tv, tk, mv / tv, mv >= 2 * tv)
    batched = [(c.summary()[0], c.variant, c.system) for c in cells.values()
               if c.system in OURS and c.workload == "drain" and c.variant.startswith("batches of")]
    if batched:
        v, variant, system = max(batched)
        add(f"batched drain ≥ 50k/s ({variant}{'' if system == 'queue_ext' else ', keep_history off'})",
            v, 50_000, "target", v / 50_000, v >= 50_000)
    for k, limit in (("p50_ms", 2.0), ("p99_ms", 8.0)):
        v, how = best("latency", f"idle enqueue->claim {k}", lower=True)
        if v is not None:
            add(f"idle latency {k[:3]} ≤ {limit:g} ms{how}", v, limit, "target", v / limit, v <= limit, "ms")
    v, how = best("webhooks", "delivered per second")
    if v is not None:
        add(f"webhooks ≥ 20,000/s, none lost{how}", v, 20_000, "target", v / 20_000, v >= 20_000)
    v, how = best("webhooks", "idle enqueue->request p50_ms", lower=True)
    if v is not None:
        add(f"webhook enqueue->request p50 ≤ 5 ms{how}", v, 5.0, "target", v / 5.0, v <= 5.0, "ms")
    if history:
        pct = history["pct_of_empty"]
        add(f"{history['retained_jobs']:,} finished jobs retained: within 10% of empty-history throughput",
            history["full_median"], history["empty_median"], "empty history", pct / 100, pct >= 90)
    if out:
        print("\n## Targets (medians of this run)\n")
        print("| target | queue_ext | reference | ratio | met |\n|---|---:|---|---:|---|")
        for t in out:
            print(f"| {t['target']} | {fmt(t['queue_ext'], t['unit'])} {t['unit']} | "
                  f"{fmt(t['reference'], t['unit'])} ({t['reference_is']}) | {t['ratio']:.2f} | "
                  f"{'yes' if t['met'] else 'no'} |")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn")
    ap.add_argument("--port", type=int)
    ap.add_argument("--sink-port", type=int)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=None,
                    help="comma-separated workloads (enqueue,drain,latency,webhooks,floor,history) and/or "
                         "peers (pgmq,graphile,peers); default: all of them (--quick: queue_ext's workloads "
                         "but history)")
    ap.add_argument("--retained", type=int, default=None, help="finished jobs retained for the history cell")
    ap.add_argument("--plan", action="store_true", help="print the peers this selection needs, and exit")
    args = ap.parse_args()
    quick = args.quick
    workloads, peers = selection(args.only, quick)
    if args.plan:
        print(" ".join(sorted(peers)))
        return
    if not (args.dsn and args.port and args.sink_port):
        ap.error("--dsn, --port and --sink-port are required")
    reps = 1 if quick else args.reps
    # Fixed job counts per workload (each cell of a workload uses the same count).
    n = Counts.quick() if quick else Counts.full()
    if args.retained:
        n.history_retained = args.retained
    dsn = args.dsn
    conn = psycopg.conninfo.conninfo_to_dict(dsn)
    pgmq_dsn, gw_dsn = db_dsn(dsn, "pgmq_bench"), db_dsn(dsn, "graphile_bench")
    gw_url = f"postgres://{conn.get('user', 'postgres')}@{conn.get('host', '127.0.0.1')}:{args.port}/graphile_bench"

    info = settings(dsn, peers)
    print("# queue_ext benchmark")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"workloads: {', '.join(w for w in WORKLOADS if w in workloads)}; peers: {', '.join(sorted(peers)) or 'none'}")
    print(f"job counts: {asdict(n)}; {reps} round(s), cells interleaved, systems rotating", flush=True)
    cells: dict[tuple, Cell] = {}

    def record(workload, variant, unit, value, system="queue_ext"):
        cells.setdefault((system, workload, variant), Cell(workload, variant, unit, system=system)).values.append(value)
        print(f"  {system:<15} {workload:<8} {variant:<58} {value:>10.1f} {unit}", flush=True)

    def cell(rep, workload, variant, unit, runs, in_quick=False):
        """Runs one cell for every selected system, back to back, the order rotating by round.
        A run returning a dict (latency percentiles) records one cell per key."""
        runs = [(s, fn) for s, fn in runs.items()
                if s in OURS or (PEER_OF[s] in peers and (in_quick or not quick))]
        k = rep % len(runs) if runs else 0
        for system, fn in runs[k:] + runs[:k]:
            got = fn()
            for key, value in (got.items() if isinstance(got, dict) else [(None, got)]):
                record(workload, f"{variant} {key}" if key else variant, unit, value, system)

    extra = {}
    for rep in range(reps):
        print(f"round {rep + 1}/{reps}")
        if "enqueue" in workloads:
            for c in (1, 4):
                cell(rep, "enqueue", f"1 per call, {c} connection(s)", "jobs/s", {
                    "queue_ext": lambda: bench_enqueue(dsn, c, 1, n.enqueue),
                    LEAN: lambda: bench_enqueue(dsn, c, 1, n.enqueue, lean=True),
                    "pgmq": lambda: pgmq_enqueue(pgmq_dsn, c, 1, n.enqueue),
                    "graphile-worker": lambda: gw_enqueue(gw_dsn, c, 1, n.enqueue)})
            b = n.enqueue_batch
            cell(rep, "enqueue", f"batches of {b:,}", "jobs/s", {
                "queue_ext": lambda: bench_enqueue(dsn, 1, b, n.enqueue_batched),
                LEAN: lambda: bench_enqueue(dsn, 1, b, n.enqueue_batched, lean=True),
                "pgmq": lambda: pgmq_enqueue(pgmq_dsn, 1, b, n.enqueue_batched),
                "graphile-worker": lambda: gw_enqueue(gw_dsn, 1, b, n.enqueue_batched)})
        if "drain" in workloads:
            for w in (1, 4, 8):
                cell(rep, "drain", f"claim+complete, {w} worker(s)", "jobs/s", {
                    "queue_ext": lambda: bench_drain(dsn, w, 1, n.drain),
                    LEAN: lambda: bench_drain(dsn, w, 1, n.drain, lean=True),
                    "pgmq": lambda: pgmq_drain(pgmq_dsn, w, 1, n.drain),
                    "graphile-worker": lambda: gw_drain(gw_dsn, gw_url, w, 1, n.drain)}, in_quick=(w == 4))
            if not quick:
                cell(rep, "drain", "claim+complete, 4 worker(s), read + archive", "jobs/s", {
                    "pgmq": lambda: pgmq_drain(pgmq_dsn, 4, 1, n.drain, finish="archive")})
            for w in (1, 4):  # the same drain with row level security off (what RLS costs a claim)
                record("drain", f"claim+complete, {w} worker(s), RLS off", "jobs/s",
                       bench_drain(dsn, w, 1, n.drain, rls=False))
            for w in (1, 4):
                cell(rep, "drain", f"complete_and_get_next, {w} worker(s)", "jobs/s", {
                    "queue_ext": lambda: bench_drain(dsn, w, 0, n.drain),
                    LEAN: lambda: bench_drain(dsn, w, 0, n.drain, lean=True)})
            for w in (1, 4):
                cell(rep, "drain", f"batches of 100, {w} worker(s)", "jobs/s", {
                    "queue_ext": lambda: bench_drain(dsn, w, 100, n.drain_batched),
                    LEAN: lambda: bench_drain(dsn, w, 100, n.drain_batched, lean=True),
                    "pgmq": lambda: pgmq_drain(pgmq_dsn, w, 100, n.drain_batched),
                    "graphile-worker": lambda: gw_drain(gw_dsn, gw_url, w, 100, n.drain_batched)})
        if "latency" in workloads:
            cell(rep, "latency", "idle enqueue->claim", "ms", {
                "queue_ext": lambda: bench_latency(dsn, n.latency),
                LEAN: lambda: bench_latency(dsn, n.latency, lean=True),
                "pgmq": lambda: pgmq_latency(pgmq_dsn, n.latency),
                "graphile-worker": lambda: gw_latency(gw_dsn, gw_url, n.latency)})
        if "webhooks" in workloads:
            for system in (OURS if rep % 2 == 0 else OURS[::-1]):
                hooks = bench_webhooks(dsn, args.sink_port, n.webhooks, lean=system == LEAN)
                record("webhooks", "delivered per second", "jobs/s", hooks["per_s"], system)
                extra.setdefault("webhook_burst" + ("_keep_history_off" if system == LEAN else ""), []).append(hooks)
            beside = bench_webhooks_beside_slow(dsn, args.sink_port, n.webhooks)
            record("webhooks", "delivered/s beside a 5 s endpoint", "jobs/s", beside["per_s"])
            for system in OURS:
                paced = bench_webhooks(dsn, args.sink_port, n.webhooks_paced, paced=True, lean=system == LEAN)
                for k in ("p50_ms", "p99_ms"):
                    record("webhooks", f"idle enqueue->request {k}", "ms", paced[k], system)
        if "floor" in workloads:
            for c in (1, 4):
                floor = pgbench_floor(args.port, c, n.floor // c)
                extra.setdefault(f"floor_{c}", []).append(floor)
                for k, v in floor.items():
                    record("floor", f"pgbench {k}, {c} client(s)", "ops/s", v)

    history = None
    if "history" in workloads:
        # After every other cell, in two databases of their own: the fill's writes and
        # checkpoint do not fall into the other cells. Empty and full alternate, rotating.
        history = history_setup(dsn, n.history_retained)
        variants = {"empty": "claim+complete, 4 worker(s), empty history",
                    "full": f"claim+complete, 4 worker(s), {n.history_retained:,} finished jobs retained"}
        dsns = {"empty": db_dsn(dsn, HISTORY_DBS[0]), "full": db_dsn(dsn, HISTORY_DBS[1])}
        paired = []
        for rep in range(max(reps, 1 if quick else 3)):
            print(f"history round {rep + 1}")
            got = {}
            for which in (("empty", "full") if rep % 2 == 0 else ("full", "empty")):
                got[which] = bench_drain(dsns[which], 4, 1, n.history_drain)
                record("history", variants[which], "jobs/s", got[which])
            paired.append(100 * got["full"] / got["empty"])
        e = cells[("queue_ext", "history", variants["empty"])].summary()[0]
        f = cells[("queue_ext", "history", variants["full"])].summary()[0]
        history.update(empty_median=e, full_median=f, pct_of_empty=100 * f / e, pct_paired_rounds=paired)
        extra["history"] = history
        with connect(dsn) as c:  # ~4.5 GB at 5 million jobs: not left behind in the cluster directory
            for db in HISTORY_DBS:
                c.execute(f"DROP DATABASE {db}")

    print("\n| system | workload | variant | median | range | unit |\n|---|---|---|---:|---:|---|")
    for c in cells.values():
        med, lo, hi = c.summary()
        print(f"| {c.system} | {c.workload} | {c.variant} | {med:,.1f} | {lo:,.1f} – {hi:,.1f} | {c.unit} |")
    print_vs_floor(cells)
    print_side_by_side(cells)
    if history:
        print(f"\nhistory: with {history['retained_jobs']:,} finished jobs retained ({history['history_rows']:,} "
              f"history rows, {history['size']}) the 4-worker claim+complete drain runs at "
              f"{history['pct_of_empty']:.0f}% of the empty-history throughput (medians; per round: "
              + ", ".join(f"{p:.0f}%" for p in history["pct_paired_rounds"]) + ")")
    goals = [] if quick else targets(cells, history)  # --quick counts are too small to mean anything
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    out = results / f"{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if quick else ''}.json"
    out.write_text(json.dumps({"settings": info, "counts": asdict(n), "reps": reps,
                               "workloads": sorted(workloads), "peers": sorted(peers),
                               "cells": [asdict(c) for c in cells.values()], "extra": extra, "targets": goals},
                              indent=2))
    print(f"\nwrote {out}")
    checked = ["every drain of every system processed each job exactly once"]
    if "webhooks" in workloads:
        checked.append("webhooks: none lost")
    print("correctness: " + "; ".join(checked))


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        print(f"CORRECTNESS FAILURE: {e}", file=sys.stderr)
        sys.exit(1)
