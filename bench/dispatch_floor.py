"""The webhook dispatcher's SQL beside the floor of the row changes it makes, both inside the server.

    python3 bench/dispatch_floor.py --port PORT [--jobs 20000] [--batch 40] [--rounds 3]

A delivered webhook changes four rows whatever the code around it: the claim marks the job
running under a lease, the record deletes it from the hot table, writes its archive row and a
delivery-log row. This runs those changes two ways from a procedure, one transaction per turn
(record the previous turn's jobs as delivered, claim the next), `synchronous_commit` off, as
the dispatcher's SQL thread runs them, with no client round trip per statement:

- `functions`: queue_ext's own `_dispatch_record_rows` and `_dispatch_claim_rows` on a webhook
  queue, each in a subtransaction as the dispatcher runs them;
- `floor`: the same four changes as plain statements on plain tables (a hot table with a
  primary key and one partial claim index, an archive with its key and a time index, a log with
  its key, a job index and a time index: the indexes retention and lookups need).

Prints the backend's CPU per delivered job for each (from /proc), alternating rounds. Beside the
dispatcher's SQL thread of a webhook burst (bench/dispatcher_threads.py) and HTTP alone
(bench/sink-rs/src/http_floor.rs), this says how many webhooks a second a machine's cores allow
at best: 2 cores × 1 s / (SQL + HTTP client + endpoint CPU per webhook).

The database (qe_dispatch_turns, created once) must have no dispatcher, or it would claim the
same jobs (see bench/dispatch_turns.py)."""
import argparse
import statistics

import psycopg

from dispatch_turns import QUEUE, database, fresh_queue
from splitlib import cpu_seconds

REPLY_HEADERS = '{"content-length": "0", "date": "Wed, 02 Dec 2026 16:00:00 GMT"}'

SETUP = f"""
CREATE SCHEMA IF NOT EXISTS bench_floor;
CREATE TABLE IF NOT EXISTS bench_floor.hot (
    id bigserial PRIMARY KEY, status text NOT NULL DEFAULT 'queued', payload jsonb NOT NULL,
    lease_token uuid, lease_expires_at timestamptz, attempt integer NOT NULL DEFAULT 0,
    run_at timestamptz NOT NULL DEFAULT now(), created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS hot_claim_idx ON bench_floor.hot (run_at, id) WHERE status = 'queued';
CREATE TABLE IF NOT EXISTS bench_floor.archive (
    id bigint PRIMARY KEY, payload jsonb NOT NULL, result jsonb, attempt integer NOT NULL,
    created_at timestamptz NOT NULL, finished_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS archive_finished_idx ON bench_floor.archive (finished_at);
CREATE TABLE IF NOT EXISTS bench_floor.log (
    id bigserial PRIMARY KEY, job_id bigint NOT NULL, attempt integer NOT NULL, outcome text NOT NULL,
    status_code integer, duration_ms float8, response_headers jsonb, at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS log_job_idx ON bench_floor.log (job_id);
CREATE INDEX IF NOT EXISTS log_at_idx ON bench_floor.log (at);

CREATE OR REPLACE PROCEDURE bench_floor.turns_floor(batch integer, INOUT done bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
    attempts integer[];
BEGIN
    LOOP
        IF ids IS NOT NULL THEN
            WITH gone AS (
                DELETE FROM bench_floor.hot AS h WHERE h.id = ANY (ids) AND h.status = 'running' RETURNING h.*
            )
            INSERT INTO bench_floor.archive (id, payload, result, attempt, created_at)
            SELECT g.id, g.payload, jsonb_build_object('status', 200, 'headers', '{REPLY_HEADERS}'::jsonb,
                                                       'body', '', 'duration_ms', 1.5),
                   g.attempt, g.created_at
            FROM gone AS g;
            INSERT INTO bench_floor.log (job_id, attempt, outcome, status_code, duration_ms, response_headers)
            SELECT u.id, u.attempt, 'delivered', 200, 1.5, '{REPLY_HEADERS}'::jsonb
            FROM unnest(ids, attempts) AS u(id, attempt);
            done := done + cardinality(ids);
        END IF;
        WITH next AS (
            SELECT h.id FROM bench_floor.hot AS h
            WHERE h.status = 'queued' AND h.run_at <= now()
            ORDER BY h.run_at, h.id LIMIT batch FOR UPDATE SKIP LOCKED
        ), claimed AS (
            UPDATE bench_floor.hot AS h
            SET status = 'running', lease_token = gen_random_uuid(),
                lease_expires_at = now() + interval '60 seconds', attempt = h.attempt + 1
            FROM next WHERE h.id = next.id
            RETURNING h.id, h.attempt
        )
        SELECT array_agg(c.id), array_agg(c.attempt) INTO ids, attempts FROM claimed AS c;
        COMMIT;
        EXIT WHEN ids IS NULL;
    END LOOP;
END
$$;

CREATE OR REPLACE PROCEDURE bench_floor.turns_functions(batch integer, INOUT done bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    ids uuid[];
    tokens uuid[];
    attempts integer[];
    urls text[];
    n integer;
BEGIN
    LOOP
        IF ids IS NOT NULL THEN
            n := cardinality(ids);
            BEGIN  -- a subtransaction, as the dispatcher records
                IF queue_ext._dispatch_record_rows(
                       ids, tokens, array_fill('{QUEUE}'::text, ARRAY[n]), attempts, urls,
                       array_fill('delivered'::text, ARRAY[n]), array_fill(200, ARRAY[n]),
                       array_fill(NULL::text, ARRAY[n]), array_fill(1.5::float8, ARRAY[n]),
                       array_fill('{REPLY_HEADERS}'::jsonb, ARRAY[n]), array_fill(''::text, ARRAY[n]),
                       array_fill(NULL::float8, ARRAY[n])) <> n THEN
                    RAISE EXCEPTION 'an outcome was not applied';
                END IF;
            EXCEPTION WHEN raise_exception THEN
                RAISE;
            END;
            done := done + n;
        END IF;
        BEGIN  -- and claims, each in a subtransaction of its own
            -- As under load: requests of this queue in flight, so it is claimed from at once.
            SELECT array_agg(c.job_id), array_agg(c.lease_token), array_agg(c.attempt), array_agg(c.url)
            INTO ids, tokens, attempts, urls
            FROM queue_ext._dispatch_claim_rows('queue_ext-dispatcher', batch, ARRAY['{QUEUE}'], ARRAY[1], NULL,
                                                 interval '30 seconds', ARRAY['{QUEUE}']) AS c;
        EXCEPTION WHEN raise_exception THEN
            RAISE;
        END;
        COMMIT;
        EXIT WHEN ids IS NULL;
    END LOOP;
END
$$;
"""


