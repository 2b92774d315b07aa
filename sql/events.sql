-- Live events: every state change of a job is published with NOTIFY on the channel
-- queue_ext_events, as a small JSON object any client can LISTEN for:
--   {"id": ..., "queue": ..., "status": ..., "attempt": ..., "progress": ...}
-- Postgres lets any role LISTEN on any channel, so an event says only that a job moved:
-- no error text (a subscriber reads that with job_status(), which checks who may see it).
-- Status changes come from one place, the audit trail: a statement-level trigger on
-- job_status_log publishes each inserted row of a queue whose `notify` is on, so no
-- transition can be missed (such queues store their routine claim and completion rows,
-- which other queues derive from the job's row). The enqueue, recorded on the job rather
-- than in the history, publishes its own event (enqueue_job, enqueue_jobs). NOTIFY is
-- transactional: a rolled-back change publishes nothing.

CREATE FUNCTION queue_ext._notify(job_id uuid, queue_name text, status text, attempt integer,
                                  progress real) RETURNS void
LANGUAGE sql VOLATILE
AS $$
    SELECT pg_notify('queue_ext_events', json_build_object(
        'id', job_id, 'queue', queue_name, 'status', status, 'attempt', attempt,
        'progress', progress)::text)
$$;

-- jit = off: the trigger fires inside functions that turn enable_seqscan off, whose disabled
-- paths' cost can lift this query's plan over jit_above_cost; it was then JIT-compiled on
-- every firing (measured: a batched drain's CPU per job up to ten times higher).
CREATE FUNCTION queue_ext._publish_transitions() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
BEGIN
    PERFORM queue_ext._notify(t.job_id, t.queue_name, t.to_status::text, t.attempt, NULL)
    FROM transitions AS t
    JOIN queue_ext.queues AS q ON q.queue_name = t.queue_name
    WHERE q.notify;
    RETURN NULL;
END
$$;

CREATE TRIGGER publish_transitions
    AFTER INSERT ON queue_ext.job_status_log
    REFERENCING NEW TABLE AS transitions
    FOR EACH STATEMENT EXECUTE FUNCTION queue_ext._publish_transitions();

-- Worker wake-ups without LISTEN: waits inside this connection until a commit makes jobs of
-- queue_names runnable (NULL: every queue get_next_jobs(NULL, ...) claims from), or until
-- timeout. woken is true when the worker should claim now (jobs were already runnable, or a
-- commit woke it; a wake-up meant for another queue sharing its bucket costs one empty
-- claim), false when the timeout passed. Jobs that become due later (run_at, a retry's
-- backoff, a rate limit's next token) are looked for every queue_ext.poll_interval.
-- It commits the CALL's transaction before it waits, so an idle worker holds no snapshot
-- and no transaction id (vacuum is never held back by it), and returns in a transaction begun
-- after the wait (a claim after it in the same procedure sees jobs enqueued meanwhile as due):
-- CALL it outside a transaction block (SQLSTATE 25001 otherwise). It needs no LISTEN connection, which a pooler in
-- transaction mode cannot keep. Needs shared_preload_libraries; without it the wait polls every 50 ms.
CREATE PROCEDURE queue_ext.wait_for_jobs(queue_names text[] DEFAULT NULL,
                                         timeout interval DEFAULT '30 seconds',
                                         INOUT woken boolean DEFAULT NULL)
LANGUAGE c
AS 'MODULE_PATHNAME', 'queue_ext_wait_for_jobs';

-- An idle worker's one call: waits like wait_for_jobs (holding no snapshot, woken by the
-- producer's commit) and claims like get_next_job, in the same call, so that a job enqueued
-- while the worker waits reaches it without a second round trip. Returns the claimed job's
-- columns (get_next_job's), all NULL when the timeout passed with nothing claimed. The claim
-- commits with the CALL. CALL it outside a transaction block (SQLSTATE 25001 otherwise).
-- Transaction control rules out SECURITY DEFINER and SET clauses: it runs with the caller's
-- rights (queue_ext_worker's get_next_job and wait_for_jobs), every name qualified.
CREATE PROCEDURE queue_ext.wait_for_next_job(queue_names      text[]   DEFAULT NULL,
                                             timeout          interval DEFAULT '30 seconds',
                                             worker_id        text     DEFAULT NULL,
                                             lease            interval DEFAULT NULL,
                                             INOUT job_id           uuid                   DEFAULT NULL,
                                             INOUT queue_name       text                   DEFAULT NULL,
                                             INOUT payload          jsonb                  DEFAULT NULL,
                                             INOUT priority         queue_ext.job_priority DEFAULT NULL,
                                             INOUT attempt          integer                DEFAULT NULL,
                                             INOUT max_attempts     integer                DEFAULT NULL,
                                             INOUT lease_token      uuid                   DEFAULT NULL,
                                             INOUT lease_expires_at timestamptz            DEFAULT NULL,
                                             INOUT enqueued_at      timestamptz            DEFAULT NULL)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    deadline timestamptz;
    woken boolean;
BEGIN
    IF timeout IS NULL OR timeout OPERATOR(pg_catalog.<) interval '0'
       OR timeout OPERATOR(pg_catalog.>) interval '1 hour' THEN
        RAISE EXCEPTION 'timeout must be between 0 and 1 hour (got %)', coalesce(timeout::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    deadline := pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) timeout;
    LOOP
        job_id := NULL;
        -- Returns at once when a job is runnable already; commits before it sleeps.
        CALL queue_ext.wait_for_jobs(queue_names,
                                     greatest(deadline OPERATOR(pg_catalog.-) pg_catalog.clock_timestamp(), interval '0'),
                                     woken);
        IF woken THEN
            -- (An array of one name is that queue's own claim: get_next_jobs(text[], ...).)
            SELECT c.job_id, c.queue_name, c.payload, c.priority, c.attempt, c.max_attempts, c.lease_token,
                   c.lease_expires_at, c.enqueued_at
            INTO job_id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at,
                 enqueued_at
            FROM queue_ext.get_next_job(queue_names, worker_id, lease) AS c;
        END IF;
        -- Another worker may have claimed first: then wait again, for what is left.
        EXIT WHEN job_id IS NOT NULL;
        EXIT WHEN pg_catalog.clock_timestamp() OPERATOR(pg_catalog.>=) deadline;
    END LOOP;
    IF job_id IS NULL THEN
        queue_name := NULL; payload := NULL; priority := NULL; attempt := NULL; max_attempts := NULL;
        lease_token := NULL; lease_expires_at := NULL; enqueued_at := NULL;
    END IF;
END
$$;
