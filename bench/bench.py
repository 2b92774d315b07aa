"""The queue_ext benchmark. Run through bench/run.sh, which starts a throwaway cluster.

Every queue_ext row without a setting in its label is what a user gets: create_queue(q) and
nothing else. Each other configuration is its own row named by what it changes
(keep_history off; notify_events flipped from its default; row level security off).

Workloads (fixed job counts, tiny JSON payloads, no-op work), each cell repeated and
interleaved, reported as median and range:
  enqueue      one job per call from 1 and 4 connections; batches of 1,000 from 1 and 4
  drain        claim+complete one job per call with 1, 4 and 8 workers; complete_and_get_next;
               batches of 100 in one transaction; the unbatched drain with row level security
               off. Drain workers log in as an ordinary queue_ext_worker role.
  latency      an idle worker asleep in LISTEN (queue_ext_jobs when the installed build has
               it, else queue_ext_events); jobs enqueued 10 ms apart; enqueue -> claim p50/p95/p99
  webhooks     jobs delivered by the background dispatcher to a local sink: delivered/s,
               enqueue -> request p50/p99, lost and duplicated counted at the sink
  history      the 4-worker claim+complete drain with an empty history and with 5,000,000
               finished jobs retained (job_archive rows, and a job_status_log row for cancelled ones), in two
               databases of the cluster, interleaved; reported as % of the empty-history figure
The bare-SQL floor runs in every enqueue and drain cell, in its own database, through the same
Python client with the same connections and call pattern: a plain INSERT (batches: one
INSERT ... SELECT FROM unnest(array)); UPDATE ... FOR UPDATE SKIP LOCKED LIMIT 1 RETURNING then
DELETE by id, each its own commit (batches: LIMIT 100 and DELETE ... = ANY in one transaction).
Peers, side by side in the same rounds, on the same cluster (each in its own database), driven
by the same Python client (graphile-worker's drains and latency by its own Node worker):
  pgmq             PGMQ's plain-SQL install (bench/peers/setup.sh): send / send_batch; read 1 +
                   archive (the comparable path: queue_ext keeps history by default), and + delete
                   as its own row; read 100 + archive(ids) (and + delete(ids)); idle latency via
                   its enable_notify_insert LISTEN channel
  graphile-worker  add_job / add_jobs from Python; its run() with concurrency 1/4/8 and a no-op
                   task; batched: its localQueue (batched claim) + batched completions; idle
                   latency with its LISTEN-based worker (bench/peers/graphile.mjs)
Within a round every cell runs each system back to back, the order rotating by round.
Every drain checks that each job was processed exactly once (queue_ext: archive + audit
trail; pgmq: every message id deleted once, or archived with read_ct 1; graphile-worker:
every job id run once and its jobs table empty; the floor: every row id returned once, the
table empty). The last thing printed (and written to bench/results/*-headline.md) is the
headline table: each core path at 4 clients with the defaults, beside pgmq and the floor, with
the ratios and the targets. --quick: small counts, one repetition, correctness only (the test
suite's smoke test): exits 1 if any check fails, never judges speed; it runs no peer and no
history cell unless --only names them (then only the 4-client cells, small)."""
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
    enqueue_batched: int  # in batches of enqueue_batch, shared among the connections
    drain: int            # pre-filled, then claimed and completed one at a time
    drain_batched: int    # the same, 100 per claim
    latency: int
    webhooks: int
    webhooks_paced: int
    history_drain: int    # the history cell's drain (4 workers, one per claim)
    history_retained: int # finished jobs retained for it

    @staticmethod
    def full():
        return Counts(5_000, 1_000, 48_000, 5_000, 30_000, 1_000, 10_000, 200, 10_000, 5_000_000)

    @staticmethod
    def quick():
        return Counts(200, 100, 1_200, 400, 1_000, 30, 300, 20, 400, 20_000)


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
        c.execute("DELETE FROM queue_ext.job_status_log WHERE queue_name = %s", [name])
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


def bench_enqueue(dsn, conns, batch, n, config=None):
    queue = "bench_enqueue"
    fresh_queue(dsn, queue, **(config or {}))
    per = n // conns // batch * batch
    elapsed, _ = run_procs(enqueue_worker, [(dsn, queue, per, batch)] * conns)
    with connect(dsn) as c:
        got = c.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0]
    if got != per * conns:
        raise Failure(f"enqueue: {got} jobs stored, {per * conns} sent")
    return per * conns / elapsed


def bench_drain(dsn, workers, batch, n, rls=True, config=None):
    queue = "bench_drain"
    fresh_queue(dsn, queue, **(config or {}))
    prefill(dsn, queue, n)
    with connect(dsn) as c:
        c.execute(f"ALTER TABLE queue_ext.job_queue {'ENABLE' if rls else 'DISABLE'} ROW LEVEL SECURITY")
    try:
        elapsed, counts = run_procs(drain_worker, [(as_worker(dsn), queue, batch)] * workers)
    finally:
        with connect(dsn) as c:
            c.execute("ALTER TABLE queue_ext.job_queue ENABLE ROW LEVEL SECURITY")
    ids = [i for done in counts for i in done]
    check_exactly_once(dsn, queue, n, ids, lean=is_lean(config))
    return n / elapsed


# The channel an idle SQL worker sleeps on. queue_ext_jobs carries a queue's name, published
# once per queue per dispatcher wake-up after an enqueue commits (no NOTIFY in the producer's
# commit); a build without it has only the status events on queue_ext_events (one JSON object
# per transition, for queues with notify on). Chosen once per run by wake_channel().
JOBS_CHANNEL, EVENTS_CHANNEL = "queue_ext_jobs", "queue_ext_events"
# Not a channel: the idle worker waits in CALL queue_ext.wait_for_jobs (0.11.0 on), woken by
# the producer's commit itself.
WAIT_PROCEDURE = "wait_for_jobs"
# The idle worker's one call (0.12.0 on): CALL queue_ext.wait_for_next_job sleeps like
# wait_for_jobs and returns the job claimed, with no second round trip after the wake-up.
NEXT_PROCEDURE = "wait_for_next_job"
# Between two enqueues of a latency cell (every system): long enough that the idle worker has
# claimed and finished the previous job even when a commit takes several ms on a loaded machine,
# so the figure is the wake-up and claim, not a backlog.
LATENCY_GAP_S = 0.01


def wake_channel(dsn):
    with connect(dsn) as c:
        new = c.execute("SELECT to_regprocedure('queue_ext._announce_at_commit(text)') IS NOT NULL").fetchone()[0]
    return JOBS_CHANNEL if new else EVENTS_CHANNEL


