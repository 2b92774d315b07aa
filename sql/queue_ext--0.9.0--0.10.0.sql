-- queue_ext 0.9.0 -> 0.10.0: the dispatcher and SQL exchange typed rows and arrays.
--   * _dispatch_claim_rows returns the claimed deliveries as rows (headers as two text arrays)
--     and _dispatch_record_rows takes outcomes as one array per field, replacing the JSON
--     documents of _dispatch_claim and _dispatch_record (building and parsing them was about a
--     fifth of the dispatcher's SQL time). The library still speaks JSON to a database that
--     has not run this update yet.
--   * _archive_delivered: the delivered outcomes' jobs are deleted and archived by a hash or
--     merge join on the primary key, never a nested loop, and the queues' settings are read
--     once per batch.
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.10.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.10.0'" to load this file. \quit

DROP FUNCTION queue_ext._dispatch_claim(text, integer, jsonb, text, interval);
DROP FUNCTION queue_ext._dispatch_record(jsonb);

-- The dispatcher's claim: up to `capacity` jobs from webhook queues (one queue when
-- only_queue is given), each queue capped by its max_in_flight minus what the dispatcher
-- already has in flight there (busy_counts[i] for busy_queues[i]). One row per delivery, with
-- its target; the lease covers the request timeout plus a margin, so that a request still in
-- flight is never reclaimed and sent a second time. Callbacks are sent with the timeout of
-- the queue they report on (its webhook_timeout, or the default), and one claim takes a batch
-- of them: their lease covers the longest of those timeouts. Typed columns, not JSON: the
-- dispatcher reads them as they are (building and parsing a JSON document per delivery was
-- a fifth of its SQL thread's time).
CREATE FUNCTION queue_ext._dispatch_claim_rows(worker_id text, capacity integer, busy_queues text[],
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
        -- A queue with nothing to send costs a probe of its claim index, not a claim. (Here,
        -- one queue at a time: as a condition of the loop's query, the planner hashed every
        -- runnable job of every queue on each turn, 8.6 ms a turn with 60,000 queued.)
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                                  WHERE j.queue_name = t.name AND j.status IN ('queued', 'retrying')
                                    AND j.rate_limit_key IS NULL AND j.run_at <= now())
                  AND NOT EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                                  WHERE j.queue_name = t.name AND j.status IN ('queued', 'retrying')
                                    AND j.rate_limit_key IS NOT NULL AND j.run_at <= now());
        n := least(room, coalesce(t.max_in_flight, 1000)
                         - coalesce(busy_counts[array_position(busy_queues, t.name)], 0));
        CONTINUE WHEN n <= 0;
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

-- The delivered outcomes of _dispatch_record_rows whose jobs still hold the lease, in queues
-- without callbacks: deleted from the hot table and archived with the response as their result,
-- in one statement. Outcomes are matched to their jobs by a hash (or merge) join, never a nested
-- loop: the planner estimates the arrays and the running jobs without knowing either, and a
-- nested loop rescans one side per row of the other (measured: 16 ms for 200 outcomes, 80 µs a
-- job). Only this statement runs with nested loops off, hence a function of its own. The
-- queues' settings are read once per batch, not per job.
CREATE FUNCTION queue_ext._archive_delivered(job_ids uuid[], lease_tokens uuid[], queue_names text[],
                                             outcomes text[], status_codes integer[], durations_ms float8[],
                                             response_headers jsonb[], response_bodies text[],
                                             OUT fast uuid[], OUT unlogged uuid[], OUT fast_queues text[],
                                             OUT logged queue_ext.job_queue[])
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_nestloop = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    plain text[];    -- queues without callbacks: a callback is sent by _complete
    history text[];  -- queues that keep an archive row
    publish text[];  -- queues whose history rows are stored (notify_events)
