-- queue_ext 0.11.0 -> 0.12.0: the dispatcher's claim skips the probe of queues it is busy with.
--   * _dispatch_claim_rows claims at once from a queue with deliveries in flight, instead of
--     probing its claim index first: the probe walked the same index entries as the claim
--     after it, those of every job claimed since the last vacuum (12% fewer buffer reads per
--     delivered webhook, bench/dispatch_turns.py).
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.12.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.12.0'" to load this file. \quit

-- The dispatcher's claim: up to `capacity` jobs from webhook queues (one queue when
-- only_queue is given), each queue capped by its max_in_flight minus what the dispatcher
-- already has in flight there (busy_counts[i] for busy_queues[i]). One row per delivery, with
-- its target; the lease covers the request timeout plus a margin, so that a request still in
-- flight is never reclaimed and sent a second time. Callbacks are sent with the timeout of
-- the queue they report on (its webhook_timeout, or the default), and one claim takes a batch
-- of them: their lease covers the longest of those timeouts. Typed columns, not JSON: the
-- dispatcher reads them as they are (building and parsing a JSON document per delivery was
-- a fifth of its SQL thread's time).
CREATE OR REPLACE FUNCTION queue_ext._dispatch_claim_rows(worker_id text, capacity integer, busy_queues text[],
                                               busy_counts integer[], only_queue text, default_timeout interval)
RETURNS TABLE (job_id uuid, lease_token uuid, attempt integer, queue_name text, body text, url text,
               method text, header_names text[], header_values text[], timeout_ms bigint, secret text,
               follow_redirects boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    t record;
    room integer := capacity;
    n integer;
    in_flight integer;  -- the dispatcher's requests in flight to the queue's target
    callback_lease interval;
BEGIN
    FOR t IN
        SELECT q.queue_name AS name, w.url AS target, w.method AS verb,
               coalesce(w.timeout, default_timeout) AS request_timeout,
               w.max_in_flight AS max_in_flight, w.secret AS signing_secret, w.follow_redirects AS redirects,
               ARRAY(SELECT h.key FROM jsonb_each_text(w.headers) AS h ORDER BY h.key) AS names,
               ARRAY(SELECT h.value FROM jsonb_each_text(w.headers) AS h ORDER BY h.key) AS vals
        FROM queue_ext.queues AS q
        LEFT JOIN queue_ext.webhook_targets AS w ON w.queue_name = q.queue_name
        WHERE q.is_webhook AND NOT q.paused
          AND (only_queue IS NULL OR q.queue_name = only_queue)
          AND (w.url IS NOT NULL OR q.queue_name = 'queue_ext.callbacks')
        ORDER BY random()  -- no queue always goes first when capacity is short
    LOOP
        EXIT WHEN room <= 0;
        in_flight := coalesce(busy_counts[array_position(busy_queues, t.name)], 0);
        n := least(room, coalesce(t.max_in_flight, 1000) - in_flight);
        CONTINUE WHEN n <= 0;
        -- An idle queue with nothing to send costs a probe of its claim index, not a claim.
        -- (Here, one queue at a time: as a condition of the loop's query, the planner hashed
        -- every runnable job of every queue on each turn, 8.6 ms a turn with 60,000 queued.)
        -- A queue with deliveries in flight had jobs a moment ago and is claimed from at once:
        -- a probe there walks the same index entries as the claim after it, and the entries
        -- of the jobs claimed since the last vacuum are many then (a claimed job's entry
        -- stays in the index until vacuum removes it).
        CONTINUE WHEN in_flight = 0
                  AND NOT EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                                  WHERE j.queue_name = t.name AND j.status IN ('queued', 'retrying')
                                    AND j.rate_limit_key IS NULL AND j.run_at <= now())
                  AND NOT EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                                  WHERE j.queue_name = t.name AND j.status IN ('queued', 'retrying')
                                    AND j.rate_limit_key IS NOT NULL AND j.run_at <= now());
        IF t.name = 'queue_ext.callbacks' THEN
            -- Each event goes to the callback_url of the queue it reports on, signed with
            -- that queue's secret.
            SELECT greatest(default_timeout, max(w.timeout)) + interval '30 seconds' INTO callback_lease
            FROM queue_ext.webhook_targets AS w WHERE w.callback_url IS NOT NULL;
            RETURN QUERY
            SELECT c.job_id, c.lease_token, c.attempt, c.queue_name, c.payload::text, w.callback_url, 'POST',
                   ARRAY(SELECT h.key FROM jsonb_each_text(w.headers) AS h ORDER BY h.key),
                   ARRAY(SELECT h.value FROM jsonb_each_text(w.headers) AS h ORDER BY h.key),
                   (extract(epoch FROM coalesce(w.timeout, default_timeout)) * 1000)::bigint,
                   w.secret, coalesce(w.follow_redirects, false)
            FROM queue_ext.get_next_jobs(t.name, n, worker_id, callback_lease) AS c
            LEFT JOIN queue_ext.webhook_targets AS w ON w.queue_name = c.payload ->> 'queue';
        ELSE
            RETURN QUERY
            SELECT c.job_id, c.lease_token, c.attempt, c.queue_name, c.payload::text, t.target, t.verb,
                   t.names, t.vals, (extract(epoch FROM t.request_timeout) * 1000)::bigint,
                   t.signing_secret, t.redirects
            FROM queue_ext.get_next_jobs(t.name, n, worker_id, t.request_timeout + interval '30 seconds') AS c;
        END IF;
        GET DIAGNOSTICS n = ROW_COUNT;
        room := room - n;
    END LOOP;
END
$$;
