-- Queue management: create, alter, pause, resume, drop, list.
--
-- Settings are bounded (22023 outside, naming the setting and its bounds; the table's CHECK
-- constraints say the same): max_attempts 1..1000, backoff_base 0..1 day, backoff_cap
-- 0..30 days and at least backoff_base, lease_duration 1 second..7 days. Beyond them the
-- worker's own arithmetic (run_at = now() + backoff, lease expiry) overflowed and every
-- failure or claim of the queue raised 22008.
-- The internal queue_ext.* queues are the extension's: pausing, resuming, altering or
-- dropping them raises 42501 (_refuse_internal).
-- notify_events (off unless asked for) publishes every state change of the queue's jobs on
-- queue_ext_events from inside the transaction that makes it: its subscribers get each event
-- in commit order, and every such commit takes NOTIFY's database-wide lock. Workers need
-- none of that to wake up: queue_ext_jobs announces new work without it (internal.sql).

-- Checks the queue settings given (NULL: not given) and that the cap is not below the base.
CREATE FUNCTION queue_ext._check_queue_settings(max_attempts integer, backoff_base interval, backoff_cap interval,
                                                lease_duration interval) RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    PERFORM queue_ext._check_max_attempts(max_attempts);
    PERFORM queue_ext._check_interval('backoff_base', backoff_base, '0', '1 day');
    PERFORM queue_ext._check_interval('backoff_cap', backoff_cap, '0', '30 days');
    IF backoff_cap < backoff_base THEN
        RAISE EXCEPTION 'backoff_cap (%) must not be less than backoff_base (%)', backoff_cap, backoff_base
            USING ERRCODE = '22023';
    END IF;
    PERFORM queue_ext._check_interval('lease_duration', lease_duration, '1 second', '7 days');
END
$$;

CREATE FUNCTION queue_ext.create_queue(
    queue_name     text,
    max_attempts   integer  DEFAULT 5,
    backoff_base   interval DEFAULT '1 second',
    backoff_cap    interval DEFAULT '1 hour',
    lease_duration interval DEFAULT '5 minutes',
    if_not_exists  boolean  DEFAULT false,
    notify_events  boolean  DEFAULT false,
    webhook_url              text     DEFAULT NULL,
    webhook_method           text     DEFAULT NULL,
    webhook_headers          jsonb    DEFAULT NULL,
    webhook_timeout          interval DEFAULT NULL,
    webhook_max_in_flight    integer  DEFAULT NULL,
    webhook_secret           text     DEFAULT NULL,
    callback_url             text     DEFAULT NULL,
    webhook_follow_redirects boolean  DEFAULT NULL,
    keep_history             boolean  DEFAULT true
) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM queue_ext._check_queue_name(create_queue.queue_name);
    IF create_queue.queue_name LIKE 'queue\_ext.%' THEN
        RAISE EXCEPTION 'queue names starting with "queue_ext." are reserved' USING ERRCODE = '42939';
    END IF;
    IF create_queue.max_attempts IS NULL OR create_queue.backoff_base IS NULL OR create_queue.backoff_cap IS NULL
       OR create_queue.lease_duration IS NULL THEN
        RAISE EXCEPTION 'max_attempts, backoff_base, backoff_cap and lease_duration must not be null'
            USING ERRCODE = '22004';
    END IF;
    PERFORM queue_ext._check_queue_settings(create_queue.max_attempts, create_queue.backoff_base,
                                            create_queue.backoff_cap, create_queue.lease_duration);
    INSERT INTO queue_ext.queues (queue_name, max_attempts, backoff_base, backoff_cap, lease_duration, notify,
                                  keep_history)
    VALUES (create_queue.queue_name, create_queue.max_attempts, create_queue.backoff_base,
            create_queue.backoff_cap, create_queue.lease_duration, coalesce(create_queue.notify_events, false),
            coalesce(create_queue.keep_history, true))
    ON CONFLICT (queue_name) DO NOTHING;
    IF NOT FOUND THEN
        IF create_queue.if_not_exists THEN
            RETURN;
        END IF;
        RAISE EXCEPTION 'queue "%" already exists', create_queue.queue_name USING ERRCODE = '42710';
    END IF;
    PERFORM queue_ext._set_webhook(create_queue.queue_name, create_queue.webhook_url, create_queue.webhook_method,
        create_queue.webhook_headers, create_queue.webhook_timeout, create_queue.webhook_max_in_flight,
        create_queue.webhook_secret, create_queue.callback_url, create_queue.webhook_follow_redirects);
END
$$;

