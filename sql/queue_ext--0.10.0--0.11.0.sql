-- queue_ext 0.10.0 -> 0.11.0: wait_for_jobs, and a cheaper single enqueue.
--   * CALL queue_ext.wait_for_jobs(queues, timeout): an idle worker waits in its own
--     connection until a commit makes jobs of its queues runnable (woken by the committing
--     backend; no LISTEN, no snapshot held while waiting). Needs the 0.11.0 library.
--   * enqueue_job looks its queue up in its own statement and checks the options a call did
--     not give with one condition, instead of a helper function call and a check each (each
--     PL/pgSQL expression is set up again in every transaction, and a single enqueue is often
--     a transaction of its own).
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.11.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.11.0'" to load this file. \quit

-- Enqueues one job and returns its id. dedupe_key: at most one unfinished job per queue,
-- producer (the enqueuing role) and key. An enqueue whose key matches a live job of the
-- same role returns that job's id and enqueues nothing; keys are scoped to the role, so two
-- producers using the same key each get their own job, and neither can receive, or learn
-- of, the other's. Queues named queue_ext.* are internal: enqueueing there raises 42501.
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
    q queue_ext.queues;
    new_id uuid := queue_ext.uuid_generate_v7();
    who text := queue_ext._invoker();
    start timestamptz;  -- NULL: now()
    prio queue_ext.job_priority;  -- NULL: normal
    existing uuid;
    initial queue_ext.job_state := 'queued';
    blocked_by uuid;
    took_slot boolean := false;
BEGIN
    -- Each PL/pgSQL expression costs microseconds of setup in every transaction, and an
    -- enqueue is often a transaction of its own: the usual call (a queue, a payload, nothing
    -- else) evaluates one condition for all the options instead of a check and a helper call
    -- each. The checks run in the same order either way, so an error names the same problem.
    SELECT * INTO q FROM queue_ext.queues AS t WHERE t.queue_name = enqueue_job.queue_name;
    IF NOT FOUND THEN
        q := queue_ext._queue(enqueue_job.queue_name);  -- raises: no such queue
    END IF;
    IF num_nonnulls(enqueue_job.run_at, enqueue_job.delay) > 0 OR q.queue_name LIKE 'queue\_ext.%' THEN
        start := queue_ext._start_time(enqueue_job.run_at, enqueue_job.delay);
        IF q.queue_name LIKE 'queue\_ext.%' THEN
            PERFORM queue_ext._refuse_internal(q.queue_name, 'enqueue into');
        END IF;
    END IF;
    IF enqueue_job.payload IS NULL OR jsonb_typeof(enqueue_job.payload) <> 'object'
       OR pg_column_size(enqueue_job.payload) > queue_ext.max_payload_bytes() THEN
        PERFORM queue_ext._check_payload(enqueue_job.payload);
    END IF;
    IF num_nonnulls(enqueue_job.max_attempts, enqueue_job.rate_limit_key, enqueue_job.concurrency_key,
                    enqueue_job.dedupe_key) > 0 OR enqueue_job.priority IS DISTINCT FROM 'normal' THEN
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
        prio := queue_ext._priority(enqueue_job.priority);
    END IF;
    IF enqueue_job.depends_on IS NOT NULL AND cardinality(enqueue_job.depends_on) > 0 THEN
        SELECT w.state, w.blocked_by INTO initial, blocked_by
        FROM queue_ext._dependency_state(new_id, enqueue_job.depends_on) AS w;
        IF initial = 'cancelled' THEN
            -- A dependency is already dead or cancelled: this job can never run.
            INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
                last_error, enqueued_by, created_at, run_at, rate_limit_key, concurrency_key)
            VALUES (new_id, q.queue_name, enqueue_job.payload, coalesce(prio, 'normal'), 'cancelled',
                0, coalesce(enqueue_job.max_attempts, q.max_attempts),
                format('dependency %s is dead or cancelled', blocked_by), who, now(), coalesce(start, now()),
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
        VALUES (new_id, q.queue_name, enqueue_job.payload, coalesce(prio, 'normal'), initial, coalesce(start, now()),
                coalesce(enqueue_job.max_attempts, q.max_attempts), who,
                enqueue_job.rate_limit_key, enqueue_job.concurrency_key);
    ELSE
        -- Race-free: a concurrent enqueue with the same key makes us wait for its commit,
        -- then we see its job instead of inserting our own.
        LOOP
            INSERT INTO queue_ext.job_queue (id, queue_name, payload, priority, status, run_at, max_attempts,
                                             enqueued_by, dedupe_key, rate_limit_key, concurrency_key)
            VALUES (new_id, q.queue_name, enqueue_job.payload, coalesce(prio, 'normal'), initial,
                    coalesce(start, now()), coalesce(enqueue_job.max_attempts, q.max_attempts), who, enqueue_job.dedupe_key,
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
    IF initial <> 'queued' OR coalesce(start > now(), false) THEN
        NULL;
    ELSIF q.is_webhook THEN
        PERFORM queue_ext._wake_dispatcher_at_commit();
    ELSIF NOT queue_ext._announce_at_commit(q.queue_name) THEN
        PERFORM pg_notify('queue_ext_jobs', q.queue_name);
    END IF;
    RETURN new_id;
END
$$;

-- Worker wake-ups without LISTEN: waits inside this connection until a commit makes jobs of
-- queue_names runnable (NULL: every queue get_next_jobs(NULL, ...) claims from), or until
-- timeout. woken is true when the worker should claim now (jobs were already runnable, or a
-- commit woke it; a wake-up meant for another queue sharing its bucket costs one empty
-- claim), false when the timeout passed. Jobs that become due later (run_at, a retry's
-- backoff, a rate limit's next token) are looked for every queue_ext.poll_interval.
-- It commits the CALL's transaction before it waits, so an idle worker holds no snapshot
-- and no transaction id (vacuum is never held back by it): CALL it outside a transaction
-- block (SQLSTATE 25001 otherwise). It needs no LISTEN connection, which a pooler in
-- transaction mode cannot keep. Needs shared_preload_libraries; without it the wait polls every 50 ms.
CREATE PROCEDURE queue_ext.wait_for_jobs(queue_names text[] DEFAULT NULL,
                                         timeout interval DEFAULT '30 seconds',
                                         INOUT woken boolean DEFAULT NULL)
LANGUAGE c
AS 'MODULE_PATHNAME', 'queue_ext_wait_for_jobs';
REVOKE ALL ON PROCEDURE queue_ext.wait_for_jobs(text[], interval, boolean) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE queue_ext.wait_for_jobs(text[], interval, boolean) TO queue_ext_worker;
