-- queue_ext 0.8.0 -> 0.9.0: cheaper claims and batch completions.
--   * get_next_jobs locks the jobs to claim in one statement and changes them in a second,
--     each with only the plan nodes it runs (a claim that finds nothing changes nothing); the
--     change finds the rows it locked by address (a TID scan) instead of through the primary
--     key again. Claims draw lease tokens from a generator in the library (_lease_token)
--     instead of gen_random_uuid()'s call into OpenSSL per row.
--   * complete_jobs looks for dependents only when any exist, and returns a fully done batch
--     without matching it up against the input again.
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.9.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.9.0'" to load this file. \quit

CREATE FUNCTION queue_ext."_lease_token"() RETURNS uuid /* pgrx :: Uuid */
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_lease_token_wrapper';

-- Every function whose definition changed or that is new, as in sql/.
CREATE OR REPLACE FUNCTION queue_ext.get_next_jobs(
    queue_name text,
    n          integer,
    worker_id  text     DEFAULT NULL,
    lease      interval DEFAULT NULL
) RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
SET enable_seqscan = off
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    q queue_ext.queues := queue_ext._queue(get_next_jobs.queue_name);
    lease_for interval := coalesce(get_next_jobs.lease, q.lease_duration);
    floors timestamptz[];  -- NULL, or each priority's floor (run_at, id): claim_window.rs
    floor_ids uuid[];
    -- The jobs this call locked: their row versions' addresses, ids and states before.
    row_ids tid[];
    ids uuid[];
    old_statuses queue_ext.job_state[];
BEGIN
    IF length(get_next_jobs.worker_id) > 200 THEN
        -- Stored on the job and in every history row of its claims.
        RAISE EXCEPTION 'worker_id is % characters, over the limit of 200', length(get_next_jobs.worker_id)
            USING ERRCODE = '22023';
    END IF;
    IF get_next_jobs.n IS NULL OR get_next_jobs.n < 1 THEN
        RAISE EXCEPTION 'n must be at least 1 (got %)', coalesce(get_next_jobs.n::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF get_next_jobs.lease IS NOT NULL THEN
        PERFORM queue_ext._check_interval('lease', get_next_jobs.lease, '1 second', '7 days');
    END IF;
    IF q.paused THEN
        RETURN;
    END IF;
    floors := queue_ext._claim_window(q.queue_name);
    IF floors IS NULL OR cardinality(floors) = 0 THEN
        IF EXISTS (SELECT 1 FROM queue_ext.job_queue AS e
                   WHERE e.status = 'running' AND e.lease_expires_at <= now() AND e.queue_name = q.queue_name) THEN
            PERFORM queue_ext._return_running(NULL, 'lease expired', ARRAY[q.queue_name]);
        END IF;
        IF floors IS NOT NULL THEN
            SELECT * INTO floors, floor_ids FROM queue_ext._claim_window_probe(q.queue_name);
        END IF;
    ELSE
        floor_ids := queue_ext._claim_window_ids(q.queue_name);
    END IF;
    IF EXISTS (SELECT 1 FROM queue_ext.rate_limits)
       AND EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                   WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying')
                     AND j.rate_limit_key IS NOT NULL) THEN
        RETURN QUERY SELECT * FROM queue_ext._claim_limited(ARRAY[q.queue_name], get_next_jobs.n,
                                                            get_next_jobs.worker_id, lease_for);
        RETURN;
    END IF;
    -- Lock the jobs to claim, then change them: two statements, each with only the plan nodes
    -- it runs (the executor sets up every node of a statement on each call, run or not), and
    -- the change skipped when there is nothing to claim.
    IF floors IS NULL THEN
        SELECT array_agg(c.ctid), array_agg(c.id), array_agg(c.status) INTO row_ids, ids, old_statuses
        FROM (SELECT j.ctid, j.id, j.status
              FROM queue_ext.job_queue AS j
              WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL
                AND j.run_at <= now()
              ORDER BY j.priority DESC, j.run_at, j.id
              LIMIT get_next_jobs.n
              FOR UPDATE SKIP LOCKED) AS c;
    ELSE
        -- One range per priority, highest first: PostgreSQL 15 cannot start a scan at a
        -- floor on the third column of the index with the second one unbound.
        SELECT array_agg(c.ctid), array_agg(c.id), array_agg(c.status) INTO row_ids, ids, old_statuses
        FROM (SELECT w.ctid, w.id, w.status
              FROM unnest('{critical,high,normal,low}'::queue_ext.job_priority[], floors, floor_ids)
                   AS p(priority, floor_at, floor_id)
              CROSS JOIN LATERAL (
                  SELECT j.ctid, j.id, j.status
                  FROM queue_ext.job_queue AS j
                  WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL
                    AND j.priority = p.priority AND (j.run_at, j.id) >= (p.floor_at, p.floor_id) AND j.run_at <= now()
                  ORDER BY j.run_at, j.id
                  LIMIT get_next_jobs.n
                  FOR UPDATE SKIP LOCKED
              ) AS w
              LIMIT get_next_jobs.n) AS c;
    END IF;
    IF row_ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH claimed AS (
        UPDATE queue_ext.job_queue AS j
        SET status = 'running',
            attempt = j.attempt + 1,
            lease_token = queue_ext._lease_token(),
            lease_expires_at = now() + lease_for,
            worker_id = get_next_jobs.worker_id,
            started_at = coalesce(j.started_at, now()),
            claimed_at = now()
        -- By the locked row versions' addresses (a TID scan: no second descent of the primary
        -- key per job). FOR UPDATE returns the newest version of each row it locked, and a
        -- locked row keeps its address until this transaction ends.
        WHERE j.ctid = ANY (row_ids)
        RETURNING j.*
    )
    SELECT id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at, created_at
    FROM claimed
    ORDER BY priority DESC, run_at, id;
    IF q.keep_history AND q.notify THEN
        -- Stored only to be published (job_status_log).
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT j.id, j.queue_name, u.old_status, 'running', j.attempt, j.worker_id, j.enqueued_by
        FROM unnest(ids, old_statuses) AS u(id, old_status)
        JOIN queue_ext.job_queue AS j ON j.id = u.id;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.get_next_jobs(
    queue_names text[],
    n           integer,
    worker_id   text     DEFAULT NULL,
    lease       interval DEFAULT NULL
) RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
SET enable_seqscan = off
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    unknown text;
    names text[] := get_next_jobs.queue_names;
    -- The jobs this call locked: see get_next_jobs(text, ...).
    row_ids tid[];
    ids uuid[];
    old_statuses queue_ext.job_state[];
    any_logged boolean;  -- whether any of them is in a queue that stores its claims
