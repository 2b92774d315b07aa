-- queue_ext 0.7.0 -> 0.8.0: no history rows written on the hot path.
--   * The routine transitions of a job, the claim of its current attempt and, once completed,
--     that claim and the completion, are derived from its own row instead of written to the
--     history by every claim and completion: job_status_history becomes a view over the
--     stored transitions (the table, renamed job_status_log) and those rows. Queues with
--     notify_events on still store them (events are published from the table's inserts).
--   * job_queue and job_archive gain claimed_at (when the current or last attempt was
--     claimed). Jobs running across the upgrade have none; their claim is already stored,
--     and their completion is stored too (_complete, complete_jobs, the dispatcher).
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.8.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.8.0'" to load this file. \quit

ALTER TABLE queue_ext.job_status_history RENAME TO job_status_log;
ALTER SEQUENCE queue_ext.job_status_history_id_seq RENAME TO job_status_log_id_seq;
ALTER INDEX queue_ext.job_status_history_job_idx RENAME TO job_status_log_job_idx;
ALTER INDEX queue_ext.job_status_history_failures_idx RENAME TO job_status_log_failures_idx;
-- PostgreSQL 18 names NOT NULL constraints after their table (15 keeps none in pg_constraint).
DO $rename$
DECLARE
    old_name name;
BEGIN
    FOR old_name IN
        SELECT c.conname FROM pg_catalog.pg_constraint AS c
        WHERE c.conrelid = 'queue_ext.job_status_log'::regclass AND c.conname LIKE 'job\_status\_history\_%'
    LOOP
        EXECUTE format('ALTER TABLE queue_ext.job_status_log RENAME CONSTRAINT %I TO %I',
                       old_name, 'job_status_log_' || substr(old_name, length('job_status_history_') + 1));
    END LOOP;
END
$rename$;
COMMENT ON TABLE queue_ext.job_status_log IS 'The stored transitions of job_status_history: all but a running or completed job''s last claim and its completion, which the job''s row records.';
ALTER TABLE queue_ext.job_queue ADD COLUMN claimed_at timestamptz;
ALTER TABLE queue_ext.job_archive ADD COLUMN claimed_at timestamptz;

-- Every transition of every job after its enqueue: the stored ones, and those its row
-- records (see job_status_log). id orders one job's rows; the derived rows come last in
-- their job, with the two largest bigints (claim, completion): order a job's rows by id,
-- and rows of several jobs by at. Read with the reader's own rights (security_invoker),
-- so a producer sees the rows of its own jobs only, as in the tables. A claim's from_status
-- is the state of its job's last stored transition (a job's stored rows end in the state
-- it was claimed from; none: it was enqueued ready to run), as _log_claim stores it.
CREATE VIEW queue_ext.job_status_history WITH (security_invoker = true) AS
SELECT h.id, h.job_id, h.queue_name, h.from_status, h.to_status, h.attempt, h.worker_id, h.error,
       h.enqueued_by, h.at
FROM queue_ext.job_status_log AS h
UNION ALL
SELECT 9223372036854775806, j.id, j.queue_name, coalesce((SELECT s.to_status FROM queue_ext.job_status_log AS s
                 WHERE s.job_id = j.id ORDER BY s.id DESC LIMIT 1), 'queued'), 'running', j.attempt,
       j.worker_id, NULL, j.enqueued_by, j.claimed_at
FROM queue_ext.job_queue AS j
WHERE j.status = 'running' AND j.claimed_at IS NOT NULL
  AND (SELECT q.keep_history FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name)
  AND NOT EXISTS (SELECT 1 FROM queue_ext.job_status_log AS s
                  WHERE s.job_id = j.id AND s.attempt = j.attempt AND s.to_status = 'running')
UNION ALL
SELECT 9223372036854775806, a.id, a.queue_name, coalesce((SELECT s.to_status FROM queue_ext.job_status_log AS s
                 WHERE s.job_id = a.id ORDER BY s.id DESC LIMIT 1), 'queued'), 'running', a.attempt,
       a.worker_id, NULL, a.enqueued_by, a.claimed_at
FROM queue_ext.job_archive AS a
WHERE a.status = 'completed' AND a.claimed_at IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM queue_ext.job_status_log AS s
                  WHERE s.job_id = a.id AND s.attempt = a.attempt AND s.to_status = 'running')
UNION ALL
SELECT 9223372036854775807, a.id, a.queue_name, 'running', 'completed', a.attempt,
       a.worker_id, NULL, a.enqueued_by, a.finished_at
FROM queue_ext.job_archive AS a
WHERE a.status = 'completed' AND a.claimed_at IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM queue_ext.job_status_log AS s
                  WHERE s.job_id = a.id AND s.to_status = 'completed');
COMMENT ON VIEW queue_ext.job_status_history IS 'Audit trail: one row per status transition of every job after its enqueue (recorded on the job itself: created_at, enqueued_by).';
GRANT SELECT ON queue_ext.job_status_history TO queue_ext_producer, queue_ext_worker, queue_ext_admin;

