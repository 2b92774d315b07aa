"""The dispatcher's threads over a webhook burst: CPU and context switches per webhook.

    python3 bench/dispatcher_threads.py --port PORT --sink-port SINK_PORT [--jobs 40000] [--rounds 1]

Enqueues a burst into a paused webhook queue aimed at the sink (bench/sink-rs, or any endpoint
on 127.0.0.1 that answers 2xx), vacuums `job_queue` and checkpoints so that every burst starts
alike, resumes the queue and waits until the extension's counters say all of it finished. Then
prints, per delivered webhook, the dispatcher's HTTP thread and its main (SQL) thread: CPU (µs,
from /proc/PID/task/*/stat), voluntary context switches (the thread went to sleep: a wake-up
each) and involuntary ones (it was preempted), plus the sink's CPU when --sink-pid is given and
the machine's steal time. To compare two builds, install each by rename and restart the cluster
between rounds (scripts/install.sh), alternating.

The cluster must run the dispatcher for the database at --dbname (queue_ext.database) and allow
the sink's address (queue_ext.http_allowlist = '127.0.0.1')."""
import argparse
import os
import time

import psycopg

QUEUE = "dispatcher_threads"
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def threads(pid):
    """{'http' | 'sql': [cpu ticks, voluntary switches, involuntary switches]} for process pid."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        switches = {line.split(":")[0]: int(line.split()[1])
                    for line in open(f"/proc/{pid}/task/{tid}/status") if "ctxt_switches" in line}
        kind = "http" if "http" in name else "sql"
        total = out.setdefault(kind, [0, 0, 0])
        total[0] += int(fields[11]) + int(fields[12])
        total[1] += switches["voluntary_ctxt_switches"]
        total[2] += switches["nonvoluntary_ctxt_switches"]
    return out


def process_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read()
    fields = fields[fields.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def steal_ticks():
    return int(open("/proc/stat").readline().split()[8])


def finished(c):
    return c.execute("SELECT completed + dead FROM queue_ext._job_counters(ARRAY[%s]) WHERE queue_name = %s",
                     [QUEUE, QUEUE]).fetchone()[0]


def burst(c, jobs, sink_port, sink_pid, max_in_flight=None):
    # A fresh queue each burst: aimed at this run's sink, with nothing left from an earlier one.
    c.execute("SELECT queue_ext.drop_queue(q.queue_name, force => true) FROM queue_ext.queues AS q "
              "WHERE q.queue_name = %s", [QUEUE])
    c.execute("SELECT queue_ext.create_queue(%s, webhook_url => %s, webhook_max_in_flight => %s)",
              [QUEUE, f"http://127.0.0.1:{sink_port}/hook", max_in_flight])
    c.execute("SELECT queue_ext.pause_queue(%s)", [QUEUE])
    for start in range(0, jobs, 1000):
        c.execute("SELECT count(*) FROM queue_ext.enqueue_jobs(%s, array_fill('{\"a\": 1}'::jsonb, ARRAY[%s]))",
                  [QUEUE, min(1000, jobs - start)])
    c.execute("VACUUM queue_ext.job_queue")
    c.execute("CHECKPOINT")
    pid = c.execute("SELECT pid FROM queue_ext.dispatcher_status() WHERE running AND database = current_database()").fetchone()
    if pid is None:
        raise SystemExit("no dispatcher runs for this database (queue_ext.database, shared_preload_libraries)")
    pid = pid[0]
    done_before = finished(c) or 0
    turns_before = turns(c)
    before, sink_before, steal_before = threads(pid), sink_pid and process_ticks(sink_pid), steal_ticks()
    t0 = time.perf_counter()
    c.execute("SELECT queue_ext.resume_queue(%s)", [QUEUE])
    while (finished(c) or 0) - done_before < jobs:
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    after, sink_after, steal_after = threads(pid), sink_pid and process_ticks(sink_pid), steal_ticks()
    turns_after = turns(c)
    per = {k: [(after[k][i] - before[k][i]) / jobs for i in range(3)] for k in after}
    line = (f"{jobs / elapsed:8.0f} webhooks/s | HTTP thread {per['http'][0] * TICK_US:6.1f} µs, "
            f"{per['http'][1]:.2f} voluntary, {per['http'][2]:.2f} involuntary switches | SQL thread "
            f"{per['sql'][0] * TICK_US:6.1f} µs, {per['sql'][1]:.2f} voluntary, {per['sql'][2]:.2f} involuntary")
    if sink_pid:
        line += f" | sink {(sink_after - sink_before) * TICK_US / jobs:.1f} µs"
    if turns_after is not None:
        line += f" | {jobs / max(turns_after - turns_before, 1):.1f} webhooks a turn"
    print(line + f" | steal {(steal_after - steal_before) * TICK_US / jobs:.1f} µs")


def turns(c):
    """The dispatcher's turns so far that recorded outcomes, if pg_stat_statements is in this
    database (None if not)."""
    if not c.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone():
        return None
    return c.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                     "WHERE query LIKE '%queue_ext._dispatch_record_rows(%'").fetchone()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dbname", default="postgres")
    ap.add_argument("--sink-port", type=int, required=True)
    ap.add_argument("--sink-pid", type=int)
    ap.add_argument("--jobs", type=int, default=40_000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-in-flight", type=int, help="the queue's webhook_max_in_flight (default: the default)")
    args = ap.parse_args()
    with psycopg.connect(f"host=127.0.0.1 port={args.port} user=postgres dbname={args.dbname}", autocommit=True) as c:
        for _ in range(args.rounds):
            burst(c, args.jobs, args.sink_port, args.sink_pid, args.max_in_flight)


if __name__ == "__main__":
    main()
