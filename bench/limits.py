"""What per-key limits and NOTIFY events cost on the hot paths, measured side by side.

    bash bench/limits.sh [--jobs N] [--reps R]

Drains a pre-filled queue with 4 worker processes (claim one + complete one, autocommit) and
enqueues one job per call from 1 connection, for each variant, rounds interleaved; prints the
median and range of jobs/s and the cost relative to the plain variant. Each drain checks that
every job completed exactly once.

Variants:
  plain          no keys, NOTIFY events off                      (the baseline)
  notify         no keys, NOTIFY events on (queue_ext_events)
  beside limits  no keys, but a rate limit exists (for other jobs): what everyone else pays
  rate key       every job has a rate_limit_key whose limit (1,000,000/s) never binds: the
                 token bucket is read and spent in every claim
  conc. key      every job has one of 100 concurrency keys, limit 1,000 (never binds): a slot
                 taken at enqueue, freed and the key locked at completion
  FIFO groups    100 concurrency keys with limit 1: strict FIFO per key; the drain is bound by
                 the 100 groups, each one job at a time
"""
import argparse
import multiprocessing as mp
import statistics
import time

import psycopg

VARIANTS = ["plain", "notify", "beside limits", "rate key", "conc. key", "FIFO groups"]


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


def setup_variant(dsn, variant, name):
    with connect(dsn) as c:
        c.execute("SELECT queue_ext.create_queue(%s, notify_events => %s)", [name, variant == "notify"])
        if variant == "rate key":
            c.execute("SELECT queue_ext.set_rate_limit('bench-rate', 1000000, '1 second', burst => 1000)")
        if variant == "beside limits":
            c.execute("SELECT queue_ext.set_rate_limit('someone-else', 10, '1 second')")
        if variant == "conc. key":
            c.execute("SELECT queue_ext.set_concurrency_limit('c' || k, 1000) FROM generate_series(0, 99) AS k")
        if variant == "FIFO groups":
            c.execute("SELECT queue_ext.set_concurrency_limit('f' || k, 1) FROM generate_series(0, 99) AS k")


def enqueue_sql(variant):
    if variant == "rate key":
        return "SELECT queue_ext.enqueue_job(%s, '{\"n\":1}', rate_limit_key => 'bench-rate')"
    if variant == "conc. key":
        return "SELECT queue_ext.enqueue_job(%s, '{\"n\":1}', concurrency_key => 'c' || (random() * 99)::int)"
    if variant == "FIFO groups":
        return "SELECT queue_ext.enqueue_job(%s, '{\"n\":1}', concurrency_key => 'f' || (random() * 99)::int)"
    return "SELECT queue_ext.enqueue_job(%s, '{\"n\":1}')"


def prefill(dsn, variant, queue, n):
    with connect(dsn) as c:
        keys = {"rate key": ("rate_limit_key", "'bench-rate'"),
                "conc. key": ("concurrency_key", "'c' || (i %% 100)"),
                "FIFO groups": ("concurrency_key", "'f' || (i %% 100)")}.get(variant)
        if keys is None:
            c.execute("SELECT count(*) FROM queue_ext.enqueue_jobs(%s, array_fill('{\"n\":1}'::jsonb, ARRAY[%s]))",
                      [queue, n])
        else:
            col, expr = keys
            c.execute(f"SELECT count(queue_ext.enqueue_job(%s, '{{\"n\":1}}', {col} => {expr})) "
                      "FROM generate_series(1, %s) AS i", [queue, n])
        c.execute("ANALYZE queue_ext.job_queue")


def drain_worker(dsn, queue, start, out):
    done = 0
    with connect(dsn) as c:
        start.wait(timeout=60)
        idle = 0
        while True:
            row = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s)", [queue], prepare=True).fetchone()
            if row is None:
                # FIFO groups: the next job of a key is admitted by the completion of the one
                # before, so an empty claim can mean "not yet". Stop after a quiet spell.
                idle += 1
                if idle > 50:
                    break
                time.sleep(0.001)
                continue
            idle = 0
            c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", row, prepare=True)
            done += 1
    out.put(done)


def drain(dsn, queue, n, workers=4):
    start, out = mp.Barrier(workers + 1), mp.Queue()
    procs = [mp.Process(target=drain_worker, args=(dsn, queue, start, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    start.wait(timeout=60)
    t0 = time.perf_counter()
    done = sum(out.get(timeout=600) for _ in procs)
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    with connect(dsn) as c:
        archived = c.execute("SELECT count(*), count(DISTINCT id) FROM queue_ext.job_archive "
                             "WHERE queue_name = %s AND status = 'completed'", [queue]).fetchone()
        live = c.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0]
    if done != n or archived != (n, n) or live != 0:
        raise SystemExit(f"{queue}: {done} claimed, {archived} archived, {live} left of {n}: not exactly once")
    # The idle tail (50 empty polls) is not work: take it off.
    return n / max(elapsed - 0.05, 1e-6)


def enqueue(dsn, variant, queue, n):
    sql = enqueue_sql(variant)
    with connect(dsn) as c:
        t0 = time.perf_counter()
        for _ in range(n):
            c.execute(sql, [queue], prepare=True)
        return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--enqueues", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    results = {v: {"drain": [], "enqueue": []} for v in VARIANTS}
    serial = 0
    for rep in range(args.reps):
        for variant in VARIANTS:  # interleaved: every variant once per round
            serial += 1
            q = f"lim{serial}"
            setup_variant(args.dsn, variant, q)
            prefill(args.dsn, variant, q, args.jobs)
            results[variant]["drain"].append(drain(args.dsn, q, args.jobs))
            results[variant]["enqueue"].append(enqueue(args.dsn, variant, q, args.enqueues))
            with connect(args.dsn) as c:  # keep the table small between cells
                c.execute("SELECT queue_ext.drop_queue(%s, force => true)", [q])
                c.execute("SELECT queue_ext.purge_jobs('0')")
                c.execute("SELECT queue_ext.remove_rate_limit(k) FROM unnest(ARRAY['bench-rate', 'someone-else']) AS k")
                c.execute("VACUUM ANALYZE queue_ext.job_queue")
            print(f"round {rep + 1} {variant:12s} drain {results[variant]['drain'][-1]:8.0f}/s   "
                  f"enqueue {results[variant]['enqueue'][-1]:7.0f}/s", flush=True)
    base_d = statistics.median(results["plain"]["drain"])
    base_e = statistics.median(results["plain"]["enqueue"])
    print()
    print(f"4 workers claim+complete one job per call, {args.jobs} jobs; enqueue one per call from 1 connection, "
          f"{args.enqueues} jobs; {args.reps} interleaved rounds, median (range)")
    print()
    print("| variant | claim+complete jobs/s | vs plain | enqueue jobs/s | vs plain |")
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        d, e = results[v]["drain"], results[v]["enqueue"]
        print(f"| {v} | {statistics.median(d):,.0f} ({min(d):,.0f}–{max(d):,.0f}) | "
              f"{statistics.median(d) / base_d:.0%} | {statistics.median(e):,.0f} ({min(e):,.0f}–{max(e):,.0f}) | "
              f"{statistics.median(e) / base_e:.0%} |")


if __name__ == "__main__":
    main()
