-- queue_ext 0.6.0 -> 0.7.0: claims that stay fast while the xmin horizon is held back.
--   * get_next_jobs(queue_name, ...) (and get_next_job, complete_and_get_next) claims from
--     per-priority floors once the horizon has stood still for queue_ext.claim_window_after
--     (new: the C functions _claim_window, _claim_window_ids, _claim_window_set and
--     _claim_window_probe).
--   * job_queue_lease_idx is partial on lease_expires_at IS NOT NULL instead of
--     status = 'running', so that the statements that change one running job by id always
--     use the primary key. The index is rebuilt (job_queue holds only live jobs).
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.7.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.7.0'" to load this file. \quit

DROP INDEX queue_ext.job_queue_lease_idx;
CREATE INDEX job_queue_lease_idx ON queue_ext.job_queue (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;

CREATE FUNCTION queue_ext."_claim_window"(
	"queue_name" TEXT /* & str */
) RETURNS timestamp with time zone[] /* :: std :: option :: Option < Vec < Option < TimestampWithTimeZone > > > */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_claim_window_wrapper';

CREATE FUNCTION queue_ext."_claim_window_ids"(
	"queue_name" TEXT /* & str */
) RETURNS uuid[] /* :: std :: option :: Option < Vec < Option < pgrx :: Uuid > > > */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_claim_window_ids_wrapper';

CREATE FUNCTION queue_ext."_claim_window_set"(
	"queue_name" TEXT, /* & str */
	"run_ats" timestamp with time zone[], /* Vec < Option < TimestampWithTimeZone > > */
	"ids" uuid[] /* Vec < Option < pgrx :: Uuid > > */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_claim_window_set_wrapper';

-- Every function whose definition changed or that is new, as in sql/.
CREATE OR REPLACE FUNCTION queue_ext._claim_window_probe(queue_name text, OUT run_ats timestamptz[], OUT ids uuid[])
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    margin CONSTANT interval := '2 seconds';
BEGIN
    SELECT array_agg(CASE WHEN o.run_at < now() - margin THEN o.run_at ELSE now() - margin END ORDER BY p.ord),
           array_agg(CASE WHEN o.run_at < now() - margin THEN o.id ELSE '00000000-0000-0000-0000-000000000000' END
                     ORDER BY p.ord)
    INTO run_ats, ids
    FROM unnest('{critical,high,normal,low}'::queue_ext.job_priority[]) WITH ORDINALITY AS p(priority, ord)
    LEFT JOIN LATERAL (
        SELECT j.run_at, j.id FROM queue_ext.job_queue AS j
        WHERE j.queue_name = _claim_window_probe.queue_name
          AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL AND j.priority = p.priority
        ORDER BY j.run_at, j.id
        LIMIT 1
    ) AS o ON true;
    PERFORM queue_ext._claim_window_set(_claim_window_probe.queue_name, run_ats, ids);
END
$$;

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
    RETURN QUERY
    WITH from_start AS (
        SELECT id, status AS old_status
        FROM queue_ext.job_queue
        WHERE floors IS NULL
          AND queue_name = q.queue_name AND status IN ('queued', 'retrying') AND rate_limit_key IS NULL
          AND run_at <= now()
        ORDER BY priority DESC, run_at, id
        LIMIT get_next_jobs.n
        FOR UPDATE SKIP LOCKED
    ), from_floors AS (
        -- One range per priority, highest first: PostgreSQL 15 cannot start a scan at a
        -- floor on the third column of the index with the second one unbound.
        SELECT w.id, w.old_status
        FROM unnest('{critical,high,normal,low}'::queue_ext.job_priority[], floors, floor_ids)
             AS p(priority, floor_at, floor_id)
        CROSS JOIN LATERAL (
            SELECT j.id, j.status AS old_status
            FROM queue_ext.job_queue AS j
            WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL
              AND j.priority = p.priority AND (j.run_at, j.id) >= (p.floor_at, p.floor_id) AND j.run_at <= now()
            ORDER BY j.run_at, j.id
            LIMIT get_next_jobs.n
            FOR UPDATE SKIP LOCKED
        ) AS w
        WHERE floors IS NOT NULL
        LIMIT get_next_jobs.n
    ), next AS (
        SELECT * FROM from_start UNION ALL SELECT * FROM from_floors
    ), claimed AS (
        UPDATE queue_ext.job_queue AS j
        SET status = 'running',
            attempt = j.attempt + 1,
            lease_token = gen_random_uuid(),
            lease_expires_at = now() + lease_for,
            worker_id = get_next_jobs.worker_id,
            started_at = coalesce(j.started_at, now())
        -- By primary key from an array, not joined to next: a join let a cached generic plan
        -- (LIMIT unknown, guessed at 10% of the table) hash a sequential scan of the whole
        -- job_queue on every claim, or rescan the index once per row.
        WHERE j.id = ANY (ARRAY(SELECT id FROM next))
        RETURNING j.*
    ), history AS (
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT c.id, c.queue_name, n.old_status, 'running', c.attempt, c.worker_id, c.enqueued_by
        FROM claimed AS c JOIN next AS n ON n.id = c.id
        WHERE q.keep_history
    )
    SELECT id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at, created_at
    FROM claimed
    ORDER BY priority DESC, run_at, id;
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
    RETURN QUERY
    WITH candidates AS (
        SELECT c.id, c.status AS old_status, c.priority, c.run_at, q.keep_history
        FROM queue_ext.queues AS q
        CROSS JOIN LATERAL (
            SELECT id, status, priority, run_at
            FROM queue_ext.job_queue AS j
            WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL
              AND j.run_at <= now()
            ORDER BY j.priority DESC, j.run_at, j.id
            LIMIT get_next_jobs.n
            FOR UPDATE SKIP LOCKED
        ) AS c
        WHERE NOT q.paused AND q.queue_name = ANY (names)
    ), next AS (
        SELECT * FROM candidates ORDER BY priority DESC, run_at, id LIMIT get_next_jobs.n
    ), claimed AS (
        UPDATE queue_ext.job_queue AS j
        SET status = 'running',
            attempt = j.attempt + 1,
            lease_token = gen_random_uuid(),
            lease_expires_at = now() + coalesce(get_next_jobs.lease,
                (SELECT q.lease_duration FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name)),
            worker_id = get_next_jobs.worker_id,
            started_at = coalesce(j.started_at, now())
        WHERE j.id = ANY (ARRAY(SELECT id FROM next))  -- not a join: see get_next_jobs(text, ...)
        RETURNING j.*
    ), history AS (
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT c.id, c.queue_name, n.old_status, 'running', c.attempt, c.worker_id, c.enqueued_by
        FROM claimed AS c JOIN next AS n ON n.id = c.id
        WHERE n.keep_history
    )
    SELECT id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at, created_at
    FROM claimed
    ORDER BY priority DESC, run_at, id;
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
        SELECT q.queue_name, q.lease_duration, q.keep_history FROM queue_ext.queues AS q
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
            lease_token = gen_random_uuid(),
            lease_expires_at = now() + coalesce(_claim_limited.lease,
                (SELECT o.lease_duration FROM open_queues AS o WHERE o.queue_name = j.queue_name)),
            worker_id = _claim_limited.worker_id,
            started_at = coalesce(j.started_at, now())
        -- Not a join: see get_next_jobs(text, ...).
        WHERE j.id = ANY (ARRAY(SELECT n.id FROM next AS n
                                WHERE n.rate_key IS NULL OR n.rate_key IN (SELECT s.key FROM spent AS s)))
        RETURNING j.*
    ), history AS (
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT c.id, c.queue_name, n.old_status, 'running', c.attempt, c.worker_id, c.enqueued_by
        FROM claimed AS c JOIN next AS n ON n.id = c.id JOIN open_queues AS o ON o.queue_name = c.queue_name
        WHERE o.keep_history
    )
    SELECT id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at, created_at
    FROM claimed
    ORDER BY priority DESC, run_at, id;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._return_running(only_worker text, reason text, queue_names text[] DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j queue_ext.job_queue;
    handled integer := 0;
BEGIN
    FOR j IN
        SELECT * FROM queue_ext.job_queue AS t
        WHERE t.status = 'running' AND t.lease_expires_at IS NOT NULL  -- (always: lets job_queue_lease_idx serve)
          AND CASE WHEN only_worker IS NULL THEN t.lease_expires_at <= now() ELSE t.worker_id = only_worker END
          AND (queue_names IS NULL OR t.queue_name = ANY (queue_names))
        ORDER BY t.lease_expires_at
        FOR UPDATE SKIP LOCKED
    LOOP
        j.errors := j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempt, 'error', reason, 'at', now(), 'worker_id', j.worker_id));
        j.last_error := reason;
        PERFORM queue_ext._count_at_commit(j.queue_name, 'failed', 1);
        IF j.attempt >= j.max_attempts THEN
            DELETE FROM queue_ext.job_queue WHERE id = j.id;
            PERFORM queue_ext._bury(j, format('%s on the last of %s attempts', reason, j.max_attempts), reason);
        ELSE
            UPDATE queue_ext.job_queue
            SET status = 'queued', run_at = now(), lease_token = NULL, lease_expires_at = NULL,
                last_error = j.last_error, errors = j.errors
            WHERE id = j.id;
            INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
            VALUES (j.id, j.queue_name, 'running', 'queued', j.attempt, j.worker_id, reason, j.enqueued_by);
            PERFORM queue_ext._announce(j.queue_name);
        END IF;
        handled := handled + 1;
    END LOOP;
    RETURN handled;
END
$$;

-- New functions are created executable by PUBLIC: take that away, as grants.sql does.
REVOKE ALL ON FUNCTION
    queue_ext._claim_window(text),
    queue_ext._claim_window_ids(text),
    queue_ext._claim_window_set(text, timestamptz[], uuid[]),
    queue_ext._claim_window_probe(text)
FROM PUBLIC;
