"""The soak: N jobs through 16 SQL workers while faults are injected, then an exact count.

    bash bench/soak.sh [--jobs N] [--workers W] [--rate R] [--fault-every S] ...

One throwaway PostgreSQL 15 cluster (scripts/cluster.sh through tests/pgcluster.py, queue_ext
preloaded, default durability; the only setting added lets the dispatcher reach the loopback
sink). Producers enqueue N jobs into a plain queue with a short lease, in batches, at a steady
rate; a fraction of the jobs fail their first attempt (fail_job, so retries happen) and a few
are poison (fail every attempt, so the dead letter queue fills by the rules). W SQL worker
connections claim (get_next_jobs batches, and some get_next_job one at a time) and complete
with their lease tokens, each in its own transaction, recording on the client every completion
that Postgres confirmed. Beside them two webhook queues are fed at low rates and delivered by
the dispatcher to a local HTTP sink (bench/sink.py) that counts requests per webhook-id: one
answers at once, one after 5 s (so requests are in flight whenever the dispatcher is killed).

Every few seconds a fault: pg_terminate_backend of a random worker backend (most often), of a
producer's backend, or of the dispatcher; and twice per run, at fixed shares of the work, the
postmaster: a fast restart (scripts/cluster.sh restart) and a kill -9 (Cluster.kill_postmaster).
Clients reconnect with backoff. A claim whose connection died leaves its jobs running under a
lease nobody holds: the next claim returns them once the lease expires (the attempt counts).
An enqueue whose connection died is resolved by its batch tag (committed whole or not at all)
before it is sent again; a completion whose connection died is recorded as unconfirmed.

The count at the end, over the database and the client records:
  - every enqueued id is in job_archive as completed exactly once, or in job_dead_letter once
    (never both); nothing else is there; nothing is left in job_queue
  - dead by the rules: attempt = max_attempts, one recorded error per attempt; poison jobs all
    dead, none completed; every fail-once job that completed did so on a later attempt
  - fencing: no id has two confirmed completions; every confirmed completion is archived;
    an archived job without a confirmed completion had one whose reply was lost
  - webhooks: every webhook job archived reached the sink; never more requests for a job than
    the attempts it made plus the deliveries a stopping dispatcher released uncounted (reported
    apart); duplicates only under the same webhook-id, each with its cause
Exits 1 if any check fails. JSON goes to bench/results/soak-<time>.json."""
import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
from bench import Failure, as_worker, connect, fresh_queue, sink_stats  # noqa: E402
from pgcluster import Cluster, dispatcher_pid  # noqa: E402

QUEUE = "soak"
HOOKS = "soak_hooks"
SLOW_HOOKS = "soak_hooks_slow"  # its endpoint answers after 5 s
HOOK_QUEUES = [HOOKS, SLOW_HOOKS]
# Payload kinds: 0 completes at once, 1 fails its first attempt, 2 fails every attempt.
NORMAL, FAIL_ONCE, POISON = 0, 1, 2


def elapsed(t0):
    return round(time.time() - t0, 1)


class Reconnecting:
    """An autocommit connection that is re-opened with growing backoff (50 ms to 2 s) after
    it was lost: a terminated backend, a restarting or recovering server."""

    def __init__(self, dsn, stop):
        self.dsn, self.stop, self.conn, self.reconnects = dsn, stop, None, 0

    def get(self):
        delay = 0.05
        while self.conn is None or self.conn.closed:
            if self.stop.is_set():
                raise SystemExit(0)
            try:
                self.conn = connect(self.dsn)
            except psycopg.OperationalError:
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        return self.conn

    def lost(self):
        self.reconnects += 1
        try:
            self.conn.close()
        except Exception:
            pass
        self.conn = None


# --- producers

def producer(dsn, name, queue, n, rate, batch, fail_fraction, poison_fraction, seed, files, stop, done_flag, counter):
    """Enqueues n jobs (or until done_flag, when n is None) at `rate` jobs/s in batches, each
    batch tagged. Writes every enqueued id to files/enq-<name>.ids. A batch whose connection
    died mid-call is looked up by its tag: committed whole (ids recorded) or not at all (sent
    again)."""
    rng = random.Random(seed)
    db = Reconnecting(f"{dsn} application_name=soak-producer-{name}", stop)
    out = open(files / f"enq-{name}.ids", "w")
    stats = {"batches": 0, "enqueued": 0, "ambiguous": 0, "resolved_committed": 0, "resolved_absent": 0, "reconnects": 0}
    t_next = time.time()
    seq = 0
    while (n is None and not done_flag.is_set()) or (n is not None and stats["enqueued"] < n):
        size = batch if n is None else min(batch, n - stats["enqueued"])
        tag = f"{name}-{seq}"
        seq += 1
        kinds = []
        for _ in range(size):
            r = rng.random()
            kinds.append(POISON if r < poison_fraction else FAIL_ONCE if r < poison_fraction + fail_fraction else NORMAL)
        payloads = [json.dumps({"b": tag, "k": k, "t0": time.time()}) for k in kinds]
        t_next += size / rate
        pause = t_next - time.time()
        if pause > 0:
            time.sleep(pause)
        ids = None
        while ids is None:
            try:
                ids = [r[0] for r in db.get().execute(
                    "SELECT id FROM queue_ext.enqueue_jobs(%s, %s::jsonb[]) AS id", [queue, payloads], prepare=True)]
            except psycopg.OperationalError:
                db.lost()
                stats["ambiguous"] += 1
                ids = resolve_batch(db, queue, tag, size)
                stats["resolved_committed" if ids else "resolved_absent"] += 1
                ids = ids or None
        out.write("".join(f"{i}\t{queue}\n" for i in ids))
        out.flush()
        stats["batches"] += 1
        stats["enqueued"] += len(ids)
        with counter.get_lock():
            counter.value += len(ids)
    out.close()
    stats["reconnects"] = db.reconnects
    (files / f"enq-{name}.json").write_text(json.dumps(stats))


