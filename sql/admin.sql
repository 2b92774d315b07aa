-- Reading job state, the dead letter queue, retention and stats.

-- One job, wherever it is in its lifecycle. A producer sees only the jobs it enqueued
-- (_may_see_job): about anyone else's, or an id that does not exist, it gets the same 42501
-- and learns nothing. Workers and admins see every job (42704 when there is none).
CREATE FUNCTION queue_ext.job_status(job_id uuid)
RETURNS TABLE (
    id           uuid,
    queue_name   text,
    status       queue_ext.job_state,
    priority     queue_ext.job_priority,
    attempt      integer,
    max_attempts integer,
    result       jsonb,
    last_error   text,
    errors       jsonb,
    progress     real,
    progress_details jsonb,
    worker_id    text,
    enqueued_by  name,
    enqueued_at  timestamptz,
    run_at       timestamptz,
    started_at   timestamptz,
    finished_at  timestamptz
)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF job_status.job_id IS NULL THEN
        RAISE EXCEPTION 'job id must not be null' USING ERRCODE = '22004';
    END IF;
    -- SECURITY DEFINER reads every row; the visibility rule is applied here instead.
    RETURN QUERY
    SELECT j.id, j.queue_name, j.status, j.priority, j.attempt, j.max_attempts, NULL::jsonb, j.last_error,
           j.errors, j.progress, j.progress_details, j.worker_id, j.enqueued_by::name, j.created_at, j.run_at, j.started_at, NULL::timestamptz
    FROM queue_ext.job_queue AS j WHERE j.id = job_status.job_id AND queue_ext._may_see_job(j.enqueued_by)
    UNION ALL
    SELECT a.id, a.queue_name, a.status, a.priority, a.attempt, a.max_attempts, a.result, a.last_error,
           a.errors, a.progress, a.progress_details, a.worker_id, a.enqueued_by::name, a.created_at, a.run_at, a.started_at, a.finished_at
    FROM queue_ext.job_archive AS a WHERE a.id = job_status.job_id AND queue_ext._may_see_job(a.enqueued_by)
    UNION ALL
    SELECT d.id, d.queue_name, 'dead'::queue_ext.job_state, d.priority, d.attempt, d.max_attempts, NULL, d.last_error,
           d.errors, NULL, NULL, d.worker_id, d.enqueued_by::name, d.created_at, NULL, d.started_at, d.died_at
    FROM queue_ext.job_dead_letter AS d WHERE d.id = job_status.job_id AND queue_ext._may_see_job(d.enqueued_by)
    LIMIT 1;
    IF NOT FOUND THEN
        IF NOT queue_ext._may_see_job(NULL) THEN
            PERFORM queue_ext._raise_hidden_job(job_status.job_id);
        END IF;
        RAISE EXCEPTION 'job % does not exist', job_status.job_id USING ERRCODE = '42704';
    END IF;
END
$$;

-- Redrive: puts a dead job back in its queue with fresh attempts. Its error history stays.
-- Allowed for a dead callback (queue_ext.callbacks) too: its payload was written by the
-- extension and is redriven unchanged, so this forges nothing, and it is how an admin
-- resends an event whose receiver was down for longer than its attempts lasted.
CREATE FUNCTION queue_ext.retry_dead_job(job_id uuid) RETURNS uuid
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

-- Deletes dead letters: those older than older_than (all when NULL), optionally of one queue.
CREATE FUNCTION queue_ext.purge_dead_letter(older_than interval DEFAULT NULL, queue_name text DEFAULT NULL)
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

-- Retention for finished jobs: deletes archived (completed or cancelled) jobs that finished
-- more than older_than ago, with their history, oldest first: at most max_rows of them (all
-- when NULL). Run it from pg_cron; a busy installation runs purge_jobs_in_batches instead.
CREATE FUNCTION queue_ext.purge_jobs(older_than interval, queue_name text DEFAULT NULL, max_rows integer DEFAULT NULL)
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
    IF purge_jobs.max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows must be at least 1 (got %)', purge_jobs.max_rows USING ERRCODE = '22023';
    END IF;
    IF purge_jobs.max_rows IS NULL THEN
        WITH gone AS (
            DELETE FROM queue_ext.job_archive AS a
            WHERE a.finished_at < now() - purge_jobs.older_than
              AND (purge_jobs.queue_name IS NULL OR a.queue_name = purge_jobs.queue_name)
            RETURNING a.id
        ), history AS (
            DELETE FROM queue_ext.job_status_log AS h USING gone WHERE h.job_id = gone.id
        )
        SELECT count(*) INTO purged FROM gone;
    ELSE
        -- By the rows' addresses, a TID scan: a batch of 10,000 takes ~15 ms so, 129 ms by id.
        -- (A join on ctid let the planner hash the whole table instead.) A row changed
        -- meanwhile has moved and is left for the next purge.
        WITH gone AS (
            DELETE FROM queue_ext.job_archive AS j
            WHERE j.ctid = ANY (ARRAY(SELECT a.ctid FROM queue_ext.job_archive AS a
                                      WHERE a.finished_at < now() - purge_jobs.older_than
                                        AND (purge_jobs.queue_name IS NULL OR a.queue_name = purge_jobs.queue_name)
                                      ORDER BY a.finished_at
                                      LIMIT purge_jobs.max_rows))
            RETURNING j.id
        ), history AS (
            DELETE FROM queue_ext.job_status_log AS h USING gone WHERE h.job_id = gone.id
        )
        SELECT count(*) INTO purged FROM gone;
    END IF;
    RETURN purged;
END
$$;

-- purge_jobs in transactions of batch_size jobs, each committed before the next begins. One
-- purge of a large backlog holds back the cleanup horizon for as long as it runs, and every
-- claim meanwhile walks the dead rows vacuum may not remove; batches let vacuum follow. CALL
-- it outside a transaction block (pg_cron does); purged says how many jobs went. Neither a
-- SET clause nor SECURITY DEFINER: either would forbid the COMMIT. So every name is
-- qualified, and the caller needs purge_jobs's privileges (admin).
CREATE PROCEDURE queue_ext.purge_jobs_in_batches(older_than interval, queue_name text DEFAULT NULL,
                                                 batch_size integer DEFAULT 10000, INOUT purged bigint DEFAULT 0)
LANGUAGE plpgsql
AS $$
DECLARE
    n bigint;
BEGIN
    IF batch_size IS NULL OR batch_size OPERATOR(pg_catalog.<) 1 THEN
        RAISE EXCEPTION 'batch_size must be at least 1 (got %)', coalesce(batch_size::pg_catalog.text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    purged := 0;
    LOOP
        n := queue_ext.purge_jobs(older_than, queue_name, batch_size);
        purged := purged OPERATOR(pg_catalog.+) n;
        COMMIT;
        EXIT WHEN n OPERATOR(pg_catalog.<) batch_size;
    END LOOP;
END
$$;
