-- queue_ext 0.3.0 -> 0.4.0: trust. Leases expire without the dispatcher (a claim reclaims
-- them), internal queues take jobs only from the extension, dedupe keys are scoped to the
-- producer that set them, settings are bounded so that no value can break a claim or a
-- retry, and nothing a producer or a worker can read names a webhook's credentials.
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.4.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.4.0'" to load this file. \quit

-- Settings get bounds that keep every claim and retry computable; bring existing queues
-- inside them before the constraints say so.
UPDATE queue_ext.queues
SET backoff_base   = least(backoff_base, interval '1 day'),
    backoff_cap    = least(greatest(backoff_cap, least(backoff_base, interval '1 day')), interval '30 days'),
    lease_duration = least(greatest(lease_duration, interval '1 second'), interval '7 days');
ALTER TABLE queue_ext.queues
    DROP CONSTRAINT queues_backoff_base_check,
    ADD CONSTRAINT queues_backoff_base_check CHECK (backoff_base BETWEEN interval '0' AND interval '1 day'),
    DROP CONSTRAINT queues_backoff_cap_check,
    ADD CONSTRAINT queues_backoff_cap_check CHECK (backoff_cap BETWEEN interval '0' AND interval '30 days'),
    DROP CONSTRAINT queues_lease_duration_check,
    ADD CONSTRAINT queues_lease_duration_check CHECK (lease_duration BETWEEN interval '1 second' AND interval '7 days'),
    ADD CONSTRAINT backoff_cap_not_below_base CHECK (backoff_cap >= backoff_base);

-- Dedupe keys belong to the producer that set them. Existing keys stay unique (a narrower
-- key was unique before), and enqueue_job's ON CONFLICT below names the new columns.
DROP INDEX queue_ext.job_queue_dedupe_idx;
CREATE UNIQUE INDEX job_queue_dedupe_idx ON queue_ext.job_queue (queue_name, enqueued_by, dedupe_key)
    WHERE dedupe_key IS NOT NULL;

-- Gone or reshaped: _return_running takes the queues a claim reclaims for; dispatcher_status
-- gains state and detail; schedule_job checks for pg_cron itself; events carry no error text.
DROP FUNCTION queue_ext._return_running(text, text);
DROP FUNCTION queue_ext._notify(uuid, text, text, integer, real, text);
-- A stopping dispatcher returns its unfinished deliveries through _return_running (the
-- attempt counts, so restarts cannot resend a job forever).
DROP FUNCTION queue_ext._dispatch_release(jsonb);
DROP FUNCTION queue_ext._require_pg_cron();
DROP FUNCTION queue_ext.dispatcher_status();

CREATE FUNCTION queue_ext."_wake_launcher_at_commit"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_wake_launcher_at_commit_wrapper';

CREATE FUNCTION queue_ext."dispatcher_status"() RETURNS TABLE (
	"database" TEXT,  /* String */
	"pid" INT,  /* Option < i32 > */
	"running" bool,  /* bool */
	"started_at" timestamp with time zone,  /* Option < Timestamp > */
	"last_heartbeat" timestamp with time zone,  /* Option < Timestamp > */
	"in_flight" bigint,  /* i64 */
	"delivered" bigint,  /* i64 */
	"retried" bigint,  /* i64 */
	"failed" bigint,  /* i64 */
	"state" TEXT,  /* String */
	"detail" TEXT  /* String */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'dispatcher_states_wrapper';

-- Every function whose definition changed or that is new, as in sql/.
CREATE OR REPLACE FUNCTION queue_ext._check_queue_name(queue_name text) RETURNS void
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

CREATE OR REPLACE FUNCTION queue_ext._queue(queue_name text) RETURNS queue_ext.queues
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

CREATE OR REPLACE FUNCTION queue_ext._check_interval(what text, value interval, low text, high text) RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
BEGIN
    IF value < low::interval OR value > high::interval THEN
        RAISE EXCEPTION '% must be between % and % (got %)', what, low, high, value USING ERRCODE = '22023';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._start_time(run_at timestamptz, delay interval) RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
BEGIN
    IF run_at IS NOT NULL AND delay IS NOT NULL THEN
        RAISE EXCEPTION 'give run_at or delay, not both' USING ERRCODE = '22023';
    END IF;
    IF run_at IS NOT NULL AND (NOT isfinite(run_at) OR run_at >= timestamptz '10000-01-01 00:00:00+00') THEN
        RAISE EXCEPTION 'run_at must be finite and before the year 10000 (got %)', run_at USING ERRCODE = '22023';
    END IF;
    PERFORM queue_ext._check_interval('delay', delay, '0', '100 years');
    RETURN coalesce(run_at, now() + delay, now());
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._refuse_internal(queue_name text, action text) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    IF queue_name LIKE 'queue\_ext.%' THEN
        RAISE EXCEPTION 'cannot % queue "%": it is internal to queue_ext', action, queue_name
            USING ERRCODE = '42501';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._may_see_job(owner name) RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT (owner IS NOT NULL AND owner = queue_ext._invoker())
        OR pg_has_role(queue_ext._invoker(), 'queue_ext_worker', 'MEMBER')
        OR pg_has_role(queue_ext._invoker(), 'queue_ext_admin', 'MEMBER')
        OR coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles AS r WHERE r.rolname = queue_ext._invoker()), false)