def resolve_batch(db, queue, tag, size):
    """The ids of a batch whose enqueue may or may not have committed, wherever its jobs are now
    (queued, running, finished, dead); [] when it did not commit. A partial batch would mean an
    enqueue was not atomic."""
    while True:
        try:
            ids = [r[0] for r in db.get().execute(
                """SELECT id FROM queue_ext.job_queue WHERE queue_name = %(q)s AND payload->>'b' = %(t)s
                   UNION ALL SELECT id FROM queue_ext.job_archive WHERE queue_name = %(q)s AND payload->>'b' = %(t)s
                   UNION ALL SELECT id FROM queue_ext.job_dead_letter WHERE queue_name = %(q)s AND payload->>'b' = %(t)s""",
                {"q": queue, "t": tag})]
        except psycopg.OperationalError:
            db.lost()
            continue
        if ids and len(ids) != size:
            raise Failure(f"batch {tag}: {len(ids)} of {size} jobs committed")
        return ids


# --- SQL workers

def worker(dsn, i, batch, files, stop, progress):
    """Claims (get_next_jobs(q, batch), or get_next_job when batch is 1) and completes with the
    lease tokens, one transaction per call. Logs 'C id' for each completion Postgres confirmed,
    'A id' for each whose reply was lost with the connection (it may or may not have committed)."""
    me = f"soak-{i}"
    db = Reconnecting(f"{dsn} application_name=soak-worker-{i}", stop)
    log = open(files / f"done-{i}.log", "w")
    s = {"claims": 0, "claimed": 0, "empty_claims": 0, "confirmed": 0, "unconfirmed": 0, "fenced_complete": 0,
         "injected_failures": 0, "fail_dead": 0, "fenced_fail": 0, "errors": {}}
    published = 0
    while not stop.is_set():
        try:
            c = db.get()
        except SystemExit:
            break
        in_flight = []  # ids whose completion was sent and not answered yet
        try:
            if batch == 1:
                rows = c.execute("SELECT job_id, lease_token, payload, attempt FROM queue_ext.get_next_job(%s, %s)",
                                 [QUEUE, me], prepare=True).fetchall()
            else:
                rows = c.execute("SELECT job_id, lease_token, payload, attempt FROM queue_ext.get_next_jobs(%s, %s, %s)",
                                 [QUEUE, batch, me], prepare=True).fetchall()
            s["claims"] += 1
            if not rows:
                s["empty_claims"] += 1
                time.sleep(0.05)
                continue
            s["claimed"] += len(rows)
            finish = []
            for job_id, token, payload, attempt in rows:
                if payload["k"] == POISON or (payload["k"] == FAIL_ONCE and attempt == 1):
                    try:
                        state = c.execute("SELECT queue_ext.fail_job(%s, 'injected failure', %s)", [job_id, token],
                                          prepare=True).fetchone()[0]
                        s["injected_failures"] += 1
                        s["fail_dead"] += state == "dead"
                    except psycopg.errors.ObjectNotInPrerequisiteState:
                        s["fenced_fail"] += 1  # its lease had expired: returned as "lease expired"
                else:
                    finish.append((job_id, token))
            if batch == 1:
                for job_id, token in finish:
                    in_flight = [job_id]
                    try:
                        c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job_id, token], prepare=True)
                        log.write(f"C\t{job_id}\n")
                        s["confirmed"] += 1
                    except psycopg.errors.ObjectNotInPrerequisiteState:
                        s["fenced_complete"] += 1  # refused: the lease expired or is not ours
                    in_flight = []
            elif finish:
                in_flight = [f[0] for f in finish]
                states = c.execute("SELECT job_id, status FROM queue_ext.complete_jobs(%s::uuid[], %s::uuid[])",
                                   [in_flight, [f[1] for f in finish]], prepare=True).fetchall()
                in_flight = []
                for job_id, state in states:
                    if state == "completed":
                        log.write(f"C\t{job_id}\n")
                        s["confirmed"] += 1
                    else:
                        s["fenced_complete"] += 1
        except psycopg.OperationalError:
            if in_flight:
                log.write("".join(f"A\t{j}\n" for j in in_flight))
                s["unconfirmed"] += len(in_flight)
            db.lost()  # claimed jobs not finished come back when their lease expires
        except psycopg.Error as e:  # rolled back: the same; counted, reported, never ignored silently
            key = f"{e.sqlstate}: {str(e).splitlines()[0][:160]}"
            s["errors"][key] = s["errors"].get(key, 0) + 1
            time.sleep(0.05)
        log.flush()
        if s["confirmed"] != published:
            with progress.get_lock():
                progress.value += s["confirmed"] - published
            published = s["confirmed"]
    log.close()
    s["reconnects"] = db.reconnects
    (files / f"done-{i}.json").write_text(json.dumps(s))


