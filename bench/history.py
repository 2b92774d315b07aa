"""Does a long history slow the queue? Claim+complete throughput (4 workers, one job per call)
with an empty history, then with 5,000,000 finished jobs retained (job_archive, plus three
job_status_history rows each: 15,000,000), interleaved rounds of the same cell.

    bash bench/history.sh [--retained N] [--reps R]
"""
import argparse
import statistics
import time

import bench as qe


def fill(dsn, n):
    t0 = time.perf_counter()
    with qe.connect(dsn) as c:
        c.execute("ALTER TABLE queue_ext.job_status_history DISABLE TRIGGER publish_transitions")
        c.execute("""INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
                         worker_id, result, progress, enqueued_by, created_at, run_at, started_at, finished_at)
                     SELECT queue_ext.uuid_generate_v7(), 'history', '{"n": 1}', 'normal', 'completed', 1, 5,
                            'w1', '{"ok": true}', 100, 'postgres', t, t, t, t
                     FROM (SELECT now() - make_interval(secs => %s - i) AS t FROM generate_series(1, %s) AS i) AS s""",
                  [n, n])
        c.execute("""INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt,
                         worker_id, enqueued_by, at)
                     SELECT a.id, 'history', s.f::queue_ext.job_state, s.t::queue_ext.job_state, s.attempt, 'w1',
                            'postgres', a.finished_at
                     FROM queue_ext.job_archive AS a
                     CROSS JOIN (VALUES (NULL, 'queued', 0), ('queued', 'running', 1), ('running', 'completed', 1))
                                AS s(f, t, attempt)
                     WHERE a.queue_name = 'history'""")
        c.execute("ALTER TABLE queue_ext.job_status_history ENABLE TRIGGER publish_transitions")
        c.execute("VACUUM ANALYZE queue_ext.job_archive")
        c.execute("VACUUM ANALYZE queue_ext.job_status_history")
        sizes = c.execute("""SELECT pg_size_pretty(pg_total_relation_size('queue_ext.job_archive')),
                                    pg_size_pretty(pg_total_relation_size('queue_ext.job_status_history'))""").fetchone()
    print(f"retained {n:,} finished jobs in {time.perf_counter() - t0:.0f} s: job_archive {sizes[0]}, "
          f"job_status_history {sizes[1]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--retained", type=int, default=5_000_000)
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    empty = [qe.bench_drain(a.dsn, 4, 1, a.jobs) for _ in range(a.reps)]
    print("empty history:", ", ".join(f"{v:,.0f}" for v in empty), "jobs/s", flush=True)
    fill(a.dsn, a.retained)
    full = [qe.bench_drain(a.dsn, 4, 1, a.jobs) for _ in range(a.reps)]
    print(f"{a.retained:,} retained:", ", ".join(f"{v:,.0f}" for v in full), "jobs/s", flush=True)
    e, f = statistics.median(empty), statistics.median(full)
    print()
    print("| history retained | claim+complete, 4 workers, jobs/s (median, range) |")
    print("|---|---|")
    print(f"| none | {e:,.0f} ({min(empty):,.0f}–{max(empty):,.0f}) |")
    print(f"| {a.retained:,} finished jobs ({3 * a.retained:,} history rows) | {f:,.0f} ({min(full):,.0f}–{max(full):,.0f}) |")
    print(f"\nwith the history retained: {f / e:.0%} of the empty-history throughput")


if __name__ == "__main__":
    main()