$$;

CREATE OR REPLACE FUNCTION queue_ext._raise_hidden_job(job_id uuid) RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RAISE EXCEPTION 'job % does not exist or belongs to another role', job_id USING ERRCODE = '42501';
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._backoff(base interval, cap interval, attempt integer) RETURNS interval
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $$
    SELECT make_interval(secs => d * (0.5 + random() * 0.5))
    FROM (SELECT least(extract(epoch FROM base)::float8 * power(2::float8, least(greatest(attempt, 1) - 1, 1000)),
                       extract(epoch FROM cap)::float8) AS d) AS s
$$;

CREATE OR REPLACE FUNCTION queue_ext._raise_not_running(job_id uuid, lease_token uuid, action text) RETURNS void
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

CREATE OR REPLACE FUNCTION queue_ext._check_queue_settings(max_attempts integer, backoff_base interval, backoff_cap interval,
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

CREATE OR REPLACE FUNCTION queue_ext.create_queue(
    queue_name     text,
    max_attempts   integer  DEFAULT 5,
    backoff_base   interval DEFAULT '1 second',
    backoff_cap    interval DEFAULT '1 hour',
    lease_duration interval DEFAULT '5 minutes',
    if_not_exists  boolean  DEFAULT false,
    notify_events  boolean  DEFAULT true,
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
            create_queue.backoff_cap, create_queue.lease_duration, coalesce(create_queue.notify_events, true),
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

CREATE OR REPLACE FUNCTION queue_ext.alter_queue(
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

CREATE OR REPLACE FUNCTION queue_ext.pause_queue(queue_name text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM queue_ext._queue(pause_queue.queue_name);
    PERFORM queue_ext._refuse_internal(pause_queue.queue_name, 'pause');
    UPDATE queue_ext.queues SET paused = true, updated_at = now() WHERE queue_name = pause_queue.queue_name;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.resume_queue(queue_name text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM queue_ext._queue(resume_queue.queue_name);
    PERFORM queue_ext._refuse_internal(resume_queue.queue_name, 'resume');
    UPDATE queue_ext.queues SET paused = false, updated_at = now() WHERE queue_name = resume_queue.queue_name;
    PERFORM queue_ext._wake_dispatcher_at_commit();
END
$$;

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
    WITH gone AS (
        DELETE FROM queue_ext.job_queue WHERE queue_name = drop_queue.queue_name RETURNING *
    ), archived AS (
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            worker_id, last_error, errors, enqueued_by, created_at, run_at, started_at, rate_limit_key, concurrency_key)
        SELECT id, queue_name, payload, priority, 'cancelled', attempt, max_attempts,
            worker_id, 'queue dropped', errors, enqueued_by, created_at, run_at, started_at, rate_limit_key, concurrency_key
        FROM gone
    ), history AS (
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
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
    who name := queue_ext._invoker();
    start timestamptz := queue_ext._start_time(enqueue_job.run_at, enqueue_job.delay);
    existing uuid;
    initial queue_ext.job_state := 'queued';
    blocked_by uuid;
    took_slot boolean := false;
BEGIN
    PERFORM queue_ext._refuse_internal(q.queue_name, 'enqueue into');
    PERFORM queue_ext._check_payload(enqueue_job.payload);
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
            INSERT INTO queue_ext.job_status_history (job_id, queue_name, to_status, attempt, error, enqueued_by)
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
    IF q.keep_history THEN
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, to_status, attempt, enqueued_by)
        VALUES (new_id, q.queue_name, initial, 0, who);
    ELSIF q.notify THEN
        -- No history row to publish it: say so directly, so that LISTENing workers wake up.
        PERFORM queue_ext._notify(new_id, q.queue_name, initial::text, 0, NULL);
    END IF;
    IF q.is_webhook AND initial = 'queued' THEN
        PERFORM queue_ext._wake_dispatcher_at_commit();
    END IF;
    RETURN new_id;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.enqueue_jobs(
    queue_name      text,
    payloads        jsonb[],
    priority        text        DEFAULT 'normal',
    run_at          timestamptz DEFAULT NULL,
    delay           interval    DEFAULT NULL,
    max_attempts    integer     DEFAULT NULL,
    rate_limit_key  text        DEFAULT NULL,
    concurrency_key text        DEFAULT NULL
) RETURNS SETOF uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q queue_ext.queues := queue_ext._queue(enqueue_jobs.queue_name);
    who name := queue_ext._invoker();
    start timestamptz := queue_ext._start_time(enqueue_jobs.run_at, enqueue_jobs.delay);
    prio queue_ext.job_priority := queue_ext._priority(enqueue_jobs.priority);
    slots queue_ext.concurrency_limits;
    free integer;  -- how many of the batch get a slot now; NULL: all
    ids uuid[];
    states queue_ext.job_state[];
    limit_bytes integer := queue_ext.max_payload_bytes();
BEGIN
    PERFORM queue_ext._refuse_internal(q.queue_name, 'enqueue into');
    PERFORM queue_ext._check_max_attempts(enqueue_jobs.max_attempts);
    PERFORM queue_ext._check_limit_keys(enqueue_jobs.rate_limit_key, enqueue_jobs.concurrency_key);
    IF enqueue_jobs.payloads IS NULL THEN
        RAISE EXCEPTION 'payloads must not be null' USING ERRCODE = '22004';
    END IF;
    -- Validate all before inserting any, so an error names the first bad payload: one pass
    -- over the batch finds it, and _check_payload then raises its error (a call per payload
    -- cost more than the insert itself).
    PERFORM queue_ext._check_payload(u.p, u.i::integer)
    FROM unnest(enqueue_jobs.payloads) WITH ORDINALITY AS u(p, i)
    WHERE u.i = (SELECT min(b.i) FROM unnest(enqueue_jobs.payloads) WITH ORDINALITY AS b(p, i)
                 WHERE b.p IS NULL OR jsonb_typeof(b.p) <> 'object'
                    OR pg_column_size(b.p) > limit_bytes);
    IF enqueue_jobs.concurrency_key IS NOT NULL THEN
        slots := queue_ext._lock_key(enqueue_jobs.concurrency_key);
        free := CASE WHEN slots.max_running IS NOT NULL THEN greatest(slots.max_running - slots.active, 0) END;
        UPDATE queue_ext.concurrency_limits AS l
        SET active = l.active + least(coalesce(free, cardinality(enqueue_jobs.payloads)), cardinality(enqueue_jobs.payloads))
        WHERE l.key = enqueue_jobs.concurrency_key;
    END IF;

    IF q.is_webhook THEN
        PERFORM queue_ext._wake_dispatcher_at_commit();
    END IF;
    WITH new_jobs AS (
        INSERT INTO queue_ext.job_queue (id, queue_name, payload, priority, status, run_at, max_attempts, enqueued_by,
                                         rate_limit_key, concurrency_key)
        SELECT queue_ext.uuid_generate_v7(), q.queue_name, p, prio,
               CASE WHEN free IS NULL OR i <= free THEN 'queued' ELSE 'waiting' END::queue_ext.job_state,
               start, coalesce(enqueue_jobs.max_attempts, q.max_attempts), who,
               enqueue_jobs.rate_limit_key, enqueue_jobs.concurrency_key
        FROM unnest(enqueue_jobs.payloads) WITH ORDINALITY AS u(p, i)
        ORDER BY i
        RETURNING id, status
    ), history AS (
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, to_status, attempt, enqueued_by)
        SELECT id, q.queue_name, status, 0, who FROM new_jobs WHERE q.keep_history
    )
    -- v7 ids generated in insertion order sort in payload order.
    SELECT array_agg(id ORDER BY id), array_agg(status ORDER BY id) INTO ids, states FROM new_jobs;
    IF NOT q.keep_history AND q.notify THEN
        -- No history rows to publish them (see enqueue_job).
        PERFORM queue_ext._notify(u.id, q.queue_name, u.state::text, 0, NULL)
        FROM unnest(ids, states) AS u(id, state);
    END IF;
    RETURN QUERY SELECT unnest(ids);
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
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    q queue_ext.queues := queue_ext._queue(get_next_jobs.queue_name);
    lease_for interval := coalesce(get_next_jobs.lease, q.lease_duration);
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
    IF EXISTS (SELECT 1 FROM queue_ext.job_queue AS e
               WHERE e.status = 'running' AND e.lease_expires_at <= now() AND e.queue_name = q.queue_name) THEN
        PERFORM queue_ext._return_running(NULL, 'lease expired', ARRAY[q.queue_name]);
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
    WITH next AS (
        SELECT id, status AS old_status
        FROM queue_ext.job_queue
        WHERE queue_name = q.queue_name AND status IN ('queued', 'retrying') AND rate_limit_key IS NULL
          AND run_at <= now()
        ORDER BY priority DESC, run_at, id
        LIMIT get_next_jobs.n
        FOR UPDATE SKIP LOCKED
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
    failure := jsonb_build_object('attempt', j.attempt, 'error', message, 'at', now(), 'worker_id', j.worker_id);
    j.errors := j.errors || jsonb_build_array(failure);
    j.last_error := message;

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
    INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
    VALUES (j.id, j.queue_name, 'running', 'retrying', j.attempt, j.worker_id, message, j.enqueued_by);
    IF q.has_callback THEN
        PERFORM queue_ext._emit_callback(j, 'job.failed', NULL);
    END IF;
    RETURN 'retrying';
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.fail_job(
    job_id      uuid,
    error       text,
    lease_token uuid     DEFAULT NULL,
    permanent   boolean  DEFAULT false,
    retry_in    interval DEFAULT NULL
) RETURNS queue_ext.job_state
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    outcome queue_ext.job_state;
BEGIN
    outcome := queue_ext._fail(fail_job.job_id, fail_job.error, fail_job.lease_token,
                               coalesce(fail_job.permanent, false), fail_job.retry_in);
    IF outcome IS NULL THEN
        PERFORM queue_ext._raise_not_running(fail_job.job_id, fail_job.lease_token, 'fail');
    END IF;
    RETURN outcome;
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
        WHERE t.status = 'running'
          AND CASE WHEN only_worker IS NULL THEN t.lease_expires_at <= now() ELSE t.worker_id = only_worker END
          AND (queue_names IS NULL OR t.queue_name = ANY (queue_names))
        ORDER BY t.lease_expires_at
        FOR UPDATE SKIP LOCKED
    LOOP
        j.errors := j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempt, 'error', reason, 'at', now(), 'worker_id', j.worker_id));
        j.last_error := reason;
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
        END IF;
        handled := handled + 1;
    END LOOP;
    IF handled > 0 THEN
        PERFORM queue_ext._wake_dispatcher_at_commit();
    END IF;
    RETURN handled;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._dependency_state(new_job uuid, depends_on uuid[],
                                            OUT state queue_ext.job_state, OUT blocked_by uuid)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    missing uuid;
BEGIN
    PERFORM 1 FROM queue_ext.job_queue AS j WHERE j.id = ANY (depends_on) FOR KEY SHARE;
    SELECT d INTO missing FROM unnest(depends_on) AS d
    LEFT JOIN LATERAL (
        SELECT j.enqueued_by AS owner FROM queue_ext.job_queue AS j WHERE j.id = d
        UNION ALL SELECT a.enqueued_by FROM queue_ext.job_archive AS a WHERE a.id = d
        UNION ALL SELECT x.enqueued_by FROM queue_ext.job_dead_letter AS x WHERE x.id = d
        LIMIT 1
    ) AS o ON true
    WHERE d IS NULL OR o.owner IS NULL OR NOT queue_ext._may_see_job(o.owner)
    LIMIT 1;
    IF FOUND THEN
        IF missing IS NOT NULL AND NOT queue_ext._may_see_job(NULL) THEN
            PERFORM queue_ext._raise_hidden_job(missing);
        END IF;
        RAISE EXCEPTION 'dependency % does not exist', coalesce(missing::text, 'NULL')
            USING ERRCODE = '42704', HINT = 'depends_on takes ids returned by enqueue_job.';
    END IF;
    SELECT d INTO blocked_by FROM unnest(depends_on) AS d
    WHERE EXISTS (SELECT 1 FROM queue_ext.job_dead_letter AS x WHERE x.id = d)
       OR EXISTS (SELECT 1 FROM queue_ext.job_archive AS a WHERE a.id = d AND a.status = 'cancelled')
    LIMIT 1;
    IF FOUND THEN
        state := 'cancelled';
        RETURN;
    END IF;
    INSERT INTO queue_ext.job_dependencies (job_id, depends_on)
    SELECT DISTINCT new_job, d FROM unnest(depends_on) AS d
    WHERE EXISTS (SELECT 1 FROM queue_ext.job_queue AS j WHERE j.id = d);
    state := CASE WHEN FOUND THEN 'waiting' ELSE 'queued' END;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.heartbeat(job_id uuid, lease_token uuid DEFAULT NULL, extend interval DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION queue_ext.update_progress(job_id uuid, percent real, details jsonb DEFAULT NULL,
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

CREATE OR REPLACE FUNCTION queue_ext.cancel_job(job_id uuid, reason text DEFAULT 'cancelled')
RETURNS queue_ext.job_state
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    j queue_ext.job_queue;
    who name := queue_ext._invoker();
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
    INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
    VALUES (j.id, j.queue_name, j.status, 'cancelled', j.attempt, j.worker_id, why, j.enqueued_by);
    PERFORM queue_ext._cancel_dependents(j.id, format('dependency %s was cancelled', j.id));
    RETURN 'cancelled';
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.job_status(job_id uuid)
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
           j.errors, j.progress, j.progress_details, j.worker_id, j.enqueued_by, j.created_at, j.run_at, j.started_at, NULL::timestamptz
    FROM queue_ext.job_queue AS j WHERE j.id = job_status.job_id AND queue_ext._may_see_job(j.enqueued_by)
    UNION ALL
    SELECT a.id, a.queue_name, a.status, a.priority, a.attempt, a.max_attempts, a.result, a.last_error,
           a.errors, a.progress, a.progress_details, a.worker_id, a.enqueued_by, a.created_at, a.run_at, a.started_at, a.finished_at
    FROM queue_ext.job_archive AS a WHERE a.id = job_status.job_id AND queue_ext._may_see_job(a.enqueued_by)
    UNION ALL
    SELECT d.id, d.queue_name, 'dead'::queue_ext.job_state, d.priority, d.attempt, d.max_attempts, NULL, d.last_error,
           d.errors, NULL, NULL, d.worker_id, d.enqueued_by, d.created_at, NULL, d.started_at, d.died_at
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
        DELETE FROM queue_ext.job_status_history AS h USING gone WHERE h.job_id = gone.id
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
        DELETE FROM queue_ext.job_status_history AS h USING gone WHERE h.job_id = gone.id
    )
    SELECT count(*) INTO purged FROM gone;
    RETURN purged;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._dispatch_claim(worker_id text, capacity integer, busy jsonb, only_queue text,
                                          default_timeout interval)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    room integer := capacity;
    n integer;
    claimed jsonb := '[]';
    batch jsonb;
    callback_lease interval;
BEGIN
    FOR t IN
        SELECT q.queue_name, w.url, w.method, w.headers, coalesce(w.timeout, default_timeout) AS timeout,
               w.max_in_flight, w.secret, w.follow_redirects
        FROM queue_ext.queues AS q
        LEFT JOIN queue_ext.webhook_targets AS w ON w.queue_name = q.queue_name
        WHERE q.is_webhook AND NOT q.paused
          AND (only_queue IS NULL OR q.queue_name = only_queue)
          AND (w.url IS NOT NULL OR q.queue_name = 'queue_ext.callbacks')
        ORDER BY random()  -- no queue always goes first when capacity is short
    LOOP
        EXIT WHEN room <= 0;
        n := least(room, coalesce(t.max_in_flight, 1000) - coalesce((busy ->> t.queue_name)::integer, 0));
        CONTINUE WHEN n <= 0;
        IF t.queue_name = 'queue_ext.callbacks' THEN
            -- Each event goes to the callback_url of the queue it reports on, signed with
            -- that queue's secret.
            SELECT greatest(default_timeout, max(w.timeout)) + interval '30 seconds' INTO callback_lease
            FROM queue_ext.webhook_targets AS w WHERE w.callback_url IS NOT NULL;
            SELECT coalesce(jsonb_agg(jsonb_build_object(
                       'job_id', c.job_id, 'lease_token', c.lease_token, 'attempt', c.attempt,
                       'max_attempts', c.max_attempts, 'queue_name', c.queue_name, 'body', c.payload::text,
                       'url', w.callback_url, 'method', 'POST', 'headers', coalesce(w.headers, '{}'),
                       'timeout_ms', (extract(epoch FROM coalesce(w.timeout, default_timeout)) * 1000)::bigint,
                       'secret', w.secret, 'follow_redirects', coalesce(w.follow_redirects, false))), '[]')
            INTO batch
            FROM queue_ext.get_next_jobs(t.queue_name, n, worker_id, callback_lease) AS c
            LEFT JOIN queue_ext.webhook_targets AS w ON w.queue_name = c.payload ->> 'queue';
        ELSE
            SELECT coalesce(jsonb_agg(jsonb_build_object(
                       'job_id', c.job_id, 'lease_token', c.lease_token, 'attempt', c.attempt,
                       'max_attempts', c.max_attempts, 'queue_name', c.queue_name, 'body', c.payload::text,
                       'url', t.url, 'method', t.method, 'headers', t.headers,
                       'timeout_ms', (extract(epoch FROM t.timeout) * 1000)::bigint,
                       'secret', t.secret, 'follow_redirects', t.follow_redirects)), '[]')
            INTO batch
            FROM queue_ext.get_next_jobs(t.queue_name, n, worker_id, t.timeout + interval '30 seconds') AS c;
        END IF;
        room := room - jsonb_array_length(batch);
        claimed := claimed || batch;
    END LOOP;
    RETURN claimed;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._notify(job_id uuid, queue_name text, status text, attempt integer,
                                  progress real) RETURNS void
LANGUAGE sql VOLATILE
AS $$
    SELECT pg_notify('queue_ext_events', json_build_object(
        'id', job_id, 'queue', queue_name, 'status', status, 'attempt', attempt,
        'progress', progress)::text)
$$;

CREATE OR REPLACE FUNCTION queue_ext._publish_transitions() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM queue_ext._notify(t.job_id, t.queue_name, t.to_status::text, t.attempt, NULL)
    FROM transitions AS t
    JOIN queue_ext.queues AS q ON q.queue_name = t.queue_name
    WHERE q.notify;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.worker_health()
RETURNS TABLE (
    worker_id           text,
    kind                text,
    jobs_held           bigint,
    completed_last_hour bigint,
    last_seen           timestamptz,
    healthy             boolean
)
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH held AS (
        SELECT j.worker_id, count(*) AS n,
               max(greatest(j.heartbeat_at, j.started_at)) AS last,
               bool_and(j.lease_expires_at <= now()) AS all_expired
        FROM queue_ext.job_queue AS j
        WHERE j.status = 'running' AND j.worker_id IS NOT NULL
        GROUP BY j.worker_id
    ), done AS (
        SELECT a.worker_id, count(*) AS n, max(a.finished_at) AS last
        FROM queue_ext.job_archive AS a
        WHERE a.finished_at > now() - interval '1 hour' AND a.worker_id IS NOT NULL
        GROUP BY a.worker_id
    )
    SELECT coalesce(h.worker_id, d.worker_id), 'sql worker', coalesce(h.n, 0), coalesce(d.n, 0),
           greatest(h.last, d.last), NOT coalesce(h.all_expired, false)
    FROM held AS h FULL JOIN done AS d ON d.worker_id = h.worker_id
    WHERE coalesce(h.worker_id, d.worker_id) <> 'queue_ext-dispatcher'
    UNION ALL
    SELECT 'queue_ext-dispatcher (' || s.database || ')', 'dispatcher', s.in_flight, s.delivered,
           s.last_heartbeat, s.running
    FROM queue_ext.dispatcher_status() AS s
    WHERE s.database = current_database() AND s.state <> 'not_preloaded'
    ORDER BY 1
$$;

CREATE OR REPLACE FUNCTION queue_ext.health() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    reasons text[] := '{}';
    failing boolean := false;
    dispatcher record;
    stuck bigint;
    dead_recent bigint;
    dlq bigint;
    oldest interval;
    stale_workers bigint;
    webhook_backlog bigint;
BEGIN
    SELECT s.running, s.state, s.detail, s.pid INTO dispatcher
    FROM queue_ext.dispatcher_status() AS s
    WHERE s.database = current_database()
    ORDER BY s.running DESC
    LIMIT 1;
    SELECT count(*) INTO webhook_backlog FROM queue_ext.job_queue AS j
    JOIN queue_ext.queues AS q USING (queue_name)
    WHERE q.is_webhook AND NOT q.paused AND j.status IN ('queued', 'retrying') AND j.run_at <= now();
    SELECT count(*) INTO stuck FROM queue_ext.job_queue WHERE status = 'running' AND lease_expires_at < now() - interval '1 minute';
    SELECT count(*), count(*) FILTER (WHERE died_at > now() - interval '1 hour') INTO dlq, dead_recent
    FROM queue_ext.job_dead_letter;
    SELECT now() - min(run_at) INTO oldest FROM queue_ext.job_queue
    WHERE status IN ('queued', 'retrying') AND run_at <= now();
    SELECT count(*) INTO stale_workers FROM queue_ext.worker_health() AS w WHERE NOT w.healthy;

    IF dispatcher.state IN ('not_preloaded', 'not_listed') THEN
        -- No dispatcher by configuration: only a problem when webhook work waits for one.
        IF webhook_backlog > 0 THEN
            failing := true;
            reasons := reasons || format('%s webhook jobs due but no dispatcher (%s); use process_jobs()', webhook_backlog,
                                         CASE dispatcher.state WHEN 'not_listed' THEN 'this database is not in queue_ext.database'
                                              ELSE 'queue_ext is not in shared_preload_libraries' END);
        END IF;
    ELSIF dispatcher.state = 'starting' THEN
        IF webhook_backlog > 0 THEN
            reasons := reasons || format('dispatcher starting; %s webhook jobs due', webhook_backlog);
        END IF;
    ELSIF NOT coalesce(dispatcher.running, false) THEN
        failing := true;
        reasons := reasons || format('dispatcher not running (%s): %s', coalesce(dispatcher.state, 'unknown'),
                                     coalesce(dispatcher.detail, 'no dispatcher reported for this database'));
    END IF;
    IF stuck > 0 THEN
        reasons := reasons || format('%s jobs stuck: lease expired over a minute ago', stuck);
    END IF;
    IF dead_recent > 0 THEN
        reasons := reasons || format('dead letter queue grew by %s in the last hour (%s in all)', dead_recent, dlq);
    END IF;
    IF oldest > interval '5 minutes' THEN
        reasons := reasons || format('oldest runnable job has waited %s', date_trunc('second', oldest));
    END IF;
    IF stale_workers > 0 THEN
        reasons := reasons || format('%s stale workers', stale_workers);
    END IF;
    RETURN jsonb_build_object(
        'status', CASE WHEN failing THEN 'failing' WHEN cardinality(reasons) > 0 THEN 'degraded' ELSE 'ok' END,
        'reasons', to_jsonb(reasons),
        'checks', jsonb_build_object(
            'dispatcher', jsonb_build_object('state', dispatcher.state, 'running', coalesce(dispatcher.running, false),
                                             'pid', dispatcher.pid, 'detail', dispatcher.detail),
            'stuck_jobs', stuck, 'dead_letter', dlq, 'dead_last_hour', dead_recent,
            'oldest_runnable_seconds', coalesce(extract(epoch FROM oldest)::numeric(12, 1), 0),
            'stale_workers', stale_workers, 'webhook_backlog', webhook_backlog),
        'at', now());
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.enqueue_trigger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_NARGS < 1 THEN
        RAISE EXCEPTION 'queue_ext.enqueue_trigger needs the queue name as its argument'
            USING ERRCODE = '22023', HINT = 'EXECUTE FUNCTION queue_ext.enqueue_trigger(''my_queue'')';
    END IF;
    IF TG_LEVEL <> 'ROW' THEN
        RAISE EXCEPTION 'queue_ext.enqueue_trigger must be a FOR EACH ROW trigger' USING ERRCODE = '22023';
    END IF;
    -- It returns NULL, which in a BEFORE trigger would silently skip the row being written
    -- while its job is enqueued.
    IF TG_WHEN <> 'AFTER' THEN
        RAISE EXCEPTION 'queue_ext.enqueue_trigger must be an AFTER trigger' USING ERRCODE = '22023',
            HINT = 'CREATE TRIGGER ... AFTER INSERT OR UPDATE OR DELETE ON ... FOR EACH ROW EXECUTE FUNCTION queue_ext.enqueue_trigger(''my_queue'')';
    END IF;
    PERFORM queue_ext.enqueue_job(TG_ARGV[0], jsonb_build_object(
        'type', TG_OP,
        'table', TG_TABLE_NAME,
        'schema', TG_TABLE_SCHEMA,
        'record', CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE to_jsonb(NEW) END,
        'old_record', CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE to_jsonb(OLD) END));
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.schedule_job(name text, schedule text, queue_name text, payload jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    id bigint;
    limit_bytes bigint := pg_size_bytes(current_setting('queue_ext.max_payload_bytes', true));
BEGIN
    IF schedule_job.name IS NULL OR schedule_job.schedule IS NULL OR schedule_job.queue_name IS NULL
       OR schedule_job.payload IS NULL THEN
        RAISE EXCEPTION 'name, schedule, queue_name and payload must not be null' USING ERRCODE = '22004';
    END IF;
    IF length(schedule_job.name) NOT BETWEEN 1 AND 53 OR octet_length(schedule_job.name) > 53 THEN
        RAISE EXCEPTION 'schedule name must be 1 to 53 bytes long (got %)', octet_length(schedule_job.name)
            USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION 'schedules need the pg_cron extension, which is not installed in this database'
            USING ERRCODE = '55000',
                  HINT = 'Add pg_cron to shared_preload_libraries, set cron.database_name, and CREATE EXTENSION pg_cron.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM queue_ext.queues AS q WHERE q.queue_name = schedule_job.queue_name) THEN
        RAISE EXCEPTION 'queue "%" does not exist', schedule_job.queue_name USING ERRCODE = '42704';
    END IF;
    -- Internal queues take jobs only from the extension (queue_ext._refuse_internal).
    IF schedule_job.queue_name LIKE 'queue\_ext.%' THEN
        RAISE EXCEPTION 'cannot schedule jobs into queue "%": it is internal to queue_ext', schedule_job.queue_name
            USING ERRCODE = '42501';
    END IF;
    IF jsonb_typeof(schedule_job.payload) <> 'object' THEN
        RAISE EXCEPTION 'payload must be a JSON object, not %', jsonb_typeof(schedule_job.payload)
            USING ERRCODE = '22023';
    END IF;
    -- Refused now rather than by every run of the schedule.
    IF pg_column_size(schedule_job.payload) > limit_bytes THEN
        RAISE EXCEPTION 'payload is % bytes, over the limit of % bytes', pg_column_size(schedule_job.payload), limit_bytes
            USING ERRCODE = '54000';
    END IF;
    EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO id
        USING 'queue_ext:' || schedule_job.name, schedule_job.schedule,
              format('SELECT queue_ext.enqueue_job(%L, %L::jsonb)', schedule_job.queue_name, schedule_job.payload);
    RETURN id;
END
$$;

CREATE OR REPLACE FUNCTION queue_ext.unschedule_job(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    done boolean;
BEGIN
    IF unschedule_job.name IS NULL THEN
        RAISE EXCEPTION 'name must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION 'schedules need the pg_cron extension, which is not installed in this database'
            USING ERRCODE = '55000',
                  HINT = 'Add pg_cron to shared_preload_libraries, set cron.database_name, and CREATE EXTENSION pg_cron.';
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM cron.job WHERE jobname = $1 AND username = current_user)'
        INTO done USING 'queue_ext:' || unschedule_job.name;
    IF NOT done THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT cron.unschedule($1)' INTO done USING 'queue_ext:' || unschedule_job.name;
    RETURN done;
END
$$;

-- New functions are created executable by PUBLIC: take that away, as grants.sql does, and
-- grant what a fresh install grants.
REVOKE ALL ON FUNCTION
    queue_ext._wake_launcher_at_commit(),
    queue_ext.dispatcher_status(),
    queue_ext._return_running(text, text, text[]),
    queue_ext._notify(uuid, text, text, integer, real),
    queue_ext._check_interval(text, interval, text, text),
    queue_ext._refuse_internal(text, text),
    queue_ext._may_see_job(name),
    queue_ext._raise_hidden_job(uuid),
    queue_ext._check_queue_settings(integer, interval, interval, interval)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION queue_ext.dispatcher_status() TO queue_ext_worker;