# --- faults

class Injector(threading.Thread):
    """Every `every` seconds one fault, drawn with a seeded generator: pg_terminate_backend of a
    worker's backend (weight 6), of a producer's (2, while producers run) or of the dispatcher
    (2). The postmaster restarts once at `restart_at` of the confirmed completions (fast
    shutdown, scripts/cluster.sh restart) and is killed with SIGKILL once at `kill_at`."""

    def __init__(self, cluster, every, seed, progress, n, producers_done, restart_at, kill_at):
        super().__init__(daemon=True)
        self.cluster, self.every, self.rng = cluster, every, random.Random(seed)
        self.progress, self.n, self.producers_done = progress, n, producers_done
        self.restarts = sorted([(restart_at, "postmaster_restart"), (kill_at, "postmaster_kill9")])
        self.halt = threading.Event()
        self.log = []           # one dict per fault
        self.dispatcher_back = []  # seconds from a dispatcher kill until a new one ran
        self.error = None

    def sql(self, query, args=()):
        deadline = time.time() + 120
        while True:
            try:
                with connect(self.cluster.dsn) as c:
                    return c.execute(query, args).fetchall()
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def terminate(self, pattern):
        row = self.sql("SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE %s "
                       "ORDER BY random() LIMIT 1", [pattern])
        if not row:
            return None
        ok = self.sql("SELECT pg_terminate_backend(%s)", [row[0][0]])[0][0]
        return {"pid": row[0][0], "who": row[0][1], "terminated": ok}

    def dispatcher(self):
        with connect(self.cluster.dsn) as c:
            return dispatcher_pid(c)

    def inject(self, kind):
        t = time.time()
        entry = {"at": t, "kind": kind}
        if kind == "worker_backend":
            entry.update(self.terminate("soak-worker-%") or {"skipped": "no worker connected"})
        elif kind == "producer_backend":
            entry.update(self.terminate("soak-producer-%") or {"skipped": "no producer connected"})
        elif kind == "dispatcher":
            pid = self.dispatcher()
            if pid is None:
                entry["skipped"] = "no dispatcher running"
            else:
                entry.update(pid=pid, terminated=self.sql("SELECT pg_terminate_backend(%s)", [pid])[0][0])
                self.await_dispatcher(pid, t)
        elif kind == "postmaster_restart":
            subprocess.run(["bash", str(ROOT / "scripts" / "cluster.sh"), "restart", str(self.cluster.dir)], check=True)
        elif kind == "postmaster_kill9":
            entry["pid"] = self.cluster.postmaster_pid()
            self.cluster.kill_postmaster()
        entry["took_s"] = round(time.time() - t, 2)
        self.log.append(entry)
        print(f"  fault: {kind} {'' if 'skipped' not in entry else '(skipped: ' + entry['skipped'] + ')'}"
              f"{entry.get('who', '')} took {entry['took_s']} s", flush=True)

    def await_dispatcher(self, old, t):
        while time.time() - t < 60:  # even when the run has ended: its return is checked
            try:
                pid = self.dispatcher()
            except psycopg.OperationalError:
                pid = None
            if pid and pid != old:
                self.dispatcher_back.append(round(time.time() - t, 2))
                return
            time.sleep(0.1)
        self.dispatcher_back.append(None)  # not back within 60 s (reported as a failure)

    def run(self):
        try:
            while not self.halt.wait(self.every):
                share = self.progress.value / self.n
                if self.restarts and share >= self.restarts[0][0]:
                    kind = self.restarts.pop(0)[1]
                else:
                    kind = self.rng.choices(["worker_backend", "producer_backend", "dispatcher"], [6, 2, 2])[0]
                    if kind == "producer_backend" and self.producers_done.is_set():
                        kind = "worker_backend"
                self.inject(kind)
        except Exception as e:  # reported as a failure of the run
            self.error = repr(e)
            print(f"fault injector failed: {e!r}", flush=True)


# --- the count