BEGIN
    SELECT coalesce(array_agg(q.queue_name) FILTER (WHERE NOT q.has_callback), '{}'),
           coalesce(array_agg(q.queue_name) FILTER (WHERE q.keep_history), '{}'),
           coalesce(array_agg(q.queue_name) FILTER (WHERE q.keep_history AND q.notify), '{}')
    INTO plain, history, publish
    FROM queue_ext.queues AS q
    WHERE q.queue_name = ANY (queue_names);
    WITH done AS (
        DELETE FROM queue_ext.job_queue AS j
        USING unnest(job_ids, lease_tokens, outcomes, status_codes, durations_ms, response_headers,
                     response_bodies) AS o(id, token, outcome, status_code, duration_ms, headers, body)
        WHERE j.id = ANY (job_ids) AND o.outcome = 'delivered' AND j.id = o.id AND j.lease_token = o.token
          AND j.status = 'running' AND j.cancel_requested IS NULL AND j.queue_name = ANY (plain)
          -- The lease's expiry in a form no index matches (nor the lease index's predicate):
          -- the primary key, by id, finds these jobs. (On a generic plan the lease index can
          -- look smaller, and reading it visits every running job's entry, and those of
          -- finished jobs vacuum cannot remove yet.)
          AND coalesce(j.lease_expires_at, '-infinity') > now()
        RETURNING j.*, o.status_code AS reply_status, o.duration_ms AS reply_ms,
                  o.headers AS reply_headers, o.body AS reply_body, j.queue_name = ANY (history) AS keep,
                  -- Stored rows only to be published, or for a claim that predates claimed_at
                  -- (_log_completions): the archive row records the rest.
                  CASE WHEN j.queue_name = ANY (publish) OR (j.claimed_at IS NULL AND j.queue_name = ANY (history))
                       THEN j END AS logged_job
    ), archived AS (
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            worker_id, result, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at, started_at,
            rate_limit_key, concurrency_key, claimed_at)
        SELECT id, queue_name, payload, priority, 'completed', attempt, max_attempts, worker_id,
               jsonb_build_object('status', reply_status, 'headers', reply_headers,
                                  'body', reply_body, 'duration_ms', reply_ms),
               last_error, errors, 100, progress_details, enqueued_by, created_at, run_at, started_at,
               rate_limit_key, concurrency_key, claimed_at
        FROM done WHERE keep
    )
    SELECT coalesce(array_agg(d.id), '{}'), coalesce(array_agg(d.id) FILTER (WHERE NOT d.keep), '{}'),
           coalesce(array_agg(d.queue_name), '{}'),
           array_agg(d.logged_job) FILTER (WHERE d.logged_job IS DISTINCT FROM NULL)
    INTO fast, unlogged, fast_queues, logged
    FROM done AS d;
END
$$;

-- Records delivery outcomes, one array element per attempt (every array as long as
-- job_ids). 'delivered' completes the job (the response is its result); 'retry' fails it for
-- a retry (after retry_after_ms when given); 'failed' fails it permanently. An outcome whose
-- lease was lost meanwhile (cancelled, reclaimed) is logged as 'stale' and changes nothing.
-- response_headers are JSON objects. Returns how many outcomes were applied.
CREATE FUNCTION queue_ext._dispatch_record_rows(job_ids uuid[], lease_tokens uuid[], queue_names text[],
                                                attempts integer[], urls text[], outcomes text[],
                                                status_codes integer[], error_messages text[], durations_ms float8[],
                                                response_headers jsonb[], response_bodies text[],
                                                retry_after_ms float8[])
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    n integer := cardinality(job_ids);
    fast uuid[] := '{}';
    fast_queues text[];
    unlogged uuid[] := '{}';  -- delivered jobs of queues without history: no archive or log row
    logged queue_ext.job_queue[];  -- delivered jobs whose history rows are stored (_log_completions)
    applied uuid[] := '{}';
    ok boolean;