-- Every function whose definition changed or that is new, as in sql/.
CREATE OR REPLACE FUNCTION queue_ext.drop_queue(queue_name text, force boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    live bigint;
    dropped uuid[];
BEGIN
    PERFORM queue_ext._queue(drop_queue.queue_name);
    PERFORM queue_ext._refuse_internal(drop_queue.queue_name, 'drop');
    -- Lock the queue row so concurrent enqueues that check it wait for us.
    PERFORM 1 FROM queue_ext.queues WHERE queue_name = drop_queue.queue_name FOR UPDATE;
    SELECT count(*) INTO live FROM queue_ext.job_queue WHERE queue_name = drop_queue.queue_name;
    IF live > 0 AND NOT drop_queue.force THEN
        RAISE EXCEPTION 'queue "%" still has % live jobs', drop_queue.queue_name, live
            USING ERRCODE = '55006', HINT = 'Drain it first, or call drop_queue(queue_name, force => true) to cancel them.';
    END IF;
    PERFORM queue_ext._log_claim(j) FROM queue_ext.job_queue AS j
    WHERE j.queue_name = drop_queue.queue_name AND j.status = 'running';
    WITH gone AS (
        DELETE FROM queue_ext.job_queue WHERE queue_name = drop_queue.queue_name RETURNING *
    ), archived AS (
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            worker_id, last_error, errors, enqueued_by, created_at, run_at, started_at, rate_limit_key, concurrency_key)
        SELECT id, queue_name, payload, priority, 'cancelled', attempt, max_attempts,
            worker_id, 'queue dropped', errors, enqueued_by, created_at, run_at, started_at, rate_limit_key, concurrency_key
        FROM gone
    ), history AS (
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
        SELECT id, queue_name, status, 'cancelled', attempt, worker_id, 'queue dropped', enqueued_by FROM gone
    )
    SELECT array_agg(id) INTO dropped FROM gone;
    -- Edges from the dropped jobs go with them; edges to them cancel their dependents.
    DELETE FROM queue_ext.job_dependencies AS e WHERE e.job_id = ANY (dropped);
    PERFORM queue_ext._cancel_dependents(d, format('dependency %s was cancelled', d))
    FROM unnest(dropped) AS d
    WHERE EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = d);
    DELETE FROM queue_ext.webhook_targets WHERE queue_name = drop_queue.queue_name;
    DELETE FROM queue_ext.queues WHERE queue_name = drop_queue.queue_name;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.enqueue_job(
    queue_name      text,
    payload         jsonb,
    priority        text        DEFAULT 'normal',
    run_at          timestamptz DEFAULT NULL,
    delay           interval    DEFAULT NULL,
    max_attempts    integer     DEFAULT NULL,
    dedupe_key      text        DEFAULT NULL,
    depends_on      uuid[]      DEFAULT NULL,
    rate_limit_key  text        DEFAULT NULL,
    concurrency_key text        DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q queue_ext.queues := queue_ext._queue(enqueue_job.queue_name);
    new_id uuid := queue_ext.uuid_generate_v7();
    who text := queue_ext._invoker();
    start timestamptz := queue_ext._start_time(enqueue_job.run_at, enqueue_job.delay);
    existing uuid;
    initial queue_ext.job_state := 'queued';
    blocked_by uuid;
    took_slot boolean := false;
BEGIN
    -- The checks' own conditions first, so that the usual enqueue makes no call for them (a
    -- PERFORM is a statement of its own: two of them were a tenth of an enqueue's CPU).
    IF q.queue_name LIKE 'queue\_ext.%' THEN
        PERFORM queue_ext._refuse_internal(q.queue_name, 'enqueue into');
    END IF;
    IF enqueue_job.payload IS NULL OR jsonb_typeof(enqueue_job.payload) <> 'object'
       OR pg_column_size(enqueue_job.payload) > queue_ext.max_payload_bytes() THEN
        PERFORM queue_ext._check_payload(enqueue_job.payload);
    END IF;
    IF enqueue_job.max_attempts IS NOT NULL THEN
        PERFORM queue_ext._check_max_attempts(enqueue_job.max_attempts);
    END IF;
    IF enqueue_job.rate_limit_key IS NOT NULL OR enqueue_job.concurrency_key IS NOT NULL THEN
        PERFORM queue_ext._check_limit_keys(enqueue_job.rate_limit_key, enqueue_job.concurrency_key);
    END IF;
    -- The key is indexed (job_queue_dedupe_idx): a longer one fails inside the index with a
    -- message about index rows instead.
    IF octet_length(enqueue_job.dedupe_key) > 1000 THEN
        RAISE EXCEPTION 'dedupe_key must be at most 1000 bytes (got %)', octet_length(enqueue_job.dedupe_key)
            USING ERRCODE = '22023';
    END IF;
    IF enqueue_job.depends_on IS NOT NULL AND cardinality(enqueue_job.depends_on) > 0 THEN
        SELECT w.state, w.blocked_by INTO initial, blocked_by
        FROM queue_ext._dependency_state(new_id, enqueue_job.depends_on) AS w;
        IF initial = 'cancelled' THEN
            -- A dependency is already dead or cancelled: this job can never run.
            INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
                last_error, enqueued_by, created_at, run_at, rate_limit_key, concurrency_key)
            VALUES (new_id, q.queue_name, enqueue_job.payload, queue_ext._priority(enqueue_job.priority), 'cancelled',
                0, coalesce(enqueue_job.max_attempts, q.max_attempts),
                format('dependency %s is dead or cancelled', blocked_by), who, now(), start,
                enqueue_job.rate_limit_key, enqueue_job.concurrency_key);
            INSERT INTO queue_ext.job_status_log (job_id, queue_name, to_status, attempt, error, enqueued_by)
            VALUES (new_id, q.queue_name, 'cancelled', 0, format('dependency %s is dead or cancelled', blocked_by), who);
            RETURN new_id;
        END IF;
    END IF;
    IF enqueue_job.concurrency_key IS NOT NULL AND initial = 'queued' THEN
        -- No free slot: wait for one (admitted in enqueue order, limits.sql).
        took_slot := queue_ext._take_slot(enqueue_job.concurrency_key);
        IF NOT took_slot THEN
            initial := 'waiting';
        END IF;
    END IF;
    IF enqueue_job.dedupe_key IS NULL THEN
        INSERT INTO queue_ext.job_queue (id, queue_name, payload, priority, status, run_at, max_attempts, enqueued_by,
                                         rate_limit_key, concurrency_key)
        VALUES (new_id, q.queue_name, enqueue_job.payload, queue_ext._priority(enqueue_job.priority), initial, start,
                coalesce(enqueue_job.max_attempts, q.max_attempts), who,
                enqueue_job.rate_limit_key, enqueue_job.concurrency_key);
    ELSE
        -- Race-free: a concurrent enqueue with the same key makes us wait for its commit,
        -- then we see its job instead of inserting our own.
        LOOP
            INSERT INTO queue_ext.job_queue (id, queue_name, payload, priority, status, run_at, max_attempts,
                                             enqueued_by, dedupe_key, rate_limit_key, concurrency_key)
            VALUES (new_id, q.queue_name, enqueue_job.payload, queue_ext._priority(enqueue_job.priority), initial,
                    start, coalesce(enqueue_job.max_attempts, q.max_attempts), who, enqueue_job.dedupe_key,
                    enqueue_job.rate_limit_key, enqueue_job.concurrency_key)
            ON CONFLICT (queue_name, enqueued_by, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING;
            EXIT WHEN FOUND;
            SELECT id INTO existing FROM queue_ext.job_queue
            WHERE queue_name = q.queue_name AND enqueued_by = who AND dedupe_key = enqueue_job.dedupe_key;
            IF FOUND THEN
                DELETE FROM queue_ext.job_dependencies WHERE job_id = new_id;
                IF took_slot THEN
                    -- We hold the key's lock, so nothing was admitted meanwhile: give it back.
                    UPDATE queue_ext.concurrency_limits AS l SET active = l.active - 1
                    WHERE l.key = enqueue_job.concurrency_key;
                END IF;
                RETURN existing;
            END IF;
            -- The other job finished between the two statements: try again.
        END LOOP;
    END IF;
    -- The enqueue is recorded on the job (created_at, enqueued_by), not in the history, so
    -- its event is published here rather than by the history's trigger.
    IF q.notify THEN
        PERFORM queue_ext._notify(new_id, q.queue_name, initial::text, 0, NULL);
    END IF;
    -- Webhook queues are the dispatcher's to deliver; SQL workers hear of the others
    -- (inline rather than _announce(): this is the hottest path).
    IF initial <> 'queued' OR start > now() THEN
        NULL;
    ELSIF q.is_webhook THEN
        PERFORM queue_ext._wake_dispatcher_at_commit();
    ELSIF NOT queue_ext._announce_at_commit(q.queue_name) THEN
        PERFORM pg_notify('queue_ext_jobs', q.queue_name);
    END IF;
    RETURN new_id;
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
            started_at = coalesce(j.started_at, now()),
            claimed_at = now()
        -- By primary key from an array, not joined to next: a join let a cached generic plan
        -- (LIMIT unknown, guessed at 10% of the table) hash a sequential scan of the whole
        -- job_queue on every claim, or rescan the index once per row.
        WHERE j.id = ANY (ARRAY(SELECT id FROM next))
        RETURNING j.*
    ), history AS (
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT c.id, c.queue_name, n.old_status, 'running', c.attempt, c.worker_id, c.enqueued_by
        FROM claimed AS c JOIN next AS n ON n.id = c.id
        WHERE q.keep_history AND q.notify  -- stored only to be published (job_status_log)
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
        SELECT c.id, c.status AS old_status, c.priority, c.run_at, q.keep_history AND q.notify AS log_claim
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
            started_at = coalesce(j.started_at, now()),
            claimed_at = now()
        WHERE j.id = ANY (ARRAY(SELECT id FROM next))  -- not a join: see get_next_jobs(text, ...)
        RETURNING j.*
    ), history AS (
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT c.id, c.queue_name, n.old_status, 'running', c.attempt, c.worker_id, c.enqueued_by
        FROM claimed AS c JOIN next AS n ON n.id = c.id
        WHERE n.log_claim  -- stored only to be published (job_status_log)
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
            lease_token = gen_random_uuid(),
            lease_expires_at = now() + coalesce(_claim_limited.lease,
                (SELECT o.lease_duration FROM open_queues AS o WHERE o.queue_name = j.queue_name)),
            worker_id = _claim_limited.worker_id,
            started_at = coalesce(j.started_at, now()),
            claimed_at = now()
        -- Not a join: see get_next_jobs(text, ...).
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

CREATE OR REPLACE FUNCTION queue_ext._log_claim(j queue_ext.job_queue) RETURNS void
LANGUAGE sql VOLATILE
AS $$
    INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id,
                                          enqueued_by, at)
    SELECT j.id, j.queue_name,
           -- As job_status_history derives it (schema.sql).
           coalesce((SELECT s.to_status FROM queue_ext.job_status_log AS s
                     WHERE s.job_id = j.id ORDER BY s.id DESC LIMIT 1), 'queued'),
           'running', j.attempt, j.worker_id, j.enqueued_by, coalesce(j.claimed_at, j.started_at, now())
    WHERE j.status = 'running'
      AND (SELECT q.keep_history FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name)
      AND NOT EXISTS (SELECT 1 FROM queue_ext.job_status_log AS s
                      WHERE s.job_id = j.id AND s.attempt = j.attempt AND s.to_status = 'running')
