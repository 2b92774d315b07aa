-- queue_ext 0.5.0 -> 0.6.0: leaner rows on the hot path.
--   * enqueued_by is text instead of name in job_queue, job_archive, job_dead_letter and
--     job_status_history: a name is 64 bytes in every row and every WAL record of it. The
--     four tables are rewritten (ACCESS EXCLUSIVE while it runs: time it on a copy when the
--     archive or the history is large).
--   * An enqueue writes no history row: it is recorded on the job (created_at, enqueued_by).
--     History rows written before this version are kept as they are.
--   * job_status_history has no primary key on id (nothing looks a row up by it); failed
--     attempts, which metrics() counts, have their own small index.
--   * Cheaper CHECK constraints on job_queue and job_archive (PostgreSQL decodes them again
--     for every statement that writes the table): job_queue's two are one, comparisons
--     instead of IN lists, and progress is checked by update_progress(), its only writer.
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.6.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.6.0'" to load this file. \quit

-- The producers' policies read enqueued_by: a column's type cannot change under them.
DROP POLICY producer_own_jobs ON queue_ext.job_queue;
DROP POLICY producer_own_jobs ON queue_ext.job_archive;
DROP POLICY producer_own_jobs ON queue_ext.job_dead_letter;
DROP POLICY producer_own_jobs ON queue_ext.job_status_history;
ALTER TABLE queue_ext.job_queue
    ALTER COLUMN enqueued_by TYPE text,
    DROP CONSTRAINT job_queue_progress_check,
    DROP CONSTRAINT job_queue_status_check,
    DROP CONSTRAINT running_has_lease,
    ADD CONSTRAINT job_queue_live_state
        CHECK (status <= 'running' AND (status <> 'running' OR (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)));
ALTER TABLE queue_ext.job_archive
    ALTER COLUMN enqueued_by TYPE text,
    DROP CONSTRAINT job_archive_status_check,
    ADD CONSTRAINT job_archive_status_check CHECK (status = 'completed' OR status = 'cancelled');
ALTER TABLE queue_ext.job_dead_letter    ALTER COLUMN enqueued_by TYPE text;
ALTER TABLE queue_ext.job_status_history ALTER COLUMN enqueued_by TYPE text;
CREATE POLICY producer_own_jobs ON queue_ext.job_queue FOR SELECT
    TO queue_ext_producer USING (enqueued_by = current_user);
CREATE POLICY producer_own_jobs ON queue_ext.job_archive FOR SELECT
    TO queue_ext_producer USING (enqueued_by = current_user);
CREATE POLICY producer_own_jobs ON queue_ext.job_dead_letter FOR SELECT
    TO queue_ext_producer USING (enqueued_by = current_user);
CREATE POLICY producer_own_jobs ON queue_ext.job_status_history FOR SELECT
    TO queue_ext_producer USING (enqueued_by = current_user);

ALTER TABLE queue_ext.job_status_history DROP CONSTRAINT job_status_history_pkey;
CREATE INDEX job_status_history_failures_idx ON queue_ext.job_status_history (at)
    WHERE from_status = 'running' AND to_status IN ('retrying', 'dead');
ALTER TABLE queue_ext.job_status_history REPLICA IDENTITY FULL;
COMMENT ON TABLE queue_ext.job_status_history IS 'Audit trail: one row per status transition of every job after its enqueue (recorded on the job itself: created_at, enqueued_by).';