def idle_wait(dsn, channel):
    """How queue_ext's idle worker waits in the latency cell: wait_for_jobs where the build has
    it, else LISTEN on `channel`."""
    with connect(dsn) as c:
        has, has_next = c.execute(
            "SELECT to_regprocedure('queue_ext.wait_for_jobs(text[], interval, boolean)') IS NOT NULL, "
            "to_regproc('queue_ext.wait_for_next_job') IS NOT NULL").fetchone()
    return NEXT_PROCEDURE if has_next else WAIT_PROCEDURE if has else channel


def claim_after_wake(work, queue, woke, lat, wakes, once=False):
    """Claims and completes until the queue is empty (or one job, `once`), recording each job's
    enqueue -> claimed and enqueue -> woken."""
    while True:
        row = work.execute("SELECT payload, job_id, lease_token FROM queue_ext.get_next_job(%s, 'idle')",
                           [queue], prepare=True).fetchone()
        if row is None:
            return
        lat.append(time.time() - row[0]["t0"])
        wakes.append(woke - row[0]["t0"])
        work.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [row[1], row[2]], prepare=True)
        if once:
            return


def latency_listener(dsn, queue, n, channel, ready, out):
    """An idle worker: sleeps in CALL queue_ext.wait_for_next_job (channel NEXT_PROCEDURE: it
    returns the job claimed), in CALL queue_ext.wait_for_jobs (WAIT_PROCEDURE) or in LISTEN,
    and claims when woken for its queue: until the queue is empty (one wake-up may stand for
    several jobs), or on queue_ext_events once per 'queued' event (one per job).
    Records, per job, enqueue -> claimed and enqueue -> woken (what the wake-up alone takes)."""
    lat, wakes = [], []
    deadline = time.time() + 30 + 0.05 * n  # a missed wake-up fails the cell, not hangs it
    if channel == NEXT_PROCEDURE:
        with connect(dsn) as work:
            ready.set()
            while len(lat) < n and time.time() < deadline:
                row = work.execute("CALL queue_ext.wait_for_next_job(ARRAY[%s], '5 seconds', 'idle')", [queue],
                                   prepare=True).fetchone()
                if row[0] is None:
                    continue
                claimed = time.time()
                lat.append(claimed - row[2]["t0"])
                wakes.append(claimed - row[2]["t0"])  # woken and claimed in one call
                work.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [row[0], row[6]], prepare=True)
        out.put((lat, wakes))
        return
    if channel == WAIT_PROCEDURE:
        with connect(dsn) as work:
            ready.set()
            while len(lat) < n and time.time() < deadline:
                if work.execute("CALL queue_ext.wait_for_jobs(ARRAY[%s], '5 seconds')", [queue],
                                prepare=True).fetchone()[0]:
                    claim_after_wake(work, queue, time.time(), lat, wakes)
        out.put((lat, wakes))
        return
    with connect(dsn) as listen, connect(dsn) as work:
        listen.execute(f"LISTEN {channel}")
        ready.set()
        while len(lat) < n and time.time() < deadline:
            for note in listen.notifies(timeout=5, stop_after=1):
                if channel == JOBS_CHANNEL:
                    if note.payload != queue:
                        continue
                else:
                    ev = json.loads(note.payload)
                    if ev["status"] != "queued" or ev["queue"] != queue:
                        continue
                claim_after_wake(work, queue, time.time(), lat, wakes, once=channel == EVENTS_CHANNEL)
    out.put((lat, wakes))


def idle_wait_words(waiter, channel):
    """How the latency cell's queue_ext row waits, in words."""
    return {NEXT_PROCEDURE: "CALL queue_ext.wait_for_next_job (woken and claimed in one call)",
            WAIT_PROCEDURE: "CALL queue_ext.wait_for_jobs, then get_next_job"}.get(waiter, "LISTEN on " + channel)


def bench_latency(dsn, n, channel, config=None):
    queue = "bench_latency"
    fresh_queue(dsn, queue, **(config or {}))
    ready, out = mp.Event(), mp.Queue()
    p = mp.Process(target=latency_listener, args=(dsn, queue, n, channel, ready, out))
    p.start()
    ready.wait(10)
    with connect(dsn) as c:
        for _ in range(n):
            c.execute("SELECT queue_ext.enqueue_job(%s, jsonb_build_object('t0', %s::float8))", [queue, time.time()], prepare=True)
            time.sleep(LATENCY_GAP_S)
    lat, wakes = out.get(timeout=360)
    p.join()
    if len(lat) != n:
        raise Failure(f"latency: {len(lat)} of {n} jobs claimed after a wake-up on {channel}")
    check_exactly_once(dsn, queue, n, lean=is_lean(config))
    return latency_split(lat, wakes)


def latency_split(lat, wakes):
    """Enqueue -> claimed percentiles, and enqueue -> notification received (`wake_*`): the
    rest of each job's latency is its claim's round trip."""
    woke = percentiles(wakes)
    return {**percentiles(lat), "wake_p50_ms": woke["p50_ms"], "wake_p99_ms": woke["p99_ms"]}


def percentiles(values):
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))] * 1000
    return {"p50_ms": pick(0.50), "p95_ms": pick(0.95), "p99_ms": pick(0.99)}