def load_client_records(c, files):
    c.execute("CREATE UNLOGGED TABLE soak_enqueued (id uuid, queue text)")
    c.execute("CREATE UNLOGGED TABLE soak_done (kind char(1), id uuid)")
    for table, pattern in (("soak_enqueued", "enq-*.ids"), ("soak_done", "done-*.log")):
        with c.cursor().copy(f"COPY {table} FROM STDIN") as cp:
            for f in sorted(files.glob(pattern)):
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        cp.write(chunk)
    c.execute("CREATE INDEX ON soak_done (id)")
    c.execute("ANALYZE soak_enqueued")
    c.execute("ANALYZE soak_done")


def one(c, sql, args=None):
    return c.execute(sql, args or {}).fetchone()


def count_jobs(c, q):
    """Where every enqueued job of queue q ended, in the database."""
    a = {"q": q}
    r = {}
    r["enqueued"], r["enqueued_distinct"] = one(c, "SELECT count(*), count(DISTINCT id) FROM soak_enqueued WHERE queue = %(q)s", a)
    r["archived_rows"], r["archived_ids"], r["archived_not_completed"] = one(c, """
        SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE status <> 'completed')
        FROM queue_ext.job_archive WHERE queue_name = %(q)s""", a)
    r["dead_rows"], r["dead_ids"] = one(c, "SELECT count(*), count(DISTINCT id) FROM queue_ext.job_dead_letter WHERE queue_name = %(q)s", a)
    r["archived_and_dead"] = one(c, """SELECT count(*) FROM (SELECT id FROM queue_ext.job_archive WHERE queue_name = %(q)s
                                       INTERSECT SELECT id FROM queue_ext.job_dead_letter WHERE queue_name = %(q)s) x""", a)[0]
    r["left_in_job_queue"] = one(c, "SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %(q)s", a)[0]
    r["lost"] = one(c, """SELECT count(*) FROM (SELECT id FROM soak_enqueued WHERE queue = %(q)s
                          EXCEPT (SELECT id FROM queue_ext.job_archive WHERE queue_name = %(q)s
                                  UNION SELECT id FROM queue_ext.job_dead_letter WHERE queue_name = %(q)s)) x""", a)[0]
    r["never_enqueued"] = one(c, """SELECT count(*) FROM ((SELECT id FROM queue_ext.job_archive WHERE queue_name = %(q)s
                                    UNION SELECT id FROM queue_ext.job_dead_letter WHERE queue_name = %(q)s)
                                   EXCEPT SELECT id FROM soak_enqueued WHERE queue = %(q)s) x""", a)[0]
    r["retries"] = one(c, """SELECT coalesce(sum(attempt - 1), 0) FROM (SELECT attempt FROM queue_ext.job_archive WHERE queue_name = %(q)s
                             UNION ALL SELECT attempt FROM queue_ext.job_dead_letter WHERE queue_name = %(q)s) x""", a)[0]
    r["errors_by_text"] = dict(c.execute("""
        SELECT e->>'error', count(*) FROM (SELECT errors FROM queue_ext.job_archive WHERE queue_name = %(q)s
                                            UNION ALL SELECT errors FROM queue_ext.job_dead_letter WHERE queue_name = %(q)s) x,
                                           jsonb_array_elements(x.errors) AS e
        GROUP BY 1 ORDER BY 2 DESC""", a).fetchall())
    r["attempts_of_completed"] = {str(k): v for k, v in c.execute(
        "SELECT attempt, count(*) FROM queue_ext.job_archive WHERE queue_name = %(q)s GROUP BY 1 ORDER BY 1", a)}
    r["dead_by_reason"] = dict(c.execute(
        "SELECT reason, count(*) FROM queue_ext.job_dead_letter WHERE queue_name = %(q)s GROUP BY 1 ORDER BY 2 DESC", a).fetchall())
    # An attempt ends in exactly one of: completion, or a failure recorded in errors.
    r["archived_errors_not_attempts_minus_1"] = one(c, """
        SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = %(q)s AND jsonb_array_length(errors) <> attempt - 1""", a)[0]
    r["dead_not_by_rules"] = one(c, """
        SELECT count(*) FROM queue_ext.job_dead_letter
        WHERE queue_name = %(q)s AND (attempt <> max_attempts OR jsonb_array_length(errors) <> attempt)""", a)[0]
    return r