$$;

CREATE OR REPLACE FUNCTION queue_ext._log_completions(jobs queue_ext.job_queue[]) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF cardinality(jobs) > 0 THEN
        PERFORM queue_ext._log_claim(j) FROM unnest(jobs) AS j;
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT j.id, j.queue_name, 'running', 'completed', j.attempt, j.worker_id, j.enqueued_by FROM unnest(jobs) AS j;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._complete(job_id uuid, result jsonb, lease_token uuid) RETURNS queue_ext.job_state
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    j queue_ext.job_queue;
    q queue_ext.queues;
    final queue_ext.job_state;
BEGIN
    DELETE FROM queue_ext.job_queue
    WHERE id = _complete.job_id AND status = 'running'
      AND (_complete.lease_token IS NULL
           OR (lease_token = _complete.lease_token AND lease_expires_at > now()))
    RETURNING * INTO j;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO q FROM queue_ext.queues AS t WHERE t.queue_name = j.queue_name;
    final := CASE WHEN j.cancel_requested IS NULL THEN 'completed' ELSE 'cancelled' END;
    -- A queue without history deletes its completed jobs (cancelled ones are still kept).
    IF q.keep_history OR final = 'cancelled' THEN
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            worker_id, result, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at, started_at,
            rate_limit_key, concurrency_key, claimed_at)
        VALUES (j.id, j.queue_name, j.payload, j.priority, final, j.attempt, j.max_attempts,
            j.worker_id, _complete.result, coalesce(j.cancel_requested, j.last_error), j.errors,
            CASE WHEN final = 'completed' THEN 100 ELSE j.progress END, j.progress_details,
            j.enqueued_by, j.created_at, j.run_at, j.started_at, j.rate_limit_key, j.concurrency_key, j.claimed_at);
        -- A completion's rows are derived from the archive row (job_status_log), unless they
        -- are to be published, or the claim predates claimed_at (running across an upgrade).
        IF final = 'cancelled' OR q.notify OR j.claimed_at IS NULL THEN
            PERFORM queue_ext._log_claim(j);
            INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
            VALUES (j.id, j.queue_name, 'running', final, j.attempt, j.worker_id, j.cancel_requested, j.enqueued_by);
        END IF;
    END IF;
    IF final = 'completed' THEN
        PERFORM queue_ext._count_at_commit(j.queue_name, 'completed', 1);
        -- Most jobs have no dependents: one index probe instead of a call. (An enqueue that
        -- adds a dependent holds a lock on this job's row, which our DELETE waited for.)
        IF EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = j.id) THEN
            PERFORM queue_ext._release_dependents(j.id);
        END IF;
    ELSE
        PERFORM queue_ext._cancel_dependents(j.id, format('dependency %s was cancelled', j.id));
    END IF;
    IF q.has_callback THEN
        PERFORM queue_ext._emit_callback(j, CASE final WHEN 'completed' THEN 'job.completed' ELSE 'job.cancelled' END,
                                         _complete.result);
    END IF;
    RETURN final;
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
    PERFORM queue_ext._release_dependents(u.id)
    FROM unnest(done_ids, done_states) AS u(id, s)
    WHERE u.s = 'completed' AND EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = u.id);

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
    RETURN QUERY SELECT u.id, f.state
                 FROM unnest(complete_jobs.job_ids) WITH ORDINALITY AS u(id, i)
                 LEFT JOIN unnest(done_ids, done_states) AS f(id, state) ON f.id = u.id
                 ORDER BY u.i;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._bury(j queue_ext.job_queue, reason text, error text) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    INSERT INTO queue_ext.job_dead_letter (id, queue_name, payload, priority, attempt, max_attempts,
        worker_id, last_error, errors, reason, enqueued_by, created_at, started_at, rate_limit_key, concurrency_key)
    VALUES (j.id, j.queue_name, j.payload, j.priority, j.attempt, j.max_attempts,
        j.worker_id, j.last_error, j.errors, reason, j.enqueued_by, j.created_at, j.started_at,
        j.rate_limit_key, j.concurrency_key);
    INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
    VALUES (j.id, j.queue_name, j.status, 'dead', j.attempt, j.worker_id, error, j.enqueued_by);
    PERFORM queue_ext._count_at_commit(j.queue_name, 'dead', 1);
    PERFORM queue_ext._cancel_dependents(j.id, format('dependency %s is dead', j.id));
    IF (SELECT has_callback FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name) THEN
        PERFORM queue_ext._emit_callback(j, 'job.dead', NULL);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._fail(
    job_id      uuid,
    error       text,
    lease_token uuid,
    permanent   boolean,
    retry_in    interval
) RETURNS queue_ext.job_state
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    j queue_ext.job_queue;
    q queue_ext.queues;
    -- Bounded: every attempt's error is kept in the row (errors), its history and its
    -- callback, so an unbounded one let a worker grow a job by megabytes per retry.
    message text := left(coalesce(_fail.error, 'unknown error'), 10000);
    failure jsonb;