-- Changes only the settings given; the others keep their values ('' removes webhook_url,
-- webhook_secret or callback_url). New values apply to jobs
-- enqueued (max_attempts) or failing (backoff) or claimed (lease) from now on.
CREATE FUNCTION queue_ext.alter_queue(
    queue_name     text,
    max_attempts   integer  DEFAULT NULL,
    backoff_base   interval DEFAULT NULL,
    backoff_cap    interval DEFAULT NULL,
    lease_duration interval DEFAULT NULL,
    notify_events  boolean  DEFAULT NULL,
    webhook_url              text     DEFAULT NULL,
    webhook_method           text     DEFAULT NULL,
    webhook_headers          jsonb    DEFAULT NULL,
    webhook_timeout          interval DEFAULT NULL,
    webhook_max_in_flight    integer  DEFAULT NULL,
    webhook_secret           text     DEFAULT NULL,
    callback_url             text     DEFAULT NULL,
    webhook_follow_redirects boolean  DEFAULT NULL,
    keep_history             boolean  DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q queue_ext.queues := queue_ext._queue(alter_queue.queue_name);
BEGIN
    PERFORM queue_ext._refuse_internal(q.queue_name, 'alter');
    -- The bounds, and the cap against the base as they will be after this call.
    PERFORM queue_ext._check_queue_settings(alter_queue.max_attempts,
        coalesce(alter_queue.backoff_base, q.backoff_base), coalesce(alter_queue.backoff_cap, q.backoff_cap),
        alter_queue.lease_duration);
    UPDATE queue_ext.queues SET
        max_attempts   = coalesce(alter_queue.max_attempts, max_attempts),
        backoff_base   = coalesce(alter_queue.backoff_base, backoff_base),
        backoff_cap    = coalesce(alter_queue.backoff_cap, backoff_cap),
        lease_duration = coalesce(alter_queue.lease_duration, lease_duration),
        notify         = coalesce(alter_queue.notify_events, notify),
        keep_history   = coalesce(alter_queue.keep_history, keep_history),
        updated_at     = now()
    WHERE queue_name = alter_queue.queue_name;
    PERFORM queue_ext._set_webhook(alter_queue.queue_name, alter_queue.webhook_url, alter_queue.webhook_method,
        alter_queue.webhook_headers, alter_queue.webhook_timeout, alter_queue.webhook_max_in_flight,
        alter_queue.webhook_secret, alter_queue.callback_url, alter_queue.webhook_follow_redirects);
    IF alter_queue.webhook_url IS NOT NULL THEN
        PERFORM queue_ext._wake_dispatcher_at_commit();
    END IF;
END
$$;

CREATE FUNCTION queue_ext.pause_queue(queue_name text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM queue_ext._queue(pause_queue.queue_name);
    PERFORM queue_ext._refuse_internal(pause_queue.queue_name, 'pause');
    UPDATE queue_ext.queues SET paused = true, updated_at = now() WHERE queue_name = pause_queue.queue_name;
    -- Jobs the dispatcher claimed ahead and still holds unsent go back to the queue.
    PERFORM queue_ext._recheck_unsent_at_commit();
END
$$;

CREATE FUNCTION queue_ext.resume_queue(queue_name text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM queue_ext._queue(resume_queue.queue_name);
    PERFORM queue_ext._refuse_internal(resume_queue.queue_name, 'resume');
    UPDATE queue_ext.queues SET paused = false, updated_at = now() WHERE queue_name = resume_queue.queue_name;
    PERFORM queue_ext._wake_dispatcher_at_commit();
    PERFORM queue_ext._announce(resume_queue.queue_name);
END
$$;

-- Refuses while the queue holds live jobs, unless force: then its live jobs are cancelled
-- into the archive (not silently deleted) and its dead letters stay for inspection. Jobs of
-- any queue that depend on a cancelled job are cancelled too, transitively, as cancel_job
-- does: nothing is left waiting for a job that will never complete.
CREATE FUNCTION queue_ext.drop_queue(queue_name text, force boolean DEFAULT false) RETURNS void
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
    -- Jobs the dispatcher claimed ahead and still holds unsent are not sent.
    PERFORM queue_ext._recheck_unsent_at_commit();
END
$$;

CREATE FUNCTION queue_ext.list_queues()
RETURNS TABLE (
    queue_name     text,
    paused         boolean,
    max_attempts   integer,
    backoff_base   interval,
    backoff_cap    interval,
    lease_duration interval,
    is_webhook     boolean,
    has_callback   boolean,
    notify_events  boolean,
    created_at     timestamptz,
    keep_history   boolean
)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT queue_name, paused, max_attempts, backoff_base, backoff_cap, lease_duration, is_webhook, has_callback, notify, created_at, keep_history
    FROM queue_ext.queues ORDER BY queue_name
$$;