def fill(c, way, jobs):
    """A fresh batch of `jobs` runnable jobs for `way`, vacuumed, like the start of a burst."""
    if way == "floor":
        c.execute("TRUNCATE bench_floor.hot, bench_floor.archive, bench_floor.log")
        c.execute("INSERT INTO bench_floor.hot (payload) SELECT '{\"t0\": 1.5}'::jsonb FROM generate_series(1, %s)",
                  [jobs])
        c.execute("VACUUM ANALYZE bench_floor.hot")
    else:
        fresh_queue(c, jobs)
    c.execute("CHECKPOINT")


def one_round(dsn, way, jobs, batch):
    """Backend CPU µs per delivered job."""
    with psycopg.connect(dsn, autocommit=True) as c:
        fill(c, way, jobs)
        c.execute("SET synchronous_commit = off")
        pid = c.info.backend_pid
        start = cpu_seconds(pid)
        done = c.execute(f"CALL bench_floor.turns_{way}(%s)", [batch]).fetchone()[0]
        cpu = cpu_seconds(pid) - start
    if done != jobs:
        raise SystemExit(f"{way}: {done} of {jobs} jobs delivered")
    return cpu / jobs * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=40, help="jobs per turn (the webhook cell's turns carry 40-48)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dsn = database(args.port)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(SETUP)
    ways = ["functions", "floor"]
    seen = {w: [] for w in ways}
    for r in range(args.rounds):
        for w in (ways if r % 2 == 0 else ways[::-1]):
            seen[w].append(one_round(dsn, w, args.jobs, args.batch))
    print(f"{args.jobs:,} jobs a round in turns of {args.batch}, {args.rounds} rounds, medians (every round in brackets)")
    print("| way | backend CPU µs per delivered job |")
    print("|---|---:|")
    for w in ways:
        print(f"| {w} | {statistics.median(seen[w]):.1f} [{', '.join(f'{x:.1f}' for x in seen[w])}] |")


if __name__ == "__main__":
    main()