BEGIN
    PERFORM queue_ext._check_interval('retry_in', _fail.retry_in, '0', '100 years');
    SELECT * INTO j FROM queue_ext.job_queue
    WHERE id = _fail.job_id AND status = 'running'
      AND (_fail.lease_token IS NULL
           OR (lease_token = _fail.lease_token AND lease_expires_at > now()))
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF j.cancel_requested IS NOT NULL THEN
        -- Cancelled while running: the failure ends it, no retry.
        PERFORM queue_ext._complete(j.id, jsonb_build_object('error', message), NULL);
        RETURN 'cancelled';
    END IF;
    PERFORM queue_ext._log_claim(j);
    failure := jsonb_build_object('attempt', j.attempt, 'error', message, 'at', now(), 'worker_id', j.worker_id);
    j.errors := j.errors || jsonb_build_array(failure);
    j.last_error := message;
    PERFORM queue_ext._count_at_commit(j.queue_name, 'failed', 1);

    IF coalesce(_fail.permanent, false) OR j.attempt >= j.max_attempts THEN
        DELETE FROM queue_ext.job_queue WHERE id = j.id;
        PERFORM queue_ext._bury(j,
            CASE WHEN _fail.permanent THEN 'permanent failure'
                 ELSE format('failed %s of %s attempts', j.attempt, j.max_attempts) END,
            message);
        RETURN 'dead';
    END IF;

    SELECT * INTO q FROM queue_ext.queues WHERE queue_name = j.queue_name;
    UPDATE queue_ext.job_queue
    SET status = 'retrying',
        run_at = now() + coalesce(_fail.retry_in,
                                  queue_ext._backoff(coalesce(q.backoff_base, interval '1 second'),
                                                     coalesce(q.backoff_cap, interval '1 hour'), j.attempt)),
        lease_token = NULL,
        lease_expires_at = NULL,
        last_error = j.last_error,
        errors = j.errors
    WHERE id = j.id;
    INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
    VALUES (j.id, j.queue_name, 'running', 'retrying', j.attempt, j.worker_id, message, j.enqueued_by);
    IF q.has_callback THEN
        PERFORM queue_ext._emit_callback(j, 'job.failed', NULL);
    END IF;
    RETURN 'retrying';
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
          -- A bound of the index scan: it stops at the first lease still running, instead of
          -- reading every entry (the dead ones of finished jobs too, until vacuum).
          AND t.lease_expires_at <= CASE WHEN only_worker IS NULL THEN now() ELSE 'infinity' END
          AND (only_worker IS NULL OR t.worker_id = only_worker)
          AND (queue_names IS NULL OR t.queue_name = ANY (queue_names))
        ORDER BY t.lease_expires_at
        FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM queue_ext._log_claim(j);
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
            INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
            VALUES (j.id, j.queue_name, 'running', 'queued', j.attempt, j.worker_id, reason, j.enqueued_by);
            PERFORM queue_ext._announce(j.queue_name);
        END IF;
        handled := handled + 1;
    END LOOP;
    RETURN handled;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._release_dependents(completed uuid) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    dependents uuid[];
    dep uuid;
    slot_key text;
    j queue_ext.job_queue;
BEGIN
    WITH gone AS (
        DELETE FROM queue_ext.job_dependencies AS e WHERE e.depends_on = completed RETURNING e.job_id
    )
    SELECT array_agg(job_id) INTO dependents FROM gone;
    IF dependents IS NULL THEN
        RETURN;
    END IF;
    FOREACH dep IN ARRAY dependents LOOP
        -- A job with a concurrency key needs a slot too: lock the key before the job, the
        -- order every slot change takes (limits.sql), then let the key admit it in turn.
        SELECT t.concurrency_key INTO slot_key FROM queue_ext.job_queue AS t WHERE t.id = dep;
        IF slot_key IS NOT NULL THEN
            PERFORM queue_ext._lock_key(slot_key);
        END IF;
        PERFORM 1 FROM queue_ext.job_queue AS t WHERE t.id = dep FOR UPDATE;
        CONTINUE WHEN EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.job_id = dep);
        IF slot_key IS NOT NULL THEN
            PERFORM queue_ext._admit_waiting(slot_key);
            CONTINUE;
        END IF;
        UPDATE queue_ext.job_queue AS t SET status = 'queued', run_at = greatest(t.run_at, now())
        WHERE t.id = dep AND t.status = 'waiting'
        RETURNING * INTO j;
        CONTINUE WHEN NOT FOUND;
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, enqueued_by)
        VALUES (j.id, j.queue_name, 'waiting', 'queued', j.attempt, j.enqueued_by);
        PERFORM queue_ext._announce(j.queue_name);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._cancel_dependents(failed uuid, reason text) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    dependents uuid[];
    dep uuid;
    j queue_ext.job_queue;
BEGIN
    WITH gone AS (
        DELETE FROM queue_ext.job_dependencies AS e WHERE e.depends_on = failed RETURNING e.job_id
    )
    SELECT array_agg(job_id) INTO dependents FROM gone;
    IF dependents IS NULL THEN
        RETURN;
    END IF;
    FOREACH dep IN ARRAY dependents LOOP
        DELETE FROM queue_ext.job_queue AS t WHERE t.id = dep AND t.status = 'waiting' RETURNING * INTO j;
        CONTINUE WHEN NOT FOUND;
        DELETE FROM queue_ext.job_dependencies AS e WHERE e.job_id = dep;
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            last_error, errors, enqueued_by, created_at, run_at, rate_limit_key, concurrency_key)
        VALUES (j.id, j.queue_name, j.payload, j.priority, 'cancelled', j.attempt, j.max_attempts,
            reason, j.errors, j.enqueued_by, j.created_at, j.run_at, j.rate_limit_key, j.concurrency_key);
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, error, enqueued_by)
        VALUES (j.id, j.queue_name, 'waiting', 'cancelled', j.attempt, reason, j.enqueued_by);
        PERFORM queue_ext._cancel_dependents(j.id, format('dependency %s was cancelled', j.id));
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._admit_waiting(key text) RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c queue_ext.concurrency_limits;
    admitted integer;
    queues text[];