BEGIN
    IF length(get_next_jobs.worker_id) > 200 THEN
        -- Stored on the job and in every history row of its claims.
        RAISE EXCEPTION 'worker_id is % characters, over the limit of 200', length(get_next_jobs.worker_id)
            USING ERRCODE = '22023';
    END IF;
    IF get_next_jobs.n IS NULL OR get_next_jobs.n < 1 THEN
        RAISE EXCEPTION 'n must be at least 1 (got %)', coalesce(get_next_jobs.n::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF get_next_jobs.lease IS NOT NULL THEN
        PERFORM queue_ext._check_interval('lease', get_next_jobs.lease, '1 second', '7 days');
    END IF;
    IF names IS NULL THEN
        names := ARRAY(SELECT t.queue_name FROM queue_ext.queues AS t
                       WHERE NOT t.is_webhook AND t.queue_name NOT LIKE 'queue\_ext.%' AND NOT t.paused);
    ELSE
        SELECT u.name INTO unknown
        FROM unnest(names) AS u(name)
        WHERE NOT EXISTS (SELECT 1 FROM queue_ext.queues AS t WHERE t.queue_name = u.name)
        LIMIT 1;
        IF FOUND THEN
            PERFORM queue_ext._queue(unknown);
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM queue_ext.job_queue AS e
               WHERE e.status = 'running' AND e.lease_expires_at <= now() AND e.queue_name = ANY (names)) THEN
        PERFORM queue_ext._return_running(NULL, 'lease expired', names);
    END IF;
    IF EXISTS (SELECT 1 FROM queue_ext.rate_limits)
       AND EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                   WHERE j.queue_name = ANY (names)
                     AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NOT NULL) THEN
        RETURN QUERY SELECT * FROM queue_ext._claim_limited(names, get_next_jobs.n,
                                                            get_next_jobs.worker_id, get_next_jobs.lease);
        RETURN;
    END IF;
    -- Lock, then change: see get_next_jobs(text, ...).
    SELECT array_agg(n.ctid), array_agg(n.id), array_agg(n.status), bool_or(n.log_claim)
    INTO row_ids, ids, old_statuses, any_logged
    FROM (SELECT c.ctid, c.id, c.status, q.keep_history AND q.notify AS log_claim
          FROM queue_ext.queues AS q
          CROSS JOIN LATERAL (
              SELECT j.ctid, j.id, j.status, j.priority, j.run_at
              FROM queue_ext.job_queue AS j
              WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL
                AND j.run_at <= now()
              ORDER BY j.priority DESC, j.run_at, j.id
              LIMIT get_next_jobs.n
              FOR UPDATE SKIP LOCKED
          ) AS c
          WHERE NOT q.paused AND q.queue_name = ANY (names)
          ORDER BY c.priority DESC, c.run_at, c.id
          LIMIT get_next_jobs.n) AS n;
    IF row_ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH claimed AS (
        UPDATE queue_ext.job_queue AS j
        SET status = 'running',
            attempt = j.attempt + 1,
            lease_token = queue_ext._lease_token(),
            lease_expires_at = now() + coalesce(get_next_jobs.lease,
                (SELECT q.lease_duration FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name)),
            worker_id = get_next_jobs.worker_id,
            started_at = coalesce(j.started_at, now()),
            claimed_at = now()
        WHERE j.ctid = ANY (row_ids)  -- see get_next_jobs(text, ...)
        RETURNING j.*
    )
    SELECT id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at, created_at
    FROM claimed
    ORDER BY priority DESC, run_at, id;
    IF any_logged THEN
        -- Stored only to be published (job_status_log).
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT j.id, j.queue_name, u.old_status, 'running', j.attempt, j.worker_id, j.enqueued_by
        FROM unnest(ids, old_statuses) AS u(id, old_status)
        JOIN queue_ext.job_queue AS j ON j.id = u.id
        JOIN queue_ext.queues AS q ON q.queue_name = j.queue_name
        WHERE q.keep_history AND q.notify;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._claim_limited(queue_names text[], n integer, worker_id text, lease interval)
RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE
SET jit = off
SET enable_seqscan = off
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH open_queues AS (
        SELECT q.queue_name, q.lease_duration, q.keep_history AND q.notify AS log_claim FROM queue_ext.queues AS q
        WHERE NOT q.paused AND (_claim_limited.queue_names IS NULL OR q.queue_name = ANY (_claim_limited.queue_names))
    ), unlimited AS (
        SELECT c.id, c.status AS old_status, c.priority, c.run_at, NULL::text AS rate_key
        FROM open_queues AS q
        CROSS JOIN LATERAL (
            SELECT id, status, priority, run_at FROM queue_ext.job_queue AS j
            WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL
              AND j.run_at <= now()
            ORDER BY j.priority DESC, j.run_at, j.id
            LIMIT _claim_limited.n
            FOR UPDATE OF j SKIP LOCKED
        ) AS c
    ), limited AS (
        -- Per queue and key, so that the index hands over rows in claim order.
        SELECT c.id, c.status AS old_status, c.priority, c.run_at, b.key AS rate_key, b.tokens
        FROM open_queues AS o
        CROSS JOIN (SELECT r.key, floor(queue_ext._tokens(r))::integer AS tokens FROM queue_ext.rate_limits AS r) AS b
        CROSS JOIN LATERAL (
            SELECT id, status, priority, run_at FROM queue_ext.job_queue AS j
            WHERE j.queue_name = o.queue_name AND j.rate_limit_key = b.key
              AND j.status IN ('queued', 'retrying') AND j.run_at <= now()
            ORDER BY j.priority DESC, j.run_at, j.id
            LIMIT least(_claim_limited.n, b.tokens)
            FOR UPDATE OF j SKIP LOCKED
        ) AS c
        WHERE b.tokens >= 1
    ), next AS (
        -- The best n, taking no more of a key than it has tokens (its jobs may come from
        -- several queues).
        SELECT id, old_status, priority, run_at, rate_key FROM (
            SELECT u.*, row_number() OVER (PARTITION BY u.rate_key ORDER BY u.priority DESC, u.run_at, u.id) AS nth
            FROM (SELECT *, NULL::integer AS tokens FROM unlimited UNION ALL SELECT * FROM limited) AS u
        ) AS ranked
        WHERE rate_key IS NULL OR nth <= tokens
        ORDER BY priority DESC, run_at, id
        LIMIT _claim_limited.n
    ), spent AS (
        UPDATE queue_ext.rate_limits AS r
        SET tokens = queue_ext._tokens(r) - u.used, refilled_at = greatest(r.refilled_at, now())
        FROM (SELECT rate_key, count(*) AS used FROM next WHERE rate_key IS NOT NULL GROUP BY rate_key) AS u
        WHERE r.key = u.rate_key AND queue_ext._tokens(r) >= u.used
        RETURNING r.key
    ), claimed AS (
        UPDATE queue_ext.job_queue AS j
        SET status = 'running',
            attempt = j.attempt + 1,
            lease_token = queue_ext._lease_token(),
            lease_expires_at = now() + coalesce(_claim_limited.lease,
                (SELECT o.lease_duration FROM open_queues AS o WHERE o.queue_name = j.queue_name)),
            worker_id = _claim_limited.worker_id,
            started_at = coalesce(j.started_at, now()),
            claimed_at = now()
        -- By primary key from an array, not joined to next: a join let a cached generic plan
        -- (LIMIT unknown, guessed at 10% of the table) hash a sequential scan of the whole
        -- job_queue on every claim, or rescan the index once per row.
        WHERE j.id = ANY (ARRAY(SELECT n.id FROM next AS n
                                WHERE n.rate_key IS NULL OR n.rate_key IN (SELECT s.key FROM spent AS s)))
        RETURNING j.*
    ), history AS (
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT c.id, c.queue_name, n.old_status, 'running', c.attempt, c.worker_id, c.enqueued_by
        FROM claimed AS c JOIN next AS n ON n.id = c.id JOIN open_queues AS o ON o.queue_name = c.queue_name
        WHERE o.log_claim  -- stored only to be published (job_status_log)
    )
    SELECT id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at, created_at
    FROM claimed
    ORDER BY priority DESC, run_at, id;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.complete_jobs(job_ids uuid[], lease_tokens uuid[] DEFAULT NULL, results jsonb[] DEFAULT NULL)