BEGIN
    IF n IS NULL OR n = 0 THEN
        RETURN 0;
    END IF;
    IF cardinality(lease_tokens) IS DISTINCT FROM n OR cardinality(queue_names) IS DISTINCT FROM n
       OR cardinality(attempts) IS DISTINCT FROM n OR cardinality(urls) IS DISTINCT FROM n
       OR cardinality(outcomes) IS DISTINCT FROM n OR cardinality(status_codes) IS DISTINCT FROM n
       OR cardinality(error_messages) IS DISTINCT FROM n OR cardinality(durations_ms) IS DISTINCT FROM n
       OR cardinality(response_headers) IS DISTINCT FROM n OR cardinality(response_bodies) IS DISTINCT FROM n
       OR cardinality(retry_after_ms) IS DISTINCT FROM n THEN
        RAISE EXCEPTION 'every outcome array must have one element per job id (% job ids)', n USING ERRCODE = '2202E';
    END IF;
    -- The common case, set-based: successful deliveries of jobs with no cancel request in
    -- queues without callbacks are archived and logged by one statement each, instead of a
    -- function call per job (the dispatcher's throughput is bound here).
    IF 'delivered' = ANY (outcomes) THEN
        SELECT d.fast, d.unlogged, d.fast_queues, d.logged INTO fast, unlogged, fast_queues, logged
        FROM queue_ext._archive_delivered(job_ids, lease_tokens, queue_names, outcomes, status_codes,
                                          durations_ms, response_headers, response_bodies) AS d;
        PERFORM queue_ext._log_completions(logged);
        PERFORM queue_ext._count_at_commit(u.q, 'completed', count(*)) FROM unnest(fast_queues) AS u(q) GROUP BY u.q;
        PERFORM queue_ext._release_dependents(d) FROM unnest(fast) AS d
        WHERE EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = d);
    END IF;

    -- Everything else, one at a time: failures, cancellations, callbacks, stale leases.
    IF cardinality(fast) < n THEN
        FOR i IN 1 .. n LOOP
            CONTINUE WHEN job_ids[i] = ANY (fast);
            IF outcomes[i] = 'delivered' THEN
                ok := queue_ext._complete(job_ids[i],
                                          jsonb_build_object('status', status_codes[i], 'headers', response_headers[i],
                                                             'body', response_bodies[i], 'duration_ms', durations_ms[i]),
                                          lease_tokens[i]) IS NOT NULL;
            ELSE
                ok := queue_ext._fail(job_ids[i], error_messages[i], lease_tokens[i], outcomes[i] = 'failed',
                                      make_interval(secs => retry_after_ms[i] / 1000)) IS NOT NULL;
            END IF;
            IF ok THEN
                applied := applied || job_ids[i];
            END IF;
        END LOOP;
    END IF;

    INSERT INTO queue_ext.webhook_deliveries (job_id, queue_name, attempt, url, outcome, status_code, error,
                                              duration_ms, response_headers, response_body)
    SELECT o.id, o.queue_name, o.attempt, o.url,
           CASE WHEN cardinality(fast) = n OR o.id = ANY (fast) OR o.id = ANY (applied) THEN o.outcome
                ELSE 'stale' END,
           o.status_code, o.error, o.duration_ms, o.headers, o.body
    FROM unnest(job_ids, queue_names, attempts, urls, outcomes, status_codes, error_messages, durations_ms,
                response_headers, response_bodies)
         AS o(id, queue_name, attempt, url, outcome, status_code, error, duration_ms, headers, body)
    WHERE cardinality(unlogged) < n
      AND (cardinality(unlogged) = 0 OR NOT (o.id = ANY (unlogged)));
    RETURN cardinality(fast) + cardinality(applied);
END
$$;

REVOKE ALL ON FUNCTION queue_ext._dispatch_claim_rows(text, integer, text[], integer[], text, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION queue_ext._archive_delivered(uuid[], uuid[], text[], text[], integer[], float8[], jsonb[], text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION queue_ext._dispatch_record_rows(uuid[], uuid[], text[], integer[], text[], text[], integer[], text[],
                                                       float8[], jsonb[], text[], float8[]) FROM PUBLIC;