def count_fencing(c):
    r = {}
    r["confirmed_completions"], r["confirmed_ids"] = one(c, "SELECT count(*), count(DISTINCT id) FROM soak_done WHERE kind = 'C'")
    r["unconfirmed_completions"] = one(c, "SELECT count(*) FROM soak_done WHERE kind = 'A'")[0]
    r["ids_confirmed_twice"] = one(c, "SELECT count(*) FROM (SELECT id FROM soak_done WHERE kind = 'C' GROUP BY id HAVING count(*) > 1) x")[0]
    r["confirmed_not_archived"] = one(c, """SELECT count(*) FROM (SELECT id FROM soak_done WHERE kind = 'C'
        EXCEPT SELECT id FROM queue_ext.job_archive WHERE queue_name = %(q)s AND status = 'completed') x""", {"q": QUEUE})[0]
    r["archived_reply_lost"], r["archived_unexplained"] = one(c, """
        SELECT count(*) FILTER (WHERE EXISTS (SELECT 1 FROM soak_done d WHERE d.id = a.id AND d.kind = 'A')),
               count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM soak_done d WHERE d.id = a.id AND d.kind = 'A'))
        FROM queue_ext.job_archive a
        WHERE a.queue_name = %(q)s AND NOT EXISTS (SELECT 1 FROM soak_done d WHERE d.id = a.id AND d.kind = 'C')""",
                                                            {"q": QUEUE})
    kinds = {str(k): (n, dead, done) for k, n, dead, done in c.execute("""
        SELECT payload->>'k', count(*), count(*) FILTER (WHERE dead), count(*) FILTER (WHERE NOT dead) FROM (
            SELECT payload, false AS dead FROM queue_ext.job_archive WHERE queue_name = %(q)s
            UNION ALL SELECT payload, true FROM queue_ext.job_dead_letter WHERE queue_name = %(q)s) x GROUP BY 1""",
                                                                     {"q": QUEUE})}
    r["by_kind"] = {name: dict(zip(("jobs", "dead", "completed"), kinds.get(str(k), (0, 0, 0))))
                    for k, name in ((NORMAL, "normal"), (FAIL_ONCE, "fail_once"), (POISON, "poison"))}
    r["fail_once_completed_on_first_attempt"] = one(c, """SELECT count(*) FROM queue_ext.job_archive
        WHERE queue_name = %(q)s AND payload->>'k' = '1' AND attempt < 2""", {"q": QUEUE})[0]
    return r


def count_webhooks(c, sink_port, faults):
    """Arrivals at the sink per webhook-id (msg_<job id>) against what each job went through."""
    arrivals = sink_stats(sink_port)
    jobs = c.execute("""SELECT id::text, attempt, errors, false FROM queue_ext.job_archive WHERE queue_name = ANY (%(q)s)
                        UNION ALL SELECT id::text, attempt, errors, true FROM queue_ext.job_dead_letter WHERE queue_name = ANY (%(q)s)""",
                     {"q": HOOK_QUEUES}).fetchall()
    # A dispatcher stopping on SIGTERM returns requests still in flight after
    # queue_ext.shutdown_grace to their queue with the attempt counted ('dispatcher stopped
    # during delivery'). Releases that did not count it ('dispatcher stopped; released
    # unfinished', queue_ext 0.3 and early 0.4 builds) are still counted apart here, so a
    # result from such a build reads the same.
    released = dict(c.execute("""SELECT job_id::text, count(*) FROM queue_ext.job_status_history
                                 WHERE queue_name = ANY (%(q)s) AND error = 'dispatcher stopped; released unfinished'
                                 GROUP BY 1""", {"q": HOOK_QUEUES}).fetchall())
    ours = {f"msg_{j[0]}" for j in jobs}
    r = {"requests": sum(len(v) for v in arrivals.values()), "webhook_ids": len(arrivals),
         "foreign_ids": len(set(arrivals) - ours), "missing": 0, "more_requests_than_attempts": 0,
         "requests_beyond_counted_attempts": 0, "released_at_shutdown": sum(released.values()),
         "more_requests_than_attempts_and_releases": 0,
         "duplicates": 0, "duplicates_by_cause": {}, "duplicate_examples": []}
    kill_times = sorted((f["at"], f["kind"]) for f in faults if f["kind"] in ("dispatcher", "postmaster_restart", "postmaster_kill9"))
    for job_id, attempt, errors, dead in jobs:
        got = sorted(a[0] for a in arrivals.get(f"msg_{job_id}", []))
        if not got and not dead:
            r["missing"] += 1
        if len(got) > attempt:
            r["more_requests_than_attempts"] += 1
            r["requests_beyond_counted_attempts"] += len(got) - attempt
        if len(got) > attempt + released.get(job_id, 0):
            r["more_requests_than_attempts_and_releases"] += 1
        if len(got) > 1:
            r["duplicates"] += len(got) - 1
            lost = [e.get("error") for e in errors] + ["released at dispatcher shutdown, attempt not counted"] * released.get(job_id, 0)
            # The sink records a request when it answers: 5 s after it arrived on the slow path.
            before = [k for t, k in kill_times if got[0] - 6 <= t <= got[-1]]
            cause = f"attempts interrupted: {', '.join(sorted(set(lost))) or 'none recorded'}; fault between the requests: " \
                    f"{', '.join(sorted(set(before))) or 'none'}"
            r["duplicates_by_cause"][cause] = r["duplicates_by_cause"].get(cause, 0) + len(got) - 1
            if len(r["duplicate_examples"]) < 5:
                r["duplicate_examples"].append({"webhook_id": f"msg_{job_id}", "requests": len(got), "attempts": attempt,
                                                "errors": lost, "faults": before})
    return r


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def live(dsn):
    while True:
        try:
            with connect(dsn) as c:
                return dict(c.execute("SELECT q, (SELECT count(*) FROM queue_ext.job_queue j WHERE j.queue_name = q) "
                                      "FROM unnest(%s::text[]) AS q", [[QUEUE, *HOOK_QUEUES]]).fetchall())
        except psycopg.OperationalError:
            time.sleep(0.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=16, help="SQL worker connections")
    ap.add_argument("--single", type=int, default=4, help="of the workers, how many claim one job per call (get_next_job)")
    ap.add_argument("--batch", type=int, default=50, help="claim size of the other workers (get_next_jobs)")
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=3000, help="total producer rate, jobs/s")
    ap.add_argument("--enqueue-batch", type=int, default=100)
    ap.add_argument("--fail-fraction", type=float, default=0.10, help="jobs that fail their first attempt")
    ap.add_argument("--poison-fraction", type=float, default=0.001, help="jobs that fail every attempt")
    ap.add_argument("--max-attempts", type=int, default=3)
    ap.add_argument("--lease", type=int, default=5, help="lease of the plain queue, seconds")
    ap.add_argument("--hook-rate", type=float, default=50, help="webhook jobs/s while the producers run")
    ap.add_argument("--slow-hook-rate", type=float, default=2, help="jobs/s to the webhook that answers after 5 s")
    ap.add_argument("--fault-every", type=float, default=3.0, help="seconds between faults")
    ap.add_argument("--restart-at", type=float, default=0.3, help="share of the jobs completed at the fast restart")
    ap.add_argument("--kill-at", type=float, default=0.65, help="share of the jobs completed at the kill -9")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=None, help="seconds; default jobs/200 + 600")
    ap.add_argument("--name", default="soak", help="cluster directory /tmp/queue_ext_<name>")
    ap.add_argument("--port", type=int, default=25560)
    ap.add_argument("--sink-port", type=int, default=25660)
    args = ap.parse_args()
    timeout = args.timeout or args.jobs / 200 + 600

    cluster = Cluster(args.name, args.port, ["queue_ext.http_allowlist = '127.0.0.1'"])
    files = Path(f"/tmp/queue_ext_{args.name}_client")
    subprocess.run(["rm", "-rf", str(files)], check=True)
    files.mkdir(parents=True)
    sink = subprocess.Popen([sys.executable, str(HERE / "sink.py"), str(args.sink_port)])
    cluster.start(fresh=True)
    try:
        wait_port(args.sink_port)
        ok = run(args, cluster, files, timeout)
    finally:
        sink.kill()
        cluster.stop()
    sys.exit(0 if ok else 1)