RETURNS TABLE (job_id uuid, status queue_ext.job_state)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    done_ids uuid[];
    done_states queue_ext.job_state[];
    done_queues text[];
    follow queue_ext.job_queue[];        -- jobs that need more than the set-based part
    follow_states queue_ext.job_state[];
    follow_results jsonb[];
    follow_callbacks boolean[];
    logged queue_ext.job_queue[];        -- completions whose rows are stored (see _complete)
BEGIN
    IF complete_jobs.job_ids IS NULL THEN
        RAISE EXCEPTION 'job_ids must not be null' USING ERRCODE = '22004';
    END IF;
    IF cardinality(complete_jobs.lease_tokens) <> cardinality(complete_jobs.job_ids)
       OR cardinality(complete_jobs.results) <> cardinality(complete_jobs.job_ids) THEN
        RAISE EXCEPTION 'lease_tokens and results must have one element per job id (% job ids)',
            cardinality(complete_jobs.job_ids) USING ERRCODE = '22023';
    END IF;
    WITH input AS (
        SELECT u.id, u.token, u.result
        FROM unnest(complete_jobs.job_ids, complete_jobs.lease_tokens, complete_jobs.results) AS u(id, token, result)
    ), done AS (
        -- Each job's queue flags, and whether it needs more than the set-based part, are read
        -- once here; the whole row (for that rare part) is built only for the jobs that need it.
        DELETE FROM queue_ext.job_queue AS t
        USING input AS i, queue_ext.queues AS q
        WHERE t.id = i.id AND t.status = 'running' AND q.queue_name = t.queue_name
          AND (i.token IS NULL OR (t.lease_token = i.token AND t.lease_expires_at > now()))
        RETURNING t.*, i.result AS new_result, q.has_callback,
                  -- What the archive and the history keep (queues.keep_history: all, or the cancelled).
                  q.keep_history OR t.cancel_requested IS NOT NULL AS kept,
                  -- A completion's rows are stored only to be published, or when its claim
                  -- predates claimed_at (see _complete); a cancellation's in the loop below.
                  CASE WHEN q.keep_history AND t.cancel_requested IS NULL AND (q.notify OR t.claimed_at IS NULL)
                       THEN t END AS logged_job,
                  CASE WHEN t.cancel_requested IS NULL THEN 'completed' ELSE 'cancelled' END::queue_ext.job_state AS final,
                  CASE WHEN t.cancel_requested IS NOT NULL OR q.has_callback THEN t END AS follow_job
    ), archived AS (
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            worker_id, result, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at, started_at,
            rate_limit_key, concurrency_key, claimed_at)
        SELECT id, queue_name, payload, priority, final, attempt, max_attempts, worker_id, new_result,
               coalesce(cancel_requested, last_error), errors, CASE WHEN final = 'completed' THEN 100 ELSE progress END,
               progress_details, enqueued_by, created_at, run_at, started_at, rate_limit_key, concurrency_key, claimed_at
        FROM done WHERE kept
    )
    -- (A row value IS NOT NULL only when every field is: IS DISTINCT FROM NULL asks whether
    -- there is a row at all.)
    SELECT array_agg(id), array_agg(final), array_agg(queue_name),
           array_agg(follow_job) FILTER (WHERE follow_job IS DISTINCT FROM NULL),
           array_agg(final) FILTER (WHERE follow_job IS DISTINCT FROM NULL),
           array_agg(new_result) FILTER (WHERE follow_job IS DISTINCT FROM NULL),
           array_agg(has_callback) FILTER (WHERE follow_job IS DISTINCT FROM NULL),
           array_agg(logged_job) FILTER (WHERE logged_job IS DISTINCT FROM NULL)
    INTO done_ids, done_states, done_queues, follow, follow_states, follow_results, follow_callbacks, logged
    FROM done;
    PERFORM queue_ext._log_completions(logged);
    PERFORM queue_ext._count_at_commit(u.q, 'completed', count(*))
    FROM unnest(done_queues, done_states) AS u(q, s) WHERE u.s = 'completed' GROUP BY u.q;
    -- Dependents to release, looked up by a statement of their own: an enqueue that named one
    -- of these jobs as a dependency locked its row, and the DELETE above waited for it; only
    -- a snapshot taken after that wait sees the edge it added.
    -- (Most databases have no dependency at all: one probe instead of one per job.)
    IF EXISTS (SELECT 1 FROM queue_ext.job_dependencies) THEN
        PERFORM queue_ext._release_dependents(u.id)
        FROM unnest(done_ids, done_states) AS u(id, s)
        WHERE u.s = 'completed' AND EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = u.id);
    END IF;

    -- The rest is per job, and rare: dependents to cancel, callbacks to send.
    FOR k IN 1 .. coalesce(cardinality(follow), 0) LOOP
        IF follow_states[k] = 'cancelled' THEN
            PERFORM queue_ext._log_claim(follow[k]);
            INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
            VALUES (follow[k].id, follow[k].queue_name, 'running', 'cancelled', follow[k].attempt, follow[k].worker_id,
                    follow[k].cancel_requested, follow[k].enqueued_by);
            PERFORM queue_ext._cancel_dependents(follow[k].id, format('dependency %s was cancelled', follow[k].id));
        END IF;
        IF follow_callbacks[k] THEN
            PERFORM queue_ext._emit_callback(follow[k],
                CASE follow_states[k] WHEN 'completed' THEN 'job.completed' ELSE 'job.cancelled' END, follow_results[k]);
        END IF;
    END LOOP;
    IF done_ids = complete_jobs.job_ids THEN
        -- Every job done, in the order given (the usual batch): nothing to match up.
        RETURN QUERY SELECT * FROM unnest(done_ids, done_states);
    ELSE
        RETURN QUERY SELECT u.id, f.state
                     FROM unnest(complete_jobs.job_ids) WITH ORDINALITY AS u(id, i)
                     LEFT JOIN unnest(done_ids, done_states) AS f(id, state) ON f.id = u.id
                     ORDER BY u.i;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION queue_ext._lease_token() FROM PUBLIC;