def sink_stats(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__stats") as r:
        return json.loads(r.read())


def _cpu_ticks(path):
    """CPU ticks (user + system) from a /proc stat file; 0 once the process is gone."""
    try:
        stat = Path(path).read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


class CpuSplit:
    """CPU time of the cluster's processes and of the sink over a stretch of work, from /proc:
    where a delivered webhook's CPU goes. The dispatcher is split into its main thread (the
    SQL: claims and outcomes) and the rest (its HTTP thread). A process's own stat counts its
    ended threads too."""

    def __init__(self, conn, sink_pid):
        rows = conn.execute("SELECT pid, backend_type FROM pg_stat_activity").fetchall()
        self.parts = {}
        for pid, kind in rows:
            if "dispatcher" in kind:
                self.parts[("dispatcher SQL thread", pid)] = f"/proc/{pid}/task/{pid}/stat"
                self.parts[("dispatcher", pid)] = f"/proc/{pid}/stat"
            else:
                self.parts[("other Postgres processes (the enqueuing backend too)", pid)] = f"/proc/{pid}/stat"
        if sink_pid:
            self.parts[("sink", sink_pid)] = f"/proc/{sink_pid}/stat"
        self.before = {k: _cpu_ticks(path) for k, path in self.parts.items()}

    def per_item_us(self, n):
        used = {}
        for key, path in self.parts.items():
            used[key[0]] = used.get(key[0], 0) + _cpu_ticks(path) - self.before[key]
        used["dispatcher HTTP thread"] = used.pop("dispatcher", 0) - used.get("dispatcher SQL thread", 0)
        hz = os.sysconf("SC_CLK_TCK")
        return {k: v / hz / n * 1e6 for k, v in sorted(used.items())}


def finished_jobs(c, queue):
    """The queue's jobs completed or dead since the server started, from the extension's
    counters in shared memory, or None without them (not preloaded). Polling this costs the
    dispatcher nothing measurable; a count(*) of job_queue every 20 ms took about a tenth of
    the CPU a burst of webhooks used."""
    row = c.execute("SELECT completed + dead FROM queue_ext._job_counters(ARRAY[%s]) WHERE queue_name = %s",
                    [queue, queue]).fetchone()
    return None if row is None else row[0]


def bench_webhooks(dsn, sink_port, n, paced=False, lean=False, sink_pid=None):
    queue = "bench_hooks"
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{sink_port}/__reset", method="POST")).read()
    fresh_queue(dsn, queue, webhook_url=f"http://127.0.0.1:{sink_port}/hook", **(LEAN_CONFIG if lean else {}))
    ids = []
    with connect(dsn) as c:
        before = finished_jobs(c, queue)
        cpu = None if paced else CpuSplit(c, sink_pid)
        t0 = time.perf_counter()
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
        while (c.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0]
               if before is None else finished_jobs(c, queue) - before < n):
            if time.time() > deadline:
                raise Failure("webhooks: not all delivered within 120 s")
            time.sleep(0.02 if before is None else 0.005)
        elapsed = time.perf_counter() - t0
        cpu_us = cpu.per_item_us(n) if cpu else {}  # while the enqueuing backend still runs
    ours = {f"msg_{i}" for i in ids}
    arrivals = {k: v for k, v in sink_stats(sink_port).items() if k in ours}
    lost = n - len(arrivals)
    dup = sum(len(v) - 1 for v in arrivals.values())
    check_exactly_once(dsn, queue, n, lean=lean)
    if lost:
        raise Failure(f"webhooks: {lost} of {n} never reached the sink")
    lat = [v[0][0] - v[0][1] for v in arrivals.values() if v[0][1]]
    return {"per_s": n / elapsed, "lost": lost, "duplicated": dup, "cpu_us_per_webhook": cpu_us, **percentiles(lat)}