BEGIN
    SELECT * INTO c FROM queue_ext.concurrency_limits AS l WHERE l.key = _admit_waiting.key;
    IF c.max_running IS NOT NULL AND c.active >= c.max_running THEN
        RETURN 0;
    END IF;
    WITH next AS (
        SELECT t.id FROM queue_ext.job_queue AS t
        WHERE t.concurrency_key = _admit_waiting.key AND t.status = 'waiting'
          AND NOT EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.job_id = t.id)
        ORDER BY t.id
        LIMIT c.max_running - c.active   -- NULL: no limit
        FOR UPDATE OF t
    ), admitted AS (
        UPDATE queue_ext.job_queue AS t SET status = 'queued', run_at = greatest(t.run_at, now())
        FROM next WHERE t.id = next.id
        RETURNING t.*
    ), history AS (
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, enqueued_by)
        SELECT id, queue_name, 'waiting', 'queued', attempt, enqueued_by FROM admitted
    )
    SELECT count(*), array_agg(DISTINCT a.queue_name) INTO admitted, queues FROM admitted AS a;
    IF admitted > 0 THEN
        UPDATE queue_ext.concurrency_limits AS l SET active = l.active + admitted WHERE l.key = _admit_waiting.key;
    END IF;
    PERFORM queue_ext._announce(n) FROM unnest(queues) AS n;
    RETURN admitted;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.cancel_job(job_id uuid, reason text DEFAULT 'cancelled')
RETURNS queue_ext.job_state
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    j queue_ext.job_queue;
    who text := queue_ext._invoker();
    why text := coalesce(cancel_job.reason, 'cancelled');
BEGIN
    SELECT * INTO j FROM queue_ext.job_queue AS t WHERE t.id = cancel_job.job_id FOR UPDATE;
    IF NOT FOUND OR (j.enqueued_by <> who AND NOT queue_ext._may_see_job(j.enqueued_by)) THEN
        PERFORM queue_ext._raise_not_running(cancel_job.job_id, NULL, 'cancel');
    END IF;
    IF j.status = 'running' THEN
        UPDATE queue_ext.job_queue SET cancel_requested = why WHERE id = j.id;
        IF (SELECT q.notify FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name) THEN
            PERFORM queue_ext._notify(j.id, j.queue_name, 'cancelling', j.attempt, j.progress);
        END IF;
        RETURN 'running';
    END IF;
    DELETE FROM queue_ext.job_queue WHERE id = j.id;
    DELETE FROM queue_ext.job_dependencies WHERE job_id = j.id;
    INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
        worker_id, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at, started_at,
        rate_limit_key, concurrency_key)
    VALUES (j.id, j.queue_name, j.payload, j.priority, 'cancelled', j.attempt, j.max_attempts,
        j.worker_id, why, j.errors, j.progress, j.progress_details, j.enqueued_by, j.created_at, j.run_at, j.started_at,
        j.rate_limit_key, j.concurrency_key);
    INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
    VALUES (j.id, j.queue_name, j.status, 'cancelled', j.attempt, j.worker_id, why, j.enqueued_by);
    PERFORM queue_ext._cancel_dependents(j.id, format('dependency %s was cancelled', j.id));
    RETURN 'cancelled';
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.retry_dead_job(job_id uuid) RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    d queue_ext.job_dead_letter;
    initial queue_ext.job_state := 'queued';
