-- Talking to a running job: heartbeat, progress, cancellation. Heartbeat and progress are
-- fenced like complete_job, and both tell the worker whether to carry on.

-- Extends the lease of a running job (by `extend`, default the queue's lease_duration) and
-- returns true to carry on, or false when cancel_job() was called: stop, and report with
-- complete_job/fail_job, which will record the job as cancelled.
CREATE FUNCTION queue_ext.heartbeat(job_id uuid, lease_token uuid DEFAULT NULL, extend interval DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    cancelled text;
BEGIN
    PERFORM queue_ext._check_interval('extend', heartbeat.extend, '1 second', '7 days');
    UPDATE queue_ext.job_queue AS j
    SET lease_expires_at = now() + coalesce(heartbeat.extend,
                                            (SELECT q.lease_duration FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name),
                                            interval '5 minutes'),
        heartbeat_at = now()
    WHERE j.id = heartbeat.job_id AND j.status = 'running'
      AND (heartbeat.lease_token IS NULL OR (j.lease_token = heartbeat.lease_token AND j.lease_expires_at > now()))
    RETURNING j.cancel_requested INTO cancelled;
    IF NOT FOUND THEN
        PERFORM queue_ext._raise_not_running(heartbeat.job_id, heartbeat.lease_token, 'heartbeat');
    END IF;
    RETURN cancelled IS NULL;
END
$$;

-- Records progress (0..100 and any details), extends the lease like heartbeat, publishes a
-- 'progress' event, and returns false when the job was cancelled.
CREATE FUNCTION queue_ext.update_progress(job_id uuid, percent real, details jsonb DEFAULT NULL,
                                          lease_token uuid DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    j queue_ext.job_queue;
BEGIN
    IF update_progress.percent IS NULL OR update_progress.percent < 0 OR update_progress.percent > 100 THEN
        RAISE EXCEPTION 'percent must be between 0 and 100 (got %)', coalesce(update_progress.percent::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    UPDATE queue_ext.job_queue AS t
    SET progress = update_progress.percent,
        progress_details = coalesce(update_progress.details, t.progress_details),
        lease_expires_at = now() + coalesce((SELECT q.lease_duration FROM queue_ext.queues AS q WHERE q.queue_name = t.queue_name),
                                            interval '5 minutes'),
        heartbeat_at = now()
    WHERE t.id = update_progress.job_id AND t.status = 'running'
      AND (update_progress.lease_token IS NULL
           OR (t.lease_token = update_progress.lease_token AND t.lease_expires_at > now()))
    RETURNING * INTO j;
    IF NOT FOUND THEN
        PERFORM queue_ext._raise_not_running(update_progress.job_id, update_progress.lease_token, 'update progress of');
    END IF;
    IF (SELECT q.notify FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name) THEN
        PERFORM queue_ext._notify(j.id, j.queue_name, 'progress', j.attempt, j.progress);
    END IF;
    RETURN j.cancel_requested IS NULL;
END
$$;

-- Cancels a job. Waiting, queued or retrying: it never runs (its dependents are cancelled
-- too); so is a webhook job still waiting in the dispatcher for a request slot. Running: it
-- is marked, and its worker learns it from heartbeat/update_progress
-- (false) or complete_job/fail_job (which then record it as cancelled). Producers may only
-- cancel their own jobs: for anyone else's they get the answer a job that does not exist
-- gets (_may_see_job), learning neither that it exists nor its state. Returns the job's
-- state after the call.
CREATE FUNCTION queue_ext.cancel_job(job_id uuid, reason text DEFAULT 'cancelled')
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
        -- A webhook job the dispatcher holds unsent (waiting for a request slot) is cancelled
        -- before its request starts.
        PERFORM queue_ext._recheck_unsent_at_commit();
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