-- Every function whose definition changed or that is new, as in sql/.
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
    IF delay IS NOT NULL THEN
        PERFORM queue_ext._check_interval('delay', delay, '0', '100 years');
    END IF;
    RETURN coalesce(run_at, now() + delay, now());
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
    who text := queue_ext._invoker();
    start timestamptz := queue_ext._start_time(enqueue_jobs.run_at, enqueue_jobs.delay);
    prio queue_ext.job_priority := queue_ext._priority(enqueue_jobs.priority);
    slots queue_ext.concurrency_limits;
    free integer;  -- how many of the batch get a slot now; NULL: all
    ids uuid[];
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

    IF (free IS NOT NULL AND free = 0) OR start > now() THEN
        NULL;
    ELSIF q.is_webhook THEN
        PERFORM queue_ext._wake_dispatcher_at_commit();
    ELSIF NOT queue_ext._announce_at_commit(q.queue_name) THEN
        PERFORM pg_notify('queue_ext_jobs', q.queue_name);
    END IF;
    -- The ids first, in payload order (v7 ids made in one backend increase), then one INSERT
    -- with no RETURNING and no sort: the statement the batch costs is the insert alone.
    ids := ARRAY(SELECT queue_ext.uuid_generate_v7() FROM generate_series(1, cardinality(enqueue_jobs.payloads)));
    INSERT INTO queue_ext.job_queue (id, queue_name, payload, priority, status, run_at, max_attempts, enqueued_by,
                                     rate_limit_key, concurrency_key)
    SELECT u.id, q.queue_name, u.p, prio,
           CASE WHEN free IS NULL OR u.i <= free THEN 'queued' ELSE 'waiting' END::queue_ext.job_state,
           start, coalesce(enqueue_jobs.max_attempts, q.max_attempts), who,
           enqueue_jobs.rate_limit_key, enqueue_jobs.concurrency_key
    FROM unnest(ids, enqueue_jobs.payloads) WITH ORDINALITY AS u(id, p, i);
    IF q.notify THEN
        -- The enqueue has no history row to publish it (see enqueue_job).
        PERFORM queue_ext._notify(u.id, q.queue_name,
                                  CASE WHEN free IS NULL OR u.i <= free THEN 'queued' ELSE 'waiting' END, 0, NULL)
        FROM unnest(ids) WITH ORDINALITY AS u(id, i);
    END IF;
    RETURN QUERY SELECT unnest(ids);
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
                  CASE WHEN t.cancel_requested IS NULL THEN 'completed' ELSE 'cancelled' END::queue_ext.job_state AS final,
                  CASE WHEN t.cancel_requested IS NOT NULL OR q.has_callback
                         OR EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = t.id)
                       THEN t END AS follow_job
    ), archived AS (
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            worker_id, result, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at, started_at,
            rate_limit_key, concurrency_key)
        SELECT id, queue_name, payload, priority, final, attempt, max_attempts, worker_id, new_result,
               coalesce(cancel_requested, last_error), errors, CASE WHEN final = 'completed' THEN 100 ELSE progress END,
               progress_details, enqueued_by, created_at, run_at, started_at, rate_limit_key, concurrency_key
        FROM done WHERE kept
    ), history AS (
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
        SELECT id, queue_name, 'running', final, attempt, worker_id, cancel_requested, enqueued_by FROM done WHERE kept
    )
    -- (A row value IS NOT NULL only when every field is: IS DISTINCT FROM NULL asks whether
    -- there is a row at all.)
    SELECT array_agg(id), array_agg(final), array_agg(queue_name),
           array_agg(follow_job) FILTER (WHERE follow_job IS DISTINCT FROM NULL),
           array_agg(final) FILTER (WHERE follow_job IS DISTINCT FROM NULL),
           array_agg(new_result) FILTER (WHERE follow_job IS DISTINCT FROM NULL),
           array_agg(has_callback) FILTER (WHERE follow_job IS DISTINCT FROM NULL)
    INTO done_ids, done_states, done_queues, follow, follow_states, follow_results, follow_callbacks
    FROM done;
    PERFORM queue_ext._count_at_commit(u.q, 'completed', count(*))
    FROM unnest(done_queues, done_states) AS u(q, s) WHERE u.s = 'completed' GROUP BY u.q;

    -- The rest is per job, and rare: dependents to release or cancel, callbacks to send.
    FOR k IN 1 .. coalesce(cardinality(follow), 0) LOOP
        IF follow_states[k] = 'completed' THEN
            PERFORM queue_ext._release_dependents(follow[k].id);
        ELSE
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

CREATE OR REPLACE FUNCTION queue_ext._emit_callback(j queue_ext.job_queue, event text, result jsonb) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    new_id uuid := queue_ext.uuid_generate_v7();
BEGIN
    INSERT INTO queue_ext.job_queue (id, queue_name, payload, priority, max_attempts, enqueued_by)
    VALUES (new_id, 'queue_ext.callbacks',
            jsonb_build_object(
                'type', event,
                'job_id', j.id,
                'queue', j.queue_name,
                'status', CASE event WHEN 'job.completed' THEN 'completed' WHEN 'job.dead' THEN 'dead'
                                     WHEN 'job.cancelled' THEN 'cancelled' ELSE 'retrying' END,
                'attempt', j.attempt,
                'max_attempts', j.max_attempts,
                'result', result,
                'error', CASE WHEN event = 'job.completed' THEN NULL ELSE j.last_error END,
                'at', now()),
            j.priority, 10, j.enqueued_by);
    PERFORM queue_ext._wake_dispatcher_at_commit();
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._dispatch_claim(worker_id text, capacity integer, busy jsonb, only_queue text,
                                          default_timeout interval)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
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
        -- A queue with nothing to send costs a probe of its claim index, not a claim. (Here,
        -- one queue at a time: as a condition of the loop's query, the planner hashed every
        -- runnable job of every queue on each turn, 8.6 ms a turn with 60,000 queued.)
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                                  WHERE j.queue_name = t.queue_name AND j.status IN ('queued', 'retrying')
                                    AND j.rate_limit_key IS NULL AND j.run_at <= now())
                  AND NOT EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                                  WHERE j.queue_name = t.queue_name AND j.status IN ('queued', 'retrying')
                                    AND j.rate_limit_key IS NOT NULL AND j.run_at <= now());
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

CREATE OR REPLACE FUNCTION queue_ext._publish_transitions() RETURNS trigger
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
    -- (job_status_history_failures_idx holds exactly these).
    failures AS (
        SELECT h.queue_name, count(*) AS n
        FROM queue_ext.job_status_history AS h, since
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

-- metrics() no longer searches the history by id.
DROP FUNCTION queue_ext._history_since(timestamptz);