def run(args, cluster, files, timeout):
    dsn = cluster.dsn
    with connect(dsn) as c:
        c.execute("CREATE EXTENSION queue_ext")
        settings = dict(c.execute("""SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN
            ('server_version', 'synchronous_commit', 'fsync', 'shared_buffers', 'max_connections', 'autovacuum',
             'max_worker_processes', 'queue_ext.http_allowlist', 'queue_ext.database', 'checkpoint_timeout', 'max_wal_size')""").fetchall())
        settings["queue_ext"] = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'queue_ext'").fetchone()[0]
    fresh_queue(dsn, QUEUE, max_attempts=args.max_attempts, lease_duration=f"{args.lease} seconds", notify_events=False)
    fresh_queue(dsn, HOOKS, webhook_url=f"http://127.0.0.1:{args.sink_port}/hook", notify_events=False, max_attempts=10)
    fresh_queue(dsn, SLOW_HOOKS, webhook_url=f"http://127.0.0.1:{args.sink_port}/slow", notify_events=False,
                max_attempts=10, webhook_timeout="30 seconds")
    worker_dsn = as_worker(dsn)
    with connect(dsn) as c:
        deadline = time.time() + 30
        while dispatcher_pid(c) is None:
            if time.time() > deadline:
                raise Failure("no dispatcher within 30 s of CREATE EXTENSION")
            time.sleep(0.1)
    params = {**vars(args), "timeout": timeout}
    print("soak settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print("soak run: " + ", ".join(f"{k}={v}" for k, v in params.items()) + f", client records in {files}", flush=True)

    stop, producers_done = mp.Event(), mp.Event()
    progress, enqueued = mp.Value("q", 0), mp.Value("q", 0)
    workers = [mp.Process(target=worker, args=(worker_dsn, i, 1 if i < args.single else args.batch, files, stop, progress))
               for i in range(args.workers)]
    share = [args.jobs // args.producers + (i < args.jobs % args.producers) for i in range(args.producers)]
    producers = [mp.Process(target=producer, args=(dsn, f"p{i}", QUEUE, share[i], args.rate / args.producers,
                                                   args.enqueue_batch, args.fail_fraction, args.poison_fraction,
                                                   args.seed * 1000 + i, files, stop, producers_done, enqueued))
                 for i in range(args.producers)]
    hooks = [mp.Process(target=producer, args=(dsn, name, q, None, rate, 1 if rate < 10 else 5, 0, 0, args.seed,
                                               files, stop, producers_done, mp.Value("q", 0)))
             for name, q, rate in (("hooks", HOOKS, args.hook_rate), ("slowhooks", SLOW_HOOKS, args.slow_hook_rate))]
    for p in workers:
        p.start()
    t0 = time.time()
    for p in producers + hooks:
        p.start()
    injector = Injector(cluster, args.fault_every, args.seed, progress, args.jobs, producers_done, args.restart_at, args.kill_at)
    injector.start()

    timed_out = False
    t_enqueued = None
    last = 0
    while True:
        time.sleep(1)
        if t_enqueued is None and all(p.exitcode is not None for p in producers):
            t_enqueued = time.time()
            producers_done.set()
        if any(p.exitcode not in (None, 0) for p in producers + hooks + workers):
            print("a client process failed", flush=True)
            break
        if time.time() - last >= 10:
            last = time.time()
            print(f"  t={elapsed(t0):>6}s enqueued {enqueued.value:,} completed {progress.value:,} "
                  f"faults {len(injector.log)}", flush=True)
        if t_enqueued and all(h.exitcode is not None for h in hooks) and not any(live(dsn).values()):
            break
        if time.time() - t0 > timeout:
            timed_out = True
            print(f"TIMEOUT after {timeout:.0f} s: {live(dsn)} jobs still live", flush=True)
            break
    t_end = time.time()
    injector.halt.set()
    injector.join()
    stop.set()
    producers_done.set()
    for p in workers + producers + hooks:
        p.join(30)
        if p.exitcode is None:
            p.terminate()

    worker_stats = [json.loads((files / f"done-{i}.json").read_text()) for i in range(args.workers)
                    if (files / f"done-{i}.json").exists()]
    producer_stats = {p.stem[4:]: json.loads(p.read_text()) for p in files.glob("enq-*.json")}
    with connect(dsn) as c:
        load_client_records(c, files)
        jobs = count_jobs(c, QUEUE)
        fencing = count_fencing(c)
        per_hook_queue = {q: count_jobs(c, q) for q in HOOK_QUEUES}
        hooks_seen = count_webhooks(c, args.sink_port, injector.log)

    hook_jobs = {k: sum(r[k] for r in per_hook_queue.values()) for k in
                 ("enqueued", "archived_rows", "archived_ids", "dead_rows", "dead_ids", "archived_and_dead", "lost",
                  "never_enqueued", "left_in_job_queue")}
    faults = {}
    for f in injector.log:
        key = f["kind"] + (" (skipped)" if "skipped" in f else "")
        faults[key] = faults.get(key, 0) + 1
    totals = {k: sum(w.get(k, 0) for w in worker_stats) for k in
              ("claims", "claimed", "empty_claims", "confirmed", "unconfirmed", "fenced_complete", "injected_failures",
               "fail_dead", "fenced_fail", "reconnects")}
    worker_errors = {}
    for w in worker_stats:
        for k, v in w["errors"].items():
            worker_errors[k] = worker_errors.get(k, 0) + v
    duration = t_end - t0
    checks = {
        "every worker and producer ran to the end": len(worker_stats) == args.workers and len(producer_stats) == args.producers + len(hooks),
        "the fault injector ran without error": injector.error is None,
        "drained within the timeout": not timed_out,
        "enqueued the jobs asked for, each id once": jobs["enqueued"] == args.jobs == jobs["enqueued_distinct"],
        "none lost (enqueued = archived + dead)": jobs["lost"] == 0 and jobs["archived_ids"] + jobs["dead_ids"] == jobs["enqueued"],
        "nothing archived or dead that was not enqueued": jobs["never_enqueued"] == 0,
        "archived once each, all completed": jobs["archived_rows"] == jobs["archived_ids"] and jobs["archived_not_completed"] == 0,
        "dead once each, never also archived": jobs["dead_rows"] == jobs["dead_ids"] and jobs["archived_and_dead"] == 0,
        "none left in job_queue": jobs["left_in_job_queue"] == 0 and hook_jobs["left_in_job_queue"] == 0,
        "dead by the rules (attempts exhausted, one error per attempt)": jobs["dead_not_by_rules"] == 0,
        "every attempt before a completion recorded as a failure": jobs["archived_errors_not_attempts_minus_1"] == 0,
        "poison jobs never completed": fencing["by_kind"]["poison"]["completed"] == 0,
        "fail-once jobs completed only after a failed attempt": fencing["fail_once_completed_on_first_attempt"] == 0,
        "no job completed twice (confirmed completions per id = 1)": fencing["ids_confirmed_twice"] == 0,
        "every confirmed completion is archived": fencing["confirmed_not_archived"] == 0,
        "every archived job was confirmed to a worker or its reply was lost": fencing["archived_unexplained"] == 0,
        "no SQL errors other than lost connections and fenced leases": not worker_errors,
        "webhooks: none lost, none left, none twice in the archive": hook_jobs["lost"] == 0 and hook_jobs["never_enqueued"] == 0
            and hook_jobs["archived_rows"] == hook_jobs["archived_ids"] and hook_jobs["dead_rows"] == hook_jobs["dead_ids"]
            and hook_jobs["archived_and_dead"] == 0,
        "webhooks: every delivered job reached the sink": hooks_seen["missing"] == 0,
        "webhooks: requests per webhook-id <= attempts + deliveries released at shutdown, none foreign":
            hooks_seen["more_requests_than_attempts_and_releases"] == 0 and hooks_seen["foreign_ids"] == 0,
        "the dispatcher came back after every kill": all(b is not None for b in injector.dispatcher_back),
    }
    result = {
        "settings": settings, "params": params, "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "duration_s": round(duration, 1), "enqueue_s": round((t_enqueued or t_end) - t0, 1),
        "throughput_jobs_per_s": round(jobs["enqueued"] / duration, 1),
        "faults": faults, "fault_log": [{**f, "at": round(f["at"] - t0, 2)} for f in injector.log],
        "dispatcher_back_after_s": injector.dispatcher_back,
        "jobs": jobs, "fencing": fencing, "workers": totals, "worker_errors": worker_errors, "producers": producer_stats,
        "webhook_jobs": hook_jobs, "webhook_queues": per_hook_queue, "webhook_sink": hooks_seen, "checks": checks,
    }
    back = [b for b in injector.dispatcher_back if b is not None]
    print(f"""
soak: {jobs['enqueued']:,} jobs (+ {hook_jobs['enqueued']:,} webhook jobs) in {duration:,.1f} s: {result['throughput_jobs_per_s']:,.0f} jobs/s \
(enqueue phase {result['enqueue_s']:,.1f} s at {args.rate:,.0f}/s asked)
faults injected: {', '.join(f'{k} {v}' for k, v in sorted(faults.items())) or 'none'}
  dispatcher back after: {f'{min(back):.1f}-{max(back):.1f} s' if back else '-'}; client reconnects: workers {totals['reconnects']}, \
producers {sum(p['reconnects'] for p in producer_stats.values())}; ambiguous enqueues {sum(p['ambiguous'] for p in producer_stats.values())} \
(committed {sum(p['resolved_committed'] for p in producer_stats.values())}, absent and re-sent {sum(p['resolved_absent'] for p in producer_stats.values())})
completed: {jobs['archived_ids']:,} (archived), dead: {jobs['dead_ids']:,} ({', '.join(f'{k}: {v}' for k, v in jobs['dead_by_reason'].items())}); \
lost {jobs['lost']}, left {jobs['left_in_job_queue']}
retries: {jobs['retries']:,} (failed attempts by cause: {', '.join(f'{k}: {v:,}' for k, v in jobs['errors_by_text'].items())})
  attempts of completed jobs: {jobs['attempts_of_completed']}
  by kind: {fencing['by_kind']}
fencing: confirmed completions {fencing['confirmed_completions']:,} for {fencing['confirmed_ids']:,} ids, \
{fencing['ids_confirmed_twice']} ids confirmed twice; {totals['fenced_complete']:,} completions and {totals['fenced_fail']:,} \
failures refused (stale lease); {fencing['unconfirmed_completions']} completions unanswered (connection lost), \
{fencing['archived_reply_lost']} of them had committed
webhooks: {hook_jobs['archived_ids']:,} delivered ({', '.join(f"{q}: {r['archived_ids']:,}" for q, r in per_hook_queue.items())}), \
{hook_jobs['dead_ids']} dead, {hook_jobs['lost']} lost; sink: \
{hooks_seen['requests']:,} requests for {hooks_seen['webhook_ids']:,} webhook-ids, {hooks_seen['duplicates']} duplicates \
({'; '.join(f'{v} x {k}' for k, v in hooks_seen['duplicates_by_cause'].items()) or 'none'})
  {hooks_seen['released_at_shutdown']} deliveries released at dispatcher shutdown (attempt not counted); \
{hooks_seen['requests_beyond_counted_attempts']} requests beyond the attempts counted, for \
{hooks_seen['more_requests_than_attempts']} jobs
worker SQL errors: {worker_errors or 'none'}""")
    print("checks:")
    for name, passed in checks.items():
        print(f"  {'ok  ' if passed else 'FAIL'} {name}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    return all(checks.values())


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        print(f"SOAK FAILURE: {e}", file=sys.stderr)
        sys.exit(1)
