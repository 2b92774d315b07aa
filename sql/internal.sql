-- Internal helpers. Not granted to any role: the SECURITY DEFINER API calls them as the
-- extension owner. Each raises the SQLSTATE a caller can act on, with a message naming the
-- bad value.
--
-- search_path: every entry point (the SECURITY DEFINER API, and the helpers the dispatcher
-- calls directly: _dispatch_*, _return_running, _purge_deliveries, _rate_limit_wait) pins
-- it. Helpers reached only through those run under the pinned path already, so they carry
-- no SET clause of their own: a SET costs a configuration switch on every call (measured
-- 5-10 us each, a third of an enqueue's CPU time) and keeps SQL helpers from being inlined.
--
-- enable_seqscan = off, plan_cache_mode = force_generic_plan: the entry points that find jobs
-- by key (claims, completions, failures, heartbeats, the dispatcher's record) plan their
-- statements once per session, and always through an index on job_queue.
--   * A queue table swings from empty to millions of rows within a minute, and a session
--     keeps a generic plan made while it was empty: measured, the claim then hashed a
--     sequential scan of the whole table and completions filtered it row by row, on every
--     call until the next ANALYZE.
--   * Left to choose, the plan cache re-planned the claim on every call (its generic plan,
--     LIMIT unknown, looked dearer than a custom one): ~0.3 ms of planning per claim, more
--     than the claim itself (pgbench, one empty claim per transaction: 0.63 -> 0.35 ms,
--     where SELECT 1 takes 0.34 ms on this machine).
-- The two switches cost ~5 us a call.

-- The role that called us. Inside a SECURITY DEFINER function current_user is the owner,
-- so we read the session's active role instead (SET ROLE, as PostgREST does, included).
CREATE FUNCTION queue_ext._invoker() RETURNS name
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN current_setting('role') = 'none' THEN session_user
                ELSE current_setting('role')::name END
$$;

CREATE FUNCTION queue_ext._check_queue_name(queue_name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF queue_name IS NULL THEN
        RAISE EXCEPTION 'queue name must not be null' USING ERRCODE = '22004';
    END IF;
    IF queue_name !~ '^[a-z0-9][a-z0-9_.-]{0,62}$' THEN
        -- Quoted, but never more than 100 characters of it: the message goes to logs and clients.
        RAISE EXCEPTION 'invalid queue name "%"', CASE WHEN length(queue_name) > 100 THEN left(queue_name, 100) || '...' ELSE queue_name END
            USING ERRCODE = '22023',
                  HINT = 'Queue names are 1 to 63 characters of a-z, 0-9, "_", "-" and ".", starting with a letter or digit.';
    END IF;
END
$$;

CREATE FUNCTION queue_ext._queue(queue_name text) RETURNS queue_ext.queues
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    q queue_ext.queues;
BEGIN
    SELECT * INTO q FROM queue_ext.queues AS t WHERE t.queue_name = _queue.queue_name;
    IF NOT FOUND THEN
        IF _queue.queue_name IS NULL THEN
            RAISE EXCEPTION 'queue name must not be null' USING ERRCODE = '22004';
        END IF;
        RAISE EXCEPTION 'queue "%" does not exist',
            CASE WHEN length(_queue.queue_name) > 100 THEN left(_queue.queue_name, 100) || '...' ELSE _queue.queue_name END
            USING ERRCODE = '42704', HINT = 'Create it with queue_ext.create_queue().';
    END IF;
    RETURN q;
END
$$;

CREATE FUNCTION queue_ext._priority(priority text) RETURNS queue_ext.job_priority
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    IF priority IS NULL OR priority NOT IN ('low', 'normal', 'high', 'critical') THEN
        RAISE EXCEPTION 'invalid priority "%"', coalesce(priority, 'NULL')
            USING ERRCODE = '22023', HINT = 'Use one of critical, high, normal, low.';
    END IF;
    RETURN priority::queue_ext.job_priority;
END
$$;

-- Checks one payload; position names it in a batch error.
CREATE FUNCTION queue_ext._check_payload(payload jsonb, item integer DEFAULT NULL) RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
DECLARE
    limit_bytes integer := queue_ext.max_payload_bytes();
    what text := CASE WHEN item IS NULL THEN 'payload' ELSE format('payload %s', item) END;
BEGIN
    IF payload IS NULL THEN
        RAISE EXCEPTION '% must not be null', what USING ERRCODE = '22004';
    END IF;
    IF jsonb_typeof(payload) <> 'object' THEN
        RAISE EXCEPTION '% must be a JSON object, not %', what, jsonb_typeof(payload)
            USING ERRCODE = '22023', HINT = 'Wrap the value: jsonb_build_object(''value'', ...).';
    END IF;
    -- pg_column_size is the stored (binary jsonb) size: cheap, and what the table holds.
    IF pg_column_size(payload) > limit_bytes THEN
        RAISE EXCEPTION '% is % bytes, over the limit of % bytes', what, pg_column_size(payload), limit_bytes
            USING ERRCODE = '54000', HINT = 'Raise queue_ext.max_payload_bytes, or store large data elsewhere and enqueue a reference.';
    END IF;
END
$$;

-- Raises 22023 naming the setting and its bounds when `value` lies outside low..high
-- (inclusive; NULL passes: callers decide what NULL means). Every interval a caller gives is
-- bounded so that what the worker computes from it (run_at, lease expiry, backoff) stays far
-- inside the timestamp range: an unbounded one made every later claim or failure raise 22008.
CREATE FUNCTION queue_ext._check_interval(what text, value interval, low text, high text) RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
BEGIN
    IF value < low::interval OR value > high::interval THEN
        RAISE EXCEPTION '% must be between % and % (got %)', what, low, high, value USING ERRCODE = '22023';
    END IF;
END
$$;

-- When a job should start, from the enqueue options.
CREATE FUNCTION queue_ext._start_time(run_at timestamptz, delay interval) RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
BEGIN
    IF run_at IS NOT NULL AND delay IS NOT NULL THEN
        RAISE EXCEPTION 'give run_at or delay, not both' USING ERRCODE = '22023';
    END IF;
    IF run_at IS NOT NULL AND (NOT isfinite(run_at) OR run_at >= timestamptz '10000-01-01 00:00:00+00') THEN
        RAISE EXCEPTION 'run_at must be finite and before the year 10000 (got %)', run_at USING ERRCODE = '22023';
    END IF;
    IF delay IS NOT NULL THEN
        PERFORM queue_ext._check_interval('delay', delay, '0', '100 years');
    END IF;
    RETURN coalesce(run_at, now() + delay, now());
END
$$;

-- Queue names starting with "queue_ext." belong to the extension (queue_ext.callbacks carries
-- signed completion events): only the extension itself writes their jobs or changes them. A
-- job enqueued there by anyone else, admins included, would be POSTed to another queue's
-- callback_url signed with that queue's secret, i.e. a forged callback.
CREATE FUNCTION queue_ext._refuse_internal(queue_name text, action text) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    IF queue_name LIKE 'queue\_ext.%' THEN
        RAISE EXCEPTION 'cannot % queue "%": it is internal to queue_ext', action, queue_name
            USING ERRCODE = '42501';
    END IF;
END
$$;

-- May the calling role see, and act on, a job enqueued by `owner`? Producers see only the
-- jobs they enqueued; workers, admins and superusers see every job. owner NULL (no such
-- job): true only for those who see every job, so that a producer is answered the same way
-- whether a job id is someone else's or does not exist, and learns neither. The one rule
-- every function taking a job id applies (with _raise_hidden_job for the answer).
-- PL/pgSQL: as a SQL function with a subquery it was never inlined, and its body was planned
-- on every call (190 µs of each job_status or cancel_job).
CREATE FUNCTION queue_ext._may_see_job(owner name) RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    me name := queue_ext._invoker();
BEGIN
    RETURN (owner IS NOT NULL AND owner = me)
        OR pg_has_role(me, 'queue_ext_worker', 'MEMBER')
        OR pg_has_role(me, 'queue_ext_admin', 'MEMBER')
        OR coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles AS r WHERE r.rolname = me), false);
END
$$;

-- The answer to a job the caller may not see (_may_see_job), the same for a job that does
-- not exist: it reveals neither the job's existence nor its state.
CREATE FUNCTION queue_ext._raise_hidden_job(job_id uuid) RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RAISE EXCEPTION 'job % does not exist or belongs to another role', job_id USING ERRCODE = '42501';
END
$$;

CREATE FUNCTION queue_ext._check_max_attempts(max_attempts integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    IF max_attempts IS NOT NULL AND (max_attempts < 1 OR max_attempts > 1000) THEN
        RAISE EXCEPTION 'max_attempts must be between 1 and 1000 (got %)', max_attempts USING ERRCODE = '22023';
    END IF;
END
$$;

-- Exponential backoff with jitter: min(base * 2^(attempt-1), cap), then a random point in
-- its upper half, so that jobs failing together do not come back together. Computed in
-- seconds (float8) and clamped to the cap before an interval is built: interval arithmetic
-- overflowed (22008) for a large base at high attempts. 2^999 days is still a finite float8.
-- PL/pgSQL, as every helper that is more than one expression: PostgreSQL 15 plans the body of a
-- SQL function that it cannot inline anew on every call (here 43 µs of each failure).
CREATE FUNCTION queue_ext._backoff(base interval, cap interval, attempt integer) RETURNS interval
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
AS $$
BEGIN
    RETURN make_interval(secs => least(extract(epoch FROM base)::float8
                                           * power(2::float8, least(greatest(attempt, 1) - 1, 1000)),
                                       extract(epoch FROM cap)::float8)
                                 * (0.5 + random() * 0.5));
END
$$;

-- Called when a fenced call (complete, fail, heartbeat, cancel...) matched no running job:
-- works out why, and raises the error that says so. A caller who may not see the job
-- (_may_see_job: a producer, about another role's job or an id that does not exist) gets
-- _raise_hidden_job's answer instead, which tells it nothing.
CREATE FUNCTION queue_ext._raise_not_running(job_id uuid, lease_token uuid, action text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j queue_ext.job_queue;
    finished queue_ext.job_state;
    owner name;
BEGIN
    IF job_id IS NULL THEN
        RAISE EXCEPTION 'job id must not be null' USING ERRCODE = '22004';
    END IF;
    SELECT * INTO j FROM queue_ext.job_queue AS t WHERE t.id = _raise_not_running.job_id;
    IF FOUND THEN
        IF NOT queue_ext._may_see_job(j.enqueued_by) THEN
            PERFORM queue_ext._raise_hidden_job(job_id);
        END IF;
        IF j.status = 'running' AND j.lease_token = _raise_not_running.lease_token THEN
            RAISE EXCEPTION 'cannot % job %: its lease expired at %', action, job_id, j.lease_expires_at
                USING ERRCODE = '55000',
                      HINT = 'The job will be retried. Extend long leases with queue_ext.heartbeat().';
        ELSIF lease_token IS NOT NULL THEN
            RAISE EXCEPTION 'cannot % job %: lease token % is stale (the job is % at attempt %)',
                action, job_id, lease_token, j.status, j.attempt
                USING ERRCODE = '55000',
                      HINT = 'The lease expired and the job was returned to the queue or claimed again. Drop this result.';
        ELSE
            RAISE EXCEPTION 'cannot % job %: it is %, not running', action, job_id, j.status
                USING ERRCODE = '55000';
        END IF;
    END IF;
    SELECT t.status, t.enqueued_by INTO finished, owner FROM queue_ext.job_archive AS t
    WHERE t.id = _raise_not_running.job_id;
    IF NOT FOUND THEN
        SELECT 'dead', t.enqueued_by INTO finished, owner FROM queue_ext.job_dead_letter AS t
        WHERE t.id = _raise_not_running.job_id;
    END IF;
    IF NOT queue_ext._may_see_job(owner) THEN
        PERFORM queue_ext._raise_hidden_job(job_id);
    END IF;
    IF finished IS NOT NULL THEN
        RAISE EXCEPTION 'cannot % job %: it is already %', action, job_id, finished
            USING ERRCODE = '55000';
    END IF;
    RAISE EXCEPTION 'job % does not exist', job_id USING ERRCODE = '42704';
END
$$;

-- Tells whoever drains queue_name that it has runnable jobs once the transaction commits:
-- the dispatcher (which claims if it is a webhook queue) and SQL workers, with
-- `NOTIFY queue_ext_jobs, '<queue>'`. The dispatcher sends that after the commit, one per
-- queue per turn, so producers never take NOTIFY's database-wide commit lock; with no
-- dispatcher attached to this database (not preloaded, or not up yet) the transaction
-- sends it itself. For the rarer transitions; enqueues do the same inline.
CREATE FUNCTION queue_ext._announce(queue_name text) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM queue_ext._wake_dispatcher_at_commit();
    IF NOT queue_ext._announce_at_commit(queue_name) THEN
        PERFORM pg_notify('queue_ext_jobs', queue_name);
    END IF;
END
$$;