def http_floor(binary, sink_port, n, sink_pid=None):
    """The webhook cell's floor: n requests of a delivery's size to the same sink over
    HTTP_FLOOR_CONNECTIONS keep-alive connections, from a std-only client, no database: what
    this machine's loopback HTTP allows, and the CPU it takes per request (client and sink)."""
    sink_before = _cpu_ticks(f"/proc/{sink_pid}/stat") if sink_pid else None
    out = subprocess.run([binary, str(sink_port), str(n), str(HTTP_FLOOR_CONNECTIONS)],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise Failure(f"the HTTP floor failed: {out.stderr.strip()[-500:]}")
    result = json.loads(out.stdout)
    cpu = {"client": result["client_cpu_us"]}
    if sink_before is not None:
        cpu["sink"] = (_cpu_ticks(f"/proc/{sink_pid}/stat") - sink_before) / os.sysconf("SC_CLK_TCK") / n * 1e6
    return {"per_s": result["per_s"], "cpu_us": cpu}


def bench_webhooks_beside_slow(dsn, sink_port, n):
    """Fast-queue throughput while another queue's endpoint takes 5 s per request."""
    slow = "bench_slow"
    fresh_queue(dsn, slow, webhook_url=f"http://127.0.0.1:{sink_port}/slow",
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
    lat, ids, wakes = [], [], []
    deadline = time.time() + 300
    with connect(dsn) as listen, connect(dsn) as work:
        listen.execute(f'LISTEN "pgmq.q_{q}.INSERT"')
        ready.set()
        while len(lat) < n and time.time() < deadline:
            for _ in listen.notifies(timeout=5, stop_after=1):
                woke = time.time()
                while True:  # everything visible now (notifications without payload may coalesce)
                    row = work.execute("SELECT msg_id, message FROM pgmq.read(%s, 30, 1)", [q], prepare=True).fetchone()
                    if row is None:
                        break
                    lat.append(time.time() - row[1]["t0"])
                    wakes.append(woke - row[1]["t0"])
                    work.execute("SELECT pgmq.delete(%s, %s::bigint)", [q, row[0]], prepare=True)
                    ids.append(row[0])
    out.put((lat, wakes, ids))


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
            time.sleep(LATENCY_GAP_S)
    lat, wakes, ids = out.get(timeout=360)
    p.join()
    left = pgmq_count(dsn, f"q_{q}")
    if len(ids) != n or len(set(ids)) != n or left:
        raise Failure(f"pgmq latency: {len(ids)} read ({len(set(ids))} distinct) of {n}, {left} left")
    return latency_split(lat, wakes)


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
                time.sleep(LATENCY_GAP_S)
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


def history_databases(dsn):
    """The history cell's two databases with queue_ext, made when the run starts: the
    extension's install script is read from disk by CREATE EXTENSION, so it must come from the
    same install as the library the server loaded then (a reinstall during the run would
    otherwise fail the cell)."""
    with connect(dsn) as c:
        for db in HISTORY_DBS:
            c.execute(f"DROP DATABASE IF EXISTS {db}")
            c.execute(f"CREATE DATABASE {db}")
    for db in HISTORY_DBS:
        with connect(db_dsn(dsn, db)) as c:
            c.execute("CREATE EXTENSION queue_ext")


def history_setup(dsn, retained):
    """Two databases with queue_ext (history_databases()), identical but for the history: one
    gets `retained` finished jobs as the default configuration keeps them (95% completed: the
    archive row, whose claimed_at and finished_at are their claim and completion rows of
    job_status_history; 5% cancelled while queued: the archive row and one stored row in
    job_status_log), spread over a week and four other queues, one INSERT ... SELECT per
    table, then VACUUM ANALYZE and a checkpoint."""
    t0 = time.perf_counter()
    with connect(db_dsn(dsn, HISTORY_DBS[1])) as c:
        c.execute("ALTER TABLE queue_ext.job_status_log DISABLE TRIGGER publish_transitions")  # no NOTIFY storm
        c.execute("""
            INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
                                               worker_id, result, progress, enqueued_by, created_at, run_at,
                                               started_at, finished_at, claimed_at)
            SELECT queue_ext.uuid_generate_v7(), (ARRAY['emails', 'reports', 'webhooks', 'thumbnails'])[1 + i %% 4],
                   jsonb_build_object('n', i, 'to', 'user' || i || '@example.com'),
                   'normal', CASE WHEN cancelled THEN 'cancelled' ELSE 'completed' END::queue_ext.job_state,
                   CASE WHEN cancelled THEN 0 ELSE 1 END, 5,
                   CASE WHEN cancelled THEN NULL ELSE 'worker-' || i %% 8 END,
                   CASE WHEN cancelled THEN NULL ELSE '{"ok": true}'::jsonb END,
                   CASE WHEN cancelled THEN NULL ELSE 100 END, 'app',
                   t, t, CASE WHEN cancelled THEN NULL ELSE t + interval '40 ms' END, t + interval '90 ms',
                   CASE WHEN cancelled THEN NULL ELSE t + interval '40 ms' END
            FROM (SELECT i, i %% 20 = 0 AS cancelled,
                         now() - interval '7 days' + (interval '7 days' / %s) * i AS t
                  FROM generate_series(1, %s) AS i) AS s""", [retained, retained])
        c.execute("""
            INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt,
                                                  worker_id, enqueued_by, at)
            SELECT a.id, a.queue_name, 'queued', 'cancelled', 0, NULL, a.enqueued_by, a.finished_at
            FROM queue_ext.job_archive AS a
            WHERE a.status = 'cancelled'""")
        c.execute("ALTER TABLE queue_ext.job_status_log ENABLE TRIGGER publish_transitions")
        c.execute("VACUUM ANALYZE queue_ext.job_archive")
        c.execute("VACUUM ANALYZE queue_ext.job_status_log")
        c.execute("CHECKPOINT")
        jobs, rows, size = c.execute("""
            SELECT (SELECT count(*) FROM queue_ext.job_archive), (SELECT count(*) FROM queue_ext.job_status_log),
                   pg_size_pretty(pg_total_relation_size('queue_ext.job_archive')
                                  + pg_total_relation_size('queue_ext.job_status_log'))""").fetchone()
    if jobs != retained:
        raise Failure(f"history fill: {jobs} archived jobs, wanted {retained}")
    info = {"retained_jobs": jobs, "history_rows": rows, "size": size, "fill_s": round(time.perf_counter() - t0, 1)}
    print(f"history: {jobs:,} finished jobs and {rows:,} stored history rows retained ({size}) in {info['fill_s']} s",
          flush=True)
    return info


# --- the bare-SQL floor: a plain table driven by the same client, connections and call
# pattern as the queues, in its own database. What Postgres itself allows on this machine for
# each path: the queue's figure is then read as a share of it.

FLOOR_DB = "floor_bench"
FLOOR_CLAIM = ("UPDATE floor_q SET status = 1 WHERE id = (SELECT id FROM floor_q WHERE status = 0 "
               "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id, payload")
FLOOR_CLAIM_BATCH = ("UPDATE floor_q SET status = 1 WHERE id = ANY(ARRAY(SELECT id FROM floor_q WHERE status = 0 "
                     "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)) RETURNING id, payload")


def floor_fresh(dsn):
    with connect(dsn) as c:
        c.execute("DROP TABLE IF EXISTS floor_q")
        c.execute("CREATE TABLE floor_q (id bigserial PRIMARY KEY, status int NOT NULL DEFAULT 0, payload jsonb NOT NULL)")
        c.execute("CREATE INDEX ON floor_q (id) WHERE status = 0")


def floor_count(dsn):
    with connect(dsn) as c:
        return c.execute("SELECT count(*) FROM floor_q").fetchone()[0]


def floor_enqueue_worker(dsn, n, batch, start):
    with connect(dsn) as c:
        start.wait(timeout=60)
        if batch == 1:
            for _ in range(n):
                c.execute("INSERT INTO floor_q (payload) VALUES ('{\"n\":1}') RETURNING id", prepare=True)
        else:
            for _ in range(n // batch):
                c.execute("INSERT INTO floor_q (payload) SELECT p FROM unnest(array_fill('{\"n\":1}'::jsonb, ARRAY[%s])) AS p",
                          [batch], prepare=True)


def floor_enqueue(dsn, conns, batch, n):
    """A plain INSERT per call (autocommit), or one multi-row INSERT of `batch` rows."""
    floor_fresh(dsn)
    per = n // conns // batch * batch
    elapsed, _ = run_procs(floor_enqueue_worker, [(dsn, per, batch)] * conns)
    got = floor_count(dsn)
    if got != per * conns:
        raise Failure(f"floor enqueue: {got} rows stored, {per * conns} inserted")
    return per * conns / elapsed


def floor_drain_worker(dsn, batch, start, out):
    """One per call: the claim (UPDATE ... SKIP LOCKED RETURNING) and the DELETE by id, each its
    own commit; a batch: both in one transaction, the DELETE by id = ANY."""
    ids = []
    with connect(dsn) as c:
        start.wait(timeout=60)
        while True:
            if batch == 1:
                row = c.execute(FLOOR_CLAIM, prepare=True).fetchone()
                if row is None:
                    break
                if c.execute("DELETE FROM floor_q WHERE id = %s", [row[0]], prepare=True).rowcount != 1:
                    raise Failure(f"floor delete of row {row[0]} found nothing")
                ids.append(row[0])
            else:
                with c.transaction():
                    got = [r[0] for r in c.execute(FLOOR_CLAIM_BATCH, [batch], prepare=True)]
                    if not got:
                        break
                    done = c.execute("DELETE FROM floor_q WHERE id = ANY(%s)", [got], prepare=True).rowcount
                    if done != len(got):
                        raise Failure(f"floor delete: {done} of {len(got)} rows")
                ids += got
    out.put(ids)


def floor_drain(dsn, workers, batch, n):
    floor_fresh(dsn)
    with connect(dsn) as c:
        for s in range(0, n, 5000):
            c.execute("INSERT INTO floor_q (payload) SELECT p FROM unnest(array_fill('{\"n\":1}'::jsonb, ARRAY[%s])) AS p",
                      [min(5000, n - s)])
        c.execute("VACUUM ANALYZE floor_q")
    elapsed, per_worker = run_procs(floor_drain_worker, [(dsn, batch)] * workers, collect=True)
    ids = [i for got in per_worker for i in got]
    left = floor_count(dsn)
    if len(ids) != n or len(set(ids)) != n or left:
        raise Failure(f"floor drain: {len(ids)} processed ({len(set(ids))} distinct) of {n}, {left} left")
    return n / elapsed


FLOOR_NOTIFY = "floor_q"


def floor_latency_listener(dsn, n, ready, out):
    """An idle floor worker: LISTEN on the table's channel, claim (UPDATE ... SKIP LOCKED) when
    woken until nothing is left, DELETE each claimed row."""
    lat, ids, wakes = [], [], []
    deadline = time.time() + 30 + 0.05 * n
    with connect(dsn) as listen, connect(dsn) as work:
        listen.execute(f"LISTEN {FLOOR_NOTIFY}")
        ready.set()
        while len(lat) < n and time.time() < deadline:
            for _ in listen.notifies(timeout=5, stop_after=1):
                woke = time.time()
                while True:
                    row = work.execute(FLOOR_CLAIM, prepare=True).fetchone()
                    if row is None:
                        break
                    lat.append(time.time() - row[1]["t0"])
                    wakes.append(woke - row[1]["t0"])
                    work.execute("DELETE FROM floor_q WHERE id = %s", [row[0]], prepare=True)
                    ids.append(row[0])
    out.put((lat, wakes, ids))


def floor_latency(dsn, n):
    """The latency cell's floor: a plain INSERT and a NOTIFY in the producer's transaction (one
    statement), an idle listener claiming with UPDATE ... SKIP LOCKED. What an idle wake-up
    and claim cost here with nothing of a queue's own in the way."""
    floor_fresh(dsn)
    ready, out = mp.Event(), mp.Queue()
    p = mp.Process(target=floor_latency_listener, args=(dsn, n, ready, out))
    p.start()
    ready.wait(10)
    with connect(dsn) as c:
        for _ in range(n):
            c.execute(f"WITH i AS (INSERT INTO floor_q (payload) VALUES (jsonb_build_object('t0', %s::float8)) RETURNING id) "
                      f"SELECT pg_notify('{FLOOR_NOTIFY}', '') FROM i", [time.time()], prepare=True)
            time.sleep(LATENCY_GAP_S)
    lat, wakes, ids = out.get(timeout=360)
    p.join()
    left = floor_count(dsn)
    if len(ids) != n or len(set(ids)) != n or left:
        raise Failure(f"floor latency: {len(ids)} claimed ({len(set(ids))} distinct) of {n}, {left} left")
    return latency_split(lat, wakes)


def floor_setup(dsn):
    with connect(dsn) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", [FLOOR_DB]).fetchone():
            c.execute(f"CREATE DATABASE {FLOOR_DB}")
    return db_dsn(dsn, FLOOR_DB)


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


# queue_ext as a user gets it (create_queue(q) and nothing else: every job's enqueue, claim and
# completion recorded in the audit trail, completed jobs archived), and each non-default
# configuration as its own row named by the setting it changes: keep_history off (what pgmq
# and graphile-worker keep: nothing once a job is done), and notify_events flipped from its
# default (the per-job NOTIFY's cost), when create_queue has it.
LEAN = "queue_ext, keep_history off"
LISTENING = "queue_ext, idle worker on LISTEN"  # the latency cell's other ways to wait
WAITING = "queue_ext, wait_for_jobs then get_next_job"
LEAN_CONFIG = {"keep_history": False}
NOTIFY_FLIP = "queue_ext, notify_events flipped"  # renamed in main() to say on or off
PGMQ_DEL = "pgmq, delete instead of archive"
FLOOR = "bare SQL floor"
HTTP_FLOOR = "bare HTTP floor"
# The HTTP floor's keep-alive connections: as many requests in flight as the burst's queue can
# have at most is more than 2 cores serve well with a thread each; this many keep them busy.
HTTP_FLOOR_CONNECTIONS = 64
RLS_OFF = "queue_ext, row level security off"
SYSTEMS = ["queue_ext", LEAN, LISTENING, WAITING, NOTIFY_FLIP, RLS_OFF, "pgmq", PGMQ_DEL, "graphile-worker", FLOOR, HTTP_FLOOR]
OURS = ("queue_ext", LEAN)
PEER_OF = {"pgmq": "pgmq", PGMQ_DEL: "pgmq", "graphile-worker": "graphile"}  # system -> its --only name
WORKLOADS = ("enqueue", "drain", "latency", "webhooks", "history")
QUICK_WORKLOADS = ("enqueue", "drain", "latency", "webhooks")
PEER_WORDS = {"pgmq": {"pgmq"}, "graphile": {"graphile"}, "peers": {"pgmq", "graphile"}}
# The floor runs in every enqueue and drain cell it has (it needs nothing fetched); the word
# stays accepted by --only and means those two workloads.
ALIASES = {"floor": {"enqueue", "drain"}}


def is_lean(config):
    return bool(config) and config.get("keep_history") is False


def selection(only, quick):
    """(workloads, peers) a run covers. Default: every workload and both peers; --quick:
    queue_ext's workloads only. --only names workloads and/or peers (pgmq, graphile, peers);
    peers alone mean enqueue, drain and latency. Peers join only enqueue, drain and latency,
    and in --quick only one small drain cell each."""
    if only is None:
        workloads, peers = (set(QUICK_WORKLOADS), set()) if quick else (set(WORKLOADS), {"pgmq", "graphile"})
    else:
        words = set(only.split(","))
        unknown = words - set(WORKLOADS) - set(PEER_WORDS) - set(ALIASES)
        if unknown:
            raise SystemExit(f"--only: unknown {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(WORKLOADS + tuple(PEER_WORDS) + tuple(ALIASES))}")
        peers = set().union(*(PEER_WORDS[w] for w in words & set(PEER_WORDS)))
        workloads = set().union(words & set(WORKLOADS), *(ALIASES[w] for w in words & set(ALIASES)))
        workloads = workloads or ({"enqueue", "drain", "latency"} if peers else set())
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
    print("\nqueue_ext: create_queue(q) with nothing else unless the row names a setting; enqueue_job / "
          "enqueue_jobs; get_next_job + complete_job (2 commits per job), as an ordinary worker role; batches: "
          "get_next_jobs(100) + complete_jobs in one transaction.\npgmq: send / send_batch; read(q, 30, 1) + "
          "archive (2 commits per message), or + delete where named; batches: read(q, 30, 100) + archive(ids) "
          "in one transaction; latency: LISTEN on its enable_notify_insert channel (no throttle).\nbare SQL "
          "floor: a plain table (bigserial id, status, jsonb payload) through the same client: INSERT; "
          "INSERT ... SELECT FROM unnest(array) of 1,000; UPDATE ... SKIP LOCKED LIMIT 1 RETURNING then DELETE "
          "by id, each its own commit; batches: UPDATE ... SKIP LOCKED LIMIT 100 RETURNING + DELETE WHERE id = "
          "ANY in one transaction; latency: INSERT + NOTIFY in one statement, an idle listener claiming with "
          "UPDATE ... SKIP LOCKED.\ngraphile-worker: add_job / add_jobs from Python; drains and latency by its "
          "own Node worker, run() with concurrency = workers, a no-op task, timed from the first task start "
          "until its jobs table is empty; batches: localQueue size 100 and completeJobBatchDelay 0 (its batched "
          "claim and completion).")


def headline(cells, history, quick, batch):
    """The core paths with the defaults at 4 clients, beside pgmq and the bare-SQL floor
    of the same run, with the ratios and the targets (medians of this run)."""
    def med(system, workload, variant):
        c = cells.get((system, workload, variant))
        return c.summary()[0] if c else None

    rows = []

    def add(path, unit, q, p, f, target, met):
        rows.append({"path": path, "unit": unit, "queue_ext": q, "pgmq": p, "floor": f,
                     "queue_ext_over_pgmq": q / p if q is not None and p else None,
                     "queue_ext_over_floor": q / f if q is not None and f else None,
                     "target": target, "met": None if quick or q is None else met})

    def ge(q, ref, k):
        return None if q is None or ref is None else q >= k * ref

    e1, eb = "1 per call, 4 connection(s)", f"batches of {batch:,}, 4 connection(s)"
    d1, db = "claim+complete, 4 worker(s)", "batches of 100, 4 worker(s)"
    q, p, f = (med(s, "enqueue", e1) for s in ("queue_ext", "pgmq", FLOOR))
    met = None if ge(q, p, 1.0) is None or ge(q, f, 0.9) is None else ge(q, p, 1.0) and ge(q, f, 0.9)
    add("single enqueue (`enqueue_job` / `send` / INSERT)", "jobs/s", q, p, f, "≥ 1.0× pgmq, ≥ 0.9× floor", met)
    q, p, f = (med(s, "drain", d1) for s in ("queue_ext", "pgmq", FLOOR))
    add("claim + complete, 1 per call (`get_next_job` + `complete_job` / `read` + `archive` / "
        "UPDATE SKIP LOCKED + DELETE)", "jobs/s", q, p, f, "≥ 1.0× pgmq", ge(q, p, 1.0))
    q = med("queue_ext", "drain", "complete_and_get_next, 4 worker(s)")
    add("`complete_and_get_next` (against `read` + `archive` / UPDATE SKIP LOCKED + DELETE)", "jobs/s",
        q, p, f, "≥ 1.5× pgmq", ge(q, p, 1.5))
    q, p, f = (med(s, "enqueue", eb) for s in ("queue_ext", "pgmq", FLOOR))
    add(f"enqueue, batches of {batch:,} (`enqueue_jobs` / `send_batch` / INSERT ... SELECT unnest)", "jobs/s",
        q, p, f, "≥ 1.0× pgmq", ge(q, p, 1.0))
    q, p, f = (med(s, "drain", db) for s in ("queue_ext", "pgmq", FLOOR))
    add("drain, batches of 100 in one transaction (`get_next_jobs` + `complete_jobs` / `read` + "
        "`archive(ids)` / UPDATE SKIP LOCKED + DELETE ANY)", "jobs/s", q, p, f, "≥ 1.0× pgmq", ge(q, p, 1.0))
    for k, limit in (("p50_ms", 2.0), ("p99_ms", 8.0)):
        q, p, f = (med(s, "latency", f"idle enqueue->claim {k}") for s in ("queue_ext", "pgmq", FLOOR))
        add(f"idle latency enqueue → claim, {k[:3]} (floor: INSERT + NOTIFY, LISTEN, UPDATE SKIP LOCKED)",
            "ms", q, p, f, f"≤ {limit:g} ms",
            None if q is None else q <= limit)
    q = med("queue_ext", "webhooks", "delivered per second")
    if q is not None:
        add("webhooks delivered by the dispatcher (floor: HTTP alone)", "jobs/s",
            q, None, med(HTTP_FLOOR, "webhooks", "delivered per second"), "≥ 20,000/s", q >= 20_000)
    q = med("queue_ext", "webhooks", "idle enqueue->request p50_ms")
    if q is not None:
        add("webhook idle enqueue → request, p50", "ms", q, None, None, "≤ 5 ms", q <= 5.0)
    if history:
        add(f"claim + complete with {history['retained_jobs']:,} finished jobs retained, % of an empty history",
            "%", history["pct_of_empty"], None, None, "≥ 90%", history["pct_of_empty"] >= 90)
    return rows


def headline_markdown(rows, quick):
    def val(v, unit):
        if v is None:
            return "—"
        return {"ms": f"{v:,.2f} ms", "%": f"{v:.0f}%"}.get(unit, f"{v:,.0f}/s")

    def ratio(v):
        return "—" if v is None else f"{v:.2f}×"

    lines = ["## Headline (defaults, 4 clients)", "",
             "| path | queue_ext | pgmq | floor | queue_ext/pgmq | queue_ext/floor | target | met |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        met = "not judged (--quick)" if quick else {True: "yes", False: "**no**", None: "—"}[r["met"]]
        lines.append(f"| {r['path']} | {val(r['queue_ext'], r['unit'])} | {val(r['pgmq'], r['unit'])} | "
                     f"{val(r['floor'], r['unit'])} | {ratio(r['queue_ext_over_pgmq'])} | "
                     f"{ratio(r['queue_ext_over_floor'])} | {r['target']} | {met} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn")
    ap.add_argument("--port", type=int)
    ap.add_argument("--sink-port", type=int)
    ap.add_argument("--sink-pid", type=int, help="the sink's process, for the CPU split of the webhook cell")
    ap.add_argument("--http-floor", help="the webhook cell's floor client (bench/sink-rs/src/http_floor.rs)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=None,
                    help="comma-separated workloads (enqueue,drain,latency,webhooks,history; floor = enqueue,drain) and/or "
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

    global NOTIFY_FLIP
    floor_dsn = floor_setup(dsn)
    if "history" in workloads:
        history_databases(dsn)
    channel = wake_channel(dsn)
    waiter = idle_wait(dsn, channel)
    notify_default = create_queue_default(dsn, "notify_events", "notify")
    flip = None if notify_default is None else {"notify_events": not notify_default}
    if flip:
        SYSTEMS[SYSTEMS.index(NOTIFY_FLIP)] = NOTIFY_FLIP = f"queue_ext, notify_events {'off' if notify_default else 'on'}"
    info = settings(dsn, peers)
    info["latency_channel"] = channel
    info["latency_idle_wait"] = waiter
    print("# queue_ext benchmark")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"workloads: {', '.join(w for w in WORKLOADS if w in workloads)}; peers: {', '.join(sorted(peers)) or 'none'}"
          f"; the bare-SQL floor in every enqueue, drain and latency cell")
    print(f"queue_ext rows: create_queue(q) with its defaults (notify_events default: {notify_default}) unless the "
          f"row names a setting; idle workers wait in "
          f"{idle_wait_words(waiter, channel)}")
    print(f"job counts: {asdict(n)}; {reps} round(s), cells interleaved, systems rotating", flush=True)
    cells: dict[tuple, Cell] = {}

    def record(workload, variant, unit, value, system="queue_ext"):
        cells.setdefault((system, workload, variant), Cell(workload, variant, unit, system=system)).values.append(value)
        print(f"  {system:<32} {workload:<8} {variant:<45} {value:>10.1f} {unit}", flush=True)

    def cell(rep, workload, variant, unit, runs, in_quick=False):
        """Runs one cell for every selected system, back to back, the order rotating by round.
        A run returning a dict (latency percentiles) records one cell per key. queue_ext's rows
        and the floor always run; a peer's only when selected (in --quick, only in_quick cells)."""
        runs = [(s, fn) for s, fn in runs.items()
                if s in OURS or s in (FLOOR, NOTIFY_FLIP, LISTENING, WAITING) or (PEER_OF[s] in peers and (in_quick or not quick))]
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
                runs = {"queue_ext": lambda: bench_enqueue(dsn, c, 1, n.enqueue),
                        LEAN: lambda: bench_enqueue(dsn, c, 1, n.enqueue, LEAN_CONFIG),
                        "pgmq": lambda: pgmq_enqueue(pgmq_dsn, c, 1, n.enqueue),
                        "graphile-worker": lambda: gw_enqueue(gw_dsn, c, 1, n.enqueue),
                        FLOOR: lambda: floor_enqueue(floor_dsn, c, 1, n.enqueue)}
                if c == 4 and flip:
                    runs[NOTIFY_FLIP] = lambda: bench_enqueue(dsn, c, 1, n.enqueue, flip)
                cell(rep, "enqueue", f"1 per call, {c} connection(s)", "jobs/s", runs, in_quick=(c == 4))
            b = n.enqueue_batch
            for c in (1, 4):
                cell(rep, "enqueue", f"batches of {b:,}, {c} connection(s)", "jobs/s", {
                    "queue_ext": lambda: bench_enqueue(dsn, c, b, n.enqueue_batched),
                    LEAN: lambda: bench_enqueue(dsn, c, b, n.enqueue_batched, LEAN_CONFIG),
                    "pgmq": lambda: pgmq_enqueue(pgmq_dsn, c, b, n.enqueue_batched),
                    "graphile-worker": lambda: gw_enqueue(gw_dsn, c, b, n.enqueue_batched),
                    FLOOR: lambda: floor_enqueue(floor_dsn, c, b, n.enqueue_batched)}, in_quick=(c == 4))
        if "drain" in workloads:
            for w in (1, 4, 8):
                runs = {"queue_ext": lambda: bench_drain(dsn, w, 1, n.drain),
                        LEAN: lambda: bench_drain(dsn, w, 1, n.drain, config=LEAN_CONFIG),
                        "pgmq": lambda: pgmq_drain(pgmq_dsn, w, 1, n.drain, finish="archive"),
                        "graphile-worker": lambda: gw_drain(gw_dsn, gw_url, w, 1, n.drain),
                        FLOOR: lambda: floor_drain(floor_dsn, w, 1, n.drain)}
                if w == 4:
                    runs[PGMQ_DEL] = lambda: pgmq_drain(pgmq_dsn, w, 1, n.drain, finish="delete")
                    if flip:
                        runs[NOTIFY_FLIP] = lambda: bench_drain(dsn, w, 1, n.drain, config=flip)
                cell(rep, "drain", f"claim+complete, {w} worker(s)", "jobs/s", runs, in_quick=(w == 4))
            for w in (1, 4):  # the same drain with row level security off (what RLS costs a claim)
                record("drain", f"claim+complete, {w} worker(s)", "jobs/s",
                       bench_drain(dsn, w, 1, n.drain, rls=False), RLS_OFF)
            for w in (1, 4):
                cell(rep, "drain", f"complete_and_get_next, {w} worker(s)", "jobs/s", {
                    "queue_ext": lambda: bench_drain(dsn, w, 0, n.drain),
                    LEAN: lambda: bench_drain(dsn, w, 0, n.drain, config=LEAN_CONFIG)})
            for w in (1, 4):
                runs = {"queue_ext": lambda: bench_drain(dsn, w, 100, n.drain_batched),
                        LEAN: lambda: bench_drain(dsn, w, 100, n.drain_batched, config=LEAN_CONFIG),
                        "pgmq": lambda: pgmq_drain(pgmq_dsn, w, 100, n.drain_batched, finish="archive"),
                        "graphile-worker": lambda: gw_drain(gw_dsn, gw_url, w, 100, n.drain_batched),
                        FLOOR: lambda: floor_drain(floor_dsn, w, 100, n.drain_batched)}
                if w == 4:
                    runs[PGMQ_DEL] = lambda: pgmq_drain(pgmq_dsn, w, 100, n.drain_batched, finish="delete")
                cell(rep, "drain", f"batches of 100, {w} worker(s)", "jobs/s", runs, in_quick=(w == 4))
        if "latency" in workloads:
            runs = {"queue_ext": lambda: bench_latency(dsn, n.latency, waiter),
                    LEAN: lambda: bench_latency(dsn, n.latency, waiter, LEAN_CONFIG),
                    LISTENING: lambda: bench_latency(dsn, n.latency, channel),
                    "pgmq": lambda: pgmq_latency(pgmq_dsn, n.latency),
                    "graphile-worker": lambda: gw_latency(gw_dsn, gw_url, n.latency),
                    FLOOR: lambda: floor_latency(floor_dsn, n.latency)}
            if waiter == NEXT_PROCEDURE:
                runs[WAITING] = lambda: bench_latency(dsn, n.latency, WAIT_PROCEDURE)
            cell(rep, "latency", "idle enqueue->claim", "ms", runs, in_quick=True)
        if "webhooks" in workloads:
            for system in (OURS if rep % 2 == 0 else OURS[::-1]):
                hooks = bench_webhooks(dsn, args.sink_port, n.webhooks, lean=system == LEAN, sink_pid=args.sink_pid)
                record("webhooks", "delivered per second", "jobs/s", hooks["per_s"], system)
                for part, us in hooks["cpu_us_per_webhook"].items():
                    record("webhooks", f"CPU per webhook: {part}", "µs", us, system)
                if hooks["cpu_us_per_webhook"]:
                    record("webhooks", "CPU per webhook: total", "µs", sum(hooks["cpu_us_per_webhook"].values()), system)
                extra.setdefault("webhook_burst" + ("_keep_history_off" if system == LEAN else ""), []).append(hooks)
            if args.http_floor:
                floor = http_floor(args.http_floor, args.sink_port, n.webhooks, args.sink_pid)
                record("webhooks", "delivered per second", "jobs/s", floor["per_s"], HTTP_FLOOR)
                for part, us in floor["cpu_us"].items():
                    record("webhooks", f"CPU per webhook: {part}", "µs", us, HTTP_FLOOR)
            beside = bench_webhooks_beside_slow(dsn, args.sink_port, n.webhooks)
            record("webhooks", "delivered/s beside a 5 s endpoint", "jobs/s", beside["per_s"])
            for system in OURS:
                paced = bench_webhooks(dsn, args.sink_port, n.webhooks_paced, paced=True, lean=system == LEAN)
                for k in ("p50_ms", "p99_ms"):
                    record("webhooks", f"idle enqueue->request {k}", "ms", paced[k], system)

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
    print_side_by_side(cells)
    if history:
        print(f"\nhistory: with {history['retained_jobs']:,} finished jobs retained ({history['history_rows']:,} "
              f"history rows, {history['size']}) the 4-worker claim+complete drain runs at "
              f"{history['pct_of_empty']:.0f}% of the empty-history throughput (medians; per round: "
              + ", ".join(f"{p:.0f}%" for p in history["pct_paired_rounds"]) + ")")
    rows = headline(cells, history, quick, n.enqueue_batch)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if quick else ''}"
    out = results / f"{stem}.json"
    out.write_text(json.dumps({"settings": info, "counts": asdict(n), "reps": reps,
                               "workloads": sorted(workloads), "peers": sorted(peers),
                               "cells": [asdict(c) for c in cells.values()], "extra": extra, "headline": rows},
                              indent=2))
    checked = ["every drain of every system (the floor too) processed each job exactly once",
               "every enqueue stored what it sent", f"every latency job was claimed after a wake-up on {channel}"]
    if "webhooks" in workloads:
        checked.append("webhooks: none lost")
    print("\ncorrectness: " + "; ".join(checked))
    print(f"wrote {out}")
    table = headline_markdown(rows, quick)
    note = (f"queue_ext: create_queue(q) and nothing else; pgmq {info.get('pgmq', '(not run)')}, drains finishing "
            f"with archive; floor: a plain table through the same client (psycopg), same connections; for "
            f"webhooks, the same sink sent requests of a delivery's size over {HTTP_FLOOR_CONNECTIONS} keep-alive "
            f"connections by a std-only client, no database (bench/sink-rs/src/http_floor.rs). Medians of "
            f"{reps} round(s), jobs/s unless marked (latency: lower is better, so a ratio under 1 is ahead). "
            f"Latency: queue_ext's idle worker waits in "
            f"{idle_wait_words(waiter, channel)}"
            f"{'; the row ' + repr(LISTENING) + ' on LISTEN ' + channel if waiter != channel else ''}"
            f"{'; the row ' + repr(WAITING) + ' in CALL queue_ext.wait_for_jobs, then get_next_job' if waiter == NEXT_PROCEDURE else ''}."
            + (" --quick: counts too small to judge speed." if quick else ""))
    cpu_line = webhook_cpu_line(cells, info.get("cpus"))
    if cpu_line:
        note += "\n\n" + cpu_line
    settings_line = "settings: " + ", ".join(f"{k}={v}" for k, v in info.items())
    md = results / f"{stem}-headline.md"
    md.write_text(f"{table}\n\n{note}\n\n{settings_line}\n")
    print(f"wrote {md}\n\n{table}\n\n{note}")


def webhook_cpu_line(cells, cpus):
    """Where a delivered webhook's CPU goes (medians of the burst cells, defaults), and the
    rate that much CPU allows on this machine's cores."""
    prefix = "CPU per webhook: "
    parts = {c.variant[len(prefix):]: c.summary()[0] for c in cells.values()
             if c.system == "queue_ext" and c.workload == "webhooks" and c.variant.startswith(prefix)}
    total = parts.pop("total", None)
    if not total:
        return None
    split = ", ".join(f"{k} {v:,.0f}" for k, v in parts.items())
    bound = f"; {cpus} cores at full use allow at most {cpus * 1e6 / total:,.0f}/s" if cpus else ""
    return f"CPU per delivered webhook (µs, from /proc over the burst): {split}; total {total:,.0f}{bound}."


def create_queue_default(dsn, param, column):
    """create_queue's default for one setting, read back from a queue made with nothing else
    (None when create_queue has no such parameter): the non-default row is its opposite."""
    with connect(dsn) as c:
        if not c.execute("""SELECT bool_or(%s = ANY(p.proargnames)) FROM pg_proc AS p
                            WHERE p.oid IN (SELECT oid FROM pg_proc WHERE proname = 'create_queue'
                                            AND pronamespace = 'queue_ext'::regnamespace)""", [param]).fetchone()[0]:
            return None
        fresh_queue(dsn, "bench_probe")
        got = c.execute("SELECT to_jsonb(q) -> %s FROM queue_ext.queues AS q WHERE q.queue_name = 'bench_probe'",
                        [column]).fetchone()[0]
        c.execute("SELECT queue_ext.drop_queue('bench_probe', force => true)")
    return got if isinstance(got, bool) else None


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        print(f"CORRECTNESS FAILURE: {e}", file=sys.stderr)
        sys.exit(1)