BEGIN
    DELETE FROM queue_ext.job_dead_letter WHERE id = retry_dead_job.job_id RETURNING * INTO d;
    IF NOT FOUND THEN
        IF retry_dead_job.job_id IS NULL THEN
            RAISE EXCEPTION 'job id must not be null' USING ERRCODE = '22004';
        END IF;
        IF EXISTS (SELECT 1 FROM queue_ext.job_queue WHERE id = retry_dead_job.job_id)
           OR EXISTS (SELECT 1 FROM queue_ext.job_archive WHERE id = retry_dead_job.job_id) THEN
            RAISE EXCEPTION 'job % is not in the dead letter queue', retry_dead_job.job_id USING ERRCODE = '55000';
        END IF;
        RAISE EXCEPTION 'job % does not exist', retry_dead_job.job_id USING ERRCODE = '42704';
    END IF;
    PERFORM queue_ext._queue(d.queue_name);  -- raises if the queue was dropped since
    PERFORM queue_ext._check_limit_keys(d.rate_limit_key, d.concurrency_key);
    IF d.concurrency_key IS NOT NULL AND NOT queue_ext._take_slot(d.concurrency_key) THEN
        initial := 'waiting';
    END IF;
    IF initial = 'queued' THEN
        PERFORM queue_ext._announce(d.queue_name);
    END IF;
    INSERT INTO queue_ext.job_queue (id, queue_name, payload, priority, status, run_at, attempt, max_attempts,
        last_error, errors, enqueued_by, created_at, rate_limit_key, concurrency_key)
    VALUES (d.id, d.queue_name, d.payload, d.priority, initial, now(), 0, d.max_attempts,
        d.last_error, d.errors, d.enqueued_by, d.created_at, d.rate_limit_key, d.concurrency_key);
    INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, enqueued_by, error)
    VALUES (d.id, d.queue_name, 'dead', initial, 0, d.enqueued_by, 'redriven from the dead letter queue');
    RETURN d.id;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.purge_dead_letter(older_than interval DEFAULT NULL, queue_name text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    purged bigint;
BEGIN
    PERFORM queue_ext._refuse_internal(purge_dead_letter.queue_name, 'purge');
    -- Bounded above too: now() minus a larger interval leaves the timestamp range (22008).
    PERFORM queue_ext._check_interval('older_than', purge_dead_letter.older_than, '0', '1000 years');
    WITH gone AS (
        DELETE FROM queue_ext.job_dead_letter
        WHERE (purge_dead_letter.older_than IS NULL OR died_at < now() - purge_dead_letter.older_than)
          AND (purge_dead_letter.queue_name IS NULL OR queue_name = purge_dead_letter.queue_name)
        RETURNING id
    ), history AS (
        DELETE FROM queue_ext.job_status_log AS h USING gone WHERE h.job_id = gone.id
    )
    SELECT count(*) INTO purged FROM gone;
    RETURN purged;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.purge_jobs(older_than interval, queue_name text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    purged bigint;
BEGIN
    PERFORM queue_ext._refuse_internal(purge_jobs.queue_name, 'purge');
    IF purge_jobs.older_than IS NULL THEN
        RAISE EXCEPTION 'older_than must not be null' USING ERRCODE = '22004';
    END IF;
    PERFORM queue_ext._check_interval('older_than', purge_jobs.older_than, '0', '1000 years');
    WITH gone AS (
        DELETE FROM queue_ext.job_archive
        WHERE finished_at < now() - purge_jobs.older_than
          AND (purge_jobs.queue_name IS NULL OR queue_name = purge_jobs.queue_name)
        RETURNING id
    ), history AS (
        DELETE FROM queue_ext.job_status_log AS h USING gone WHERE h.job_id = gone.id
    )
    SELECT count(*) INTO purged FROM gone;
    RETURN purged;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._dispatch_record(outcomes jsonb) RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    o jsonb;
    delivered jsonb;       -- job id -> its 'delivered' outcome
    delivered_ids uuid[];
    fast uuid[] := '{}';
    fast_queues text[];
    unlogged uuid[] := '{}';  -- delivered jobs of queues without history: no archive or log row
    logged queue_ext.job_queue[];  -- delivered jobs whose history rows are stored (_log_completions)
    applied uuid[] := '{}';
    ok boolean;
    response jsonb;
BEGIN
    -- The common case, set-based: successful deliveries of jobs with no cancel request in
    -- queues without callbacks are archived and logged by one statement each, instead of a
    -- function call per job (the dispatcher's throughput is bound here). The outcomes are
    -- looked up by job id in a JSON object, not joined: the planner cannot estimate a
    -- jsonb_array_elements() join and chose a nested loop over it, quadratic in the batch
    -- (measured: 154 ms for 250 outcomes, 0.6 ms a job).
    SELECT jsonb_object_agg(e ->> 'job_id', e), array_agg((e ->> 'job_id')::uuid)
    INTO delivered, delivered_ids
    FROM jsonb_array_elements(outcomes) AS e
    WHERE e ->> 'outcome' = 'delivered';
    IF delivered_ids IS NOT NULL THEN
        WITH done AS (
            DELETE FROM queue_ext.job_queue AS j
            WHERE j.id = ANY (delivered_ids) AND j.status = 'running'
              AND j.lease_token = (delivered -> j.id::text ->> 'lease_token')::uuid AND j.lease_expires_at > now()
              AND j.cancel_requested IS NULL
              AND NOT (SELECT q.has_callback FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name)
            RETURNING j.*, delivered -> j.id::text AS e,
                      (SELECT q.keep_history FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name) AS keep,
                      -- Stored rows only to be published, or for a claim that predates
                      -- claimed_at (_log_completions): the archive row records the rest.
                      CASE WHEN (SELECT q.keep_history AND (q.notify OR j.claimed_at IS NULL)
                                 FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name)
                           THEN j END AS logged_job
        ), archived AS (
            INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
                worker_id, result, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at, started_at,
                rate_limit_key, concurrency_key, claimed_at)
            SELECT id, queue_name, payload, priority, 'completed', attempt, max_attempts, worker_id,
                   jsonb_build_object('status', (e ->> 'status_code')::integer, 'headers', e -> 'response_headers',
                                      'body', e ->> 'response_body', 'duration_ms', (e ->> 'duration_ms')::float8),
                   last_error, errors, 100, progress_details, enqueued_by, created_at, run_at, started_at,
                   rate_limit_key, concurrency_key, claimed_at
            FROM done WHERE keep
        )
        SELECT coalesce(array_agg(id), '{}'), coalesce(array_agg(id) FILTER (WHERE NOT keep), '{}'),
               coalesce(array_agg(queue_name), '{}'),
               array_agg(logged_job) FILTER (WHERE logged_job IS DISTINCT FROM NULL)
        INTO fast, unlogged, fast_queues, logged FROM done;
        PERFORM queue_ext._log_completions(logged);
        PERFORM queue_ext._count_at_commit(u.q, 'completed', count(*)) FROM unnest(fast_queues) AS u(q) GROUP BY u.q;
        PERFORM queue_ext._release_dependents(d) FROM unnest(fast) AS d
        WHERE EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = d);
    END IF;

    -- Everything else, one at a time: failures, cancellations, callbacks, stale leases.
    FOR o IN SELECT value FROM jsonb_array_elements(outcomes)
             WHERE cardinality(fast) < jsonb_array_length(outcomes)
               AND NOT ((value ->> 'job_id')::uuid = ANY (fast)) LOOP
        IF o ->> 'outcome' = 'delivered' THEN
            response := jsonb_build_object('status', (o ->> 'status_code')::integer,
                                           'headers', o -> 'response_headers',
                                           'body', o ->> 'response_body',
                                           'duration_ms', (o ->> 'duration_ms')::float8);
            ok := queue_ext._complete((o ->> 'job_id')::uuid, response, (o ->> 'lease_token')::uuid) IS NOT NULL;
        ELSE
            ok := queue_ext._fail((o ->> 'job_id')::uuid, o ->> 'error', (o ->> 'lease_token')::uuid,
                                  o ->> 'outcome' = 'failed',
                                  make_interval(secs => (o ->> 'retry_after_ms')::float8 / 1000)) IS NOT NULL;
        END IF;
        IF ok THEN
            applied := applied || (o ->> 'job_id')::uuid;
        END IF;
    END LOOP;

    INSERT INTO queue_ext.webhook_deliveries (job_id, queue_name, attempt, url, outcome, status_code, error,
                                              duration_ms, response_headers, response_body)
    SELECT (e ->> 'job_id')::uuid, e ->> 'queue_name', (e ->> 'attempt')::integer, e ->> 'url',
           CASE WHEN (e ->> 'job_id')::uuid = ANY (fast || applied) THEN e ->> 'outcome' ELSE 'stale' END,
           (e ->> 'status_code')::integer, e ->> 'error', (e ->> 'duration_ms')::float8,
           e -> 'response_headers', e ->> 'response_body'
    FROM jsonb_array_elements(outcomes) AS e
    WHERE cardinality(unlogged) < jsonb_array_length(outcomes)
      AND (cardinality(unlogged) = 0 OR NOT ((e ->> 'job_id')::uuid = ANY (unlogged)));
    RETURN cardinality(fast) + cardinality(applied);
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.metrics() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER
-- The estimates of the correlated per-queue subqueries run into the millions, which makes
-- the planner JIT-compile a query that then runs in milliseconds (JIT alone took ~2 s).
SET jit = off
SET search_path = pg_catalog, pg_temp
AS $$
    WITH
    -- Histogram bounds in seconds (le); +Inf is the count.
    job_bounds(b) AS (VALUES (ARRAY[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                                   300, 900, 3600]::double precision[])),
    http_bounds(b) AS (VALUES (ARRAY[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                    30]::double precision[])),
    since(t) AS (VALUES (now() - interval '5 minutes')),
    queues AS (SELECT q.queue_name, q.paused FROM queue_ext.queues AS q),
    -- The one read that grows with the backlog: a pass over the live jobs (~0.3 s per
    -- million on a small machine).
    live AS (
        SELECT j.queue_name, j.status, count(*) AS n FROM queue_ext.job_queue AS j GROUP BY 1, 2
    ),
    dead AS (SELECT d.queue_name, count(*) AS n FROM queue_ext.job_dead_letter AS d GROUP BY 1),
    states(state) AS (VALUES ('waiting'), ('queued'), ('retrying'), ('running')),
    jobs AS (
        SELECT q.queue_name, s.state, coalesce(l.n, 0) AS n
        FROM queues AS q CROSS JOIN states AS s
        LEFT JOIN live AS l ON l.queue_name = q.queue_name AND l.status::text = s.state
        UNION ALL
        SELECT q.queue_name, 'dead', coalesce(d.n, 0) FROM queues AS q LEFT JOIN dead AS d USING (queue_name)
    ),
    -- The earliest run_at among runnable jobs, read from the head of the claim indexes (one
    -- probe per priority); the job waits only if that moment has passed. Rate-limited jobs
    -- are read from their own index, all of the queue's.
    oldest AS (
        SELECT q.queue_name,
               greatest(extract(epoch FROM now() - least(
                   (SELECT min(head.run_at) FROM unnest(enum_range(NULL::queue_ext.job_priority)) AS p(priority),
                        LATERAL (SELECT j.run_at FROM queue_ext.job_queue AS j
                                 WHERE j.queue_name = q.queue_name AND j.priority = p.priority
                                   AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL
                                 ORDER BY j.run_at LIMIT 1) AS head),
                   (SELECT min(j.run_at) FROM queue_ext.job_queue AS j
                    WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying')
                      AND j.rate_limit_key IS NOT NULL))), 0) AS age
        FROM queues AS q
    ),
    finished AS (
        SELECT a.queue_name, a.status, a.started_at, a.run_at, a.finished_at
        FROM queue_ext.job_archive AS a, since
        WHERE a.finished_at > since.t
    ),
    died AS (
        SELECT d.queue_name, count(*) AS n FROM queue_ext.job_dead_letter AS d, since
        WHERE d.died_at > since.t GROUP BY 1
    ),
    -- Failed attempts: every transition out of running into retrying or dead
    -- (job_status_log_failures_idx holds exactly these).
    failures AS (
        SELECT h.queue_name, count(*) AS n
        FROM queue_ext.job_status_log AS h, since
        WHERE h.at > since.t AND h.from_status = 'running' AND h.to_status IN ('retrying', 'dead')
        GROUP BY 1
    ),
    throughput AS (
        SELECT q.queue_name,
               (SELECT count(*) FROM finished AS f WHERE f.queue_name = q.queue_name AND f.status = 'completed') AS completed,
               coalesce((SELECT n FROM failures AS f WHERE f.queue_name = q.queue_name), 0) AS failed,
               coalesce((SELECT n FROM died AS d WHERE d.queue_name = q.queue_name), 0) AS dead
        FROM queues AS q
    ),
    samples AS (
        SELECT 'queue_ext_job_wait_seconds' AS metric, f.queue_name AS label,
               extract(epoch FROM f.started_at - f.run_at)::double precision AS v
        FROM finished AS f WHERE f.started_at IS NOT NULL
        UNION ALL
        SELECT 'queue_ext_job_run_seconds', f.queue_name, extract(epoch FROM f.finished_at - f.started_at)::double precision
        FROM finished AS f WHERE f.status = 'completed' AND f.started_at IS NOT NULL
    ),
    deliveries AS (
        SELECT w.queue_name, w.outcome, w.duration_ms / 1000.0 AS v
        FROM queue_ext.webhook_deliveries AS w, since
        WHERE w.delivered_at > since.t
    ),
    -- One pass per histogram: each sample lands in bucket i = how many bounds are <= it;
    -- bucket k's cumulative count is then the samples with i < k.
    job_hist AS (
        SELECT s.metric, s.label, width_bucket(s.v, jb.b) AS i, count(*) AS n, sum(s.v) AS total
        FROM samples AS s, job_bounds AS jb GROUP BY 1, 2, 3
    ),
    http_hist AS (
        SELECT d.queue_name AS label, width_bucket(d.v, hb.b) AS i, count(*) AS n, sum(d.v) AS total
        FROM deliveries AS d, http_bounds AS hb WHERE d.v IS NOT NULL GROUP BY 1, 2
    ),
    hist_lines(metric, label, lines) AS (
        SELECT m.metric, q.queue_name,
               (SELECT string_agg(format('%s_bucket{queue=%s,le="%s"} %s', m.metric, queue_ext._metric_label(q.queue_name),
                                         k.le, coalesce((SELECT sum(h.n) FROM job_hist AS h
                                                         WHERE h.metric = m.metric AND h.label = q.queue_name AND h.i < k.ord), 0)),
                                  E'\n' ORDER BY k.ord)
                FROM job_bounds AS jb, unnest(jb.b) WITH ORDINALITY AS k(le, ord))
               || format(E'\n%1$s_bucket{queue=%2$s,le="+Inf"} %3$s\n%1$s_sum{queue=%2$s} %4$s\n%1$s_count{queue=%2$s} %3$s',
                         m.metric, queue_ext._metric_label(q.queue_name),
                         coalesce((SELECT sum(h.n) FROM job_hist AS h WHERE h.metric = m.metric AND h.label = q.queue_name), 0),
                         coalesce((SELECT sum(h.total) FROM job_hist AS h WHERE h.metric = m.metric AND h.label = q.queue_name), 0))
        FROM (VALUES ('queue_ext_job_wait_seconds'), ('queue_ext_job_run_seconds')) AS m(metric), queues AS q
    ),
    http_lines(label, lines) AS (
        SELECT q.queue_name,
               (SELECT string_agg(format('queue_ext_webhook_delivery_seconds_bucket{queue=%s,le="%s"} %s',
                                         queue_ext._metric_label(q.queue_name), k.le,
                                         coalesce((SELECT sum(h.n) FROM http_hist AS h WHERE h.label = q.queue_name AND h.i < k.ord), 0)),
                                  E'\n' ORDER BY k.ord)
                FROM http_bounds AS hb, unnest(hb.b) WITH ORDINALITY AS k(le, ord))
               || format(E'\nqueue_ext_webhook_delivery_seconds_bucket{queue=%1$s,le="+Inf"} %2$s'
                         || E'\nqueue_ext_webhook_delivery_seconds_sum{queue=%1$s} %3$s'
                         || E'\nqueue_ext_webhook_delivery_seconds_count{queue=%1$s} %2$s',
                         queue_ext._metric_label(q.queue_name),
                         coalesce((SELECT sum(h.n) FROM http_hist AS h WHERE h.label = q.queue_name), 0),
                         coalesce((SELECT sum(h.total) FROM http_hist AS h WHERE h.label = q.queue_name), 0))
        FROM queues AS q WHERE q.queue_name IN (SELECT d.queue_name FROM deliveries AS d)
    ),
    outcomes(outcome) AS (VALUES ('delivered'), ('retry'), ('failed'), ('stale')),
    dispatchers AS (SELECT s.database, s.running, s.delivered, s.retried, s.failed FROM queue_ext.dispatcher_status() AS s),
    totals AS (SELECT c.* FROM queue_ext._job_counters(ARRAY(SELECT q.queue_name FROM queues AS q)) AS c),
    families(ord, header, body) AS (
        SELECT 1, E'# HELP queue_ext_jobs Jobs by queue and state now: live jobs (waiting, queued, retrying, running) and dead letters kept.\n# TYPE queue_ext_jobs gauge',
               (SELECT string_agg(format('queue_ext_jobs{queue=%s,state="%s"} %s', queue_ext._metric_label(j.queue_name), j.state, j.n),
                                  E'\n' ORDER BY j.queue_name, j.state) FROM jobs AS j)
        UNION ALL
        SELECT 2, E'# HELP queue_ext_queue_paused 1 when the queue is paused.\n# TYPE queue_ext_queue_paused gauge',
               (SELECT string_agg(format('queue_ext_queue_paused{queue=%s} %s', queue_ext._metric_label(q.queue_name), q.paused::int),
                                  E'\n' ORDER BY q.queue_name) FROM queues AS q)
        UNION ALL
        SELECT 3, E'# HELP queue_ext_oldest_queued_job_age_seconds How long the oldest runnable (queued or retrying, due) job has waited; 0 when none.\n# TYPE queue_ext_oldest_queued_job_age_seconds gauge',
               (SELECT string_agg(format('queue_ext_oldest_queued_job_age_seconds{queue=%s} %s', queue_ext._metric_label(o.queue_name),
                                         round(o.age::numeric, 3)), E'\n' ORDER BY o.queue_name) FROM oldest AS o)
        UNION ALL
        SELECT 4, E'# HELP queue_ext_jobs_completed_last_5m Jobs completed in the last 5 minutes (from job_archive: queues with keep_history => false are not counted).\n# TYPE queue_ext_jobs_completed_last_5m gauge',
               (SELECT string_agg(format('queue_ext_jobs_completed_last_5m{queue=%s} %s', queue_ext._metric_label(t.queue_name), t.completed),
                                  E'\n' ORDER BY t.queue_name) FROM throughput AS t)
        UNION ALL
        SELECT 5, E'# HELP queue_ext_jobs_failed_last_5m Failed attempts (running to retrying or dead) in the last 5 minutes.\n# TYPE queue_ext_jobs_failed_last_5m gauge',
               (SELECT string_agg(format('queue_ext_jobs_failed_last_5m{queue=%s} %s', queue_ext._metric_label(t.queue_name), t.failed),
                                  E'\n' ORDER BY t.queue_name) FROM throughput AS t)
        UNION ALL
        SELECT 6, E'# HELP queue_ext_jobs_dead_last_5m Jobs moved to the dead letter queue in the last 5 minutes (still there).\n# TYPE queue_ext_jobs_dead_last_5m gauge',
               (SELECT string_agg(format('queue_ext_jobs_dead_last_5m{queue=%s} %s', queue_ext._metric_label(t.queue_name), t.dead),
                                  E'\n' ORDER BY t.queue_name) FROM throughput AS t)
        UNION ALL
        SELECT 7, E'# HELP queue_ext_job_wait_seconds Time from run_at to claim, of jobs finished in the last 5 minutes (a window, not a running total).\n# TYPE queue_ext_job_wait_seconds histogram',
               (SELECT string_agg(h.lines, E'\n' ORDER BY h.label) FROM hist_lines AS h WHERE h.metric = 'queue_ext_job_wait_seconds')
        UNION ALL
        SELECT 8, E'# HELP queue_ext_job_run_seconds Time from claim to completion, of jobs completed in the last 5 minutes (a window, not a running total).\n# TYPE queue_ext_job_run_seconds histogram',
               (SELECT string_agg(h.lines, E'\n' ORDER BY h.label) FROM hist_lines AS h WHERE h.metric = 'queue_ext_job_run_seconds')
        UNION ALL
        SELECT 9, E'# HELP queue_ext_webhook_deliveries_last_5m Webhook delivery attempts in the last 5 minutes, by outcome.\n# TYPE queue_ext_webhook_deliveries_last_5m gauge',
               (SELECT string_agg(format('queue_ext_webhook_deliveries_last_5m{queue=%s,outcome="%s"} %s',
                                         queue_ext._metric_label(q.queue_name), o.outcome,
                                         (SELECT count(*) FROM deliveries AS d WHERE d.queue_name = q.queue_name AND d.outcome = o.outcome)),
                                  E'\n' ORDER BY q.queue_name, o.outcome)
                FROM queues AS q CROSS JOIN outcomes AS o
                WHERE q.queue_name IN (SELECT d.queue_name FROM deliveries AS d))
        UNION ALL
        SELECT 10, E'# HELP queue_ext_webhook_delivery_seconds Duration of webhook delivery attempts in the last 5 minutes (a window).\n# TYPE queue_ext_webhook_delivery_seconds histogram',
               (SELECT string_agg(h.lines, E'\n' ORDER BY h.label) FROM http_lines AS h)
        UNION ALL
        SELECT 11, E'# HELP queue_ext_dispatcher_up 1 when the dispatcher of the database is running.\n# TYPE queue_ext_dispatcher_up gauge',
               (SELECT string_agg(format('queue_ext_dispatcher_up{database=%s} %s', queue_ext._metric_label(d.database), d.running::int),
                                  E'\n' ORDER BY d.database) FROM dispatchers AS d)
        UNION ALL
        SELECT 13, E'# HELP queue_ext_jobs_completed_total Jobs completed since the server started (resets on restart; needs shared_preload_libraries).\n# TYPE queue_ext_jobs_completed_total counter',
               (SELECT string_agg(format('queue_ext_jobs_completed_total{queue=%s} %s', queue_ext._metric_label(t.queue_name), t.completed),
                                  E'\n' ORDER BY t.queue_name) FROM totals AS t)
        UNION ALL
        SELECT 14, E'# HELP queue_ext_jobs_failed_total Failed attempts (to a retry or to the dead letter queue, lost leases included) since the server started.\n# TYPE queue_ext_jobs_failed_total counter',
               (SELECT string_agg(format('queue_ext_jobs_failed_total{queue=%s} %s', queue_ext._metric_label(t.queue_name), t.failed),
                                  E'\n' ORDER BY t.queue_name) FROM totals AS t)
        UNION ALL
        SELECT 15, E'# HELP queue_ext_jobs_dead_total Jobs moved to the dead letter queue since the server started.\n# TYPE queue_ext_jobs_dead_total counter',
               (SELECT string_agg(format('queue_ext_jobs_dead_total{queue=%s} %s', queue_ext._metric_label(t.queue_name), t.dead),
                                  E'\n' ORDER BY t.queue_name) FROM totals AS t)
        UNION ALL
        SELECT 12, E'# HELP queue_ext_dispatcher_deliveries_total Webhook jobs the dispatcher finished since it started, by outcome.\n# TYPE queue_ext_dispatcher_deliveries_total counter',
               (SELECT string_agg(format('queue_ext_dispatcher_deliveries_total{database=%s,outcome="%s"} %s',
                                         queue_ext._metric_label(d.database), o.outcome, o.n),
                                  E'\n' ORDER BY d.database, o.outcome)
                FROM dispatchers AS d,
                     LATERAL (VALUES ('delivered', d.delivered), ('retried', d.retried), ('failed', d.failed)) AS o(outcome, n))
    )
    SELECT string_agg(f.header || coalesce(E'\n' || f.body, ''), E'\n' ORDER BY f.ord) || E'\n'
    FROM families AS f
$$;

-- New functions are created executable by PUBLIC: take that away, as grants.sql does.
REVOKE ALL ON FUNCTION
    queue_ext._log_claim(queue_ext.job_queue),
    queue_ext._log_completions(queue_ext.job_queue[])
FROM PUBLIC;
