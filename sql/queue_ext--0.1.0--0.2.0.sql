-- queue_ext 0.1.0 -> 0.2.0: per-key rate limits and concurrency limits (strict FIFO groups),
-- and a lighter hot path (internal helpers without their own search_path switch).
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.2.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.2.0'" to load this file. \quit

-- New columns go last, where a fresh install also puts them.
ALTER TABLE queue_ext.job_queue ADD COLUMN rate_limit_key text, ADD COLUMN concurrency_key text;
ALTER TABLE queue_ext.job_archive ADD COLUMN rate_limit_key text, ADD COLUMN concurrency_key text;
ALTER TABLE queue_ext.job_dead_letter ADD COLUMN rate_limit_key text, ADD COLUMN concurrency_key text;

-- The claim index leaves rate-limited jobs to their own index.
DROP INDEX queue_ext.job_queue_claim_idx;
CREATE INDEX job_queue_claim_idx ON queue_ext.job_queue (queue_name, priority DESC, run_at, id)
    WHERE status IN ('queued', 'retrying') AND rate_limit_key IS NULL;
CREATE INDEX job_queue_rate_claim_idx ON queue_ext.job_queue (queue_name, rate_limit_key, priority DESC, run_at, id)
    WHERE status IN ('queued', 'retrying') AND rate_limit_key IS NOT NULL;
-- Jobs held for a slot of their concurrency key, in the order they are admitted.
CREATE INDEX job_queue_key_waiting_idx ON queue_ext.job_queue (concurrency_key, id)
    WHERE status = 'waiting' AND concurrency_key IS NOT NULL;

-- Limits: tables, helpers, the slot trigger, the API (as in sql/limits.sql).
-- Per-key limits, across every worker and queue.
--
-- Rate limits (set_rate_limit): jobs enqueued with a rate_limit_key are claimed no faster
-- than max_jobs per `per`. A token bucket per key, refilled continuously, holding at most
-- `burst` whole tokens; each claim spends one token per job inside the claim statement, so
-- the limit holds however many workers claim: in any window of length `per` at most
-- max_jobs + burst jobs start, and over time exactly max_jobs per `per`. Rate-limited jobs have their own claim index and
-- claims visit only keys that have a token: a key out of tokens costs the claim nothing.
--
-- Concurrency limits (set_concurrency_limit): at most max_running jobs with the same
-- concurrency_key hold a slot at once. A job takes its slot when it is admitted (enqueued,
-- or released by its dependencies) and keeps it while queued, running and retrying, until
-- it leaves job_queue; jobs beyond the limit wait ('waiting') and are admitted in enqueue
-- order as slots free. With max_running = 1 the key's jobs run one at a time in enqueue
-- order, a failed job retrying before the next one starts: a strict FIFO group. The claim
-- path never sees a job without a slot, so it pays nothing for this.
--
-- Every change to a key's slots happens under the lock of its concurrency_limits row, taken
-- by an UPDATE: concurrent admissions and releases of a key run one after the other, and a
-- REPEATABLE READ caller gets a serialization failure rather than a stale count.

CREATE TABLE queue_ext.rate_limits (
    key         text             PRIMARY KEY CHECK (key <> '' AND length(key) <= 200),
    max_jobs    integer          NOT NULL CHECK (max_jobs > 0),
    per         interval         NOT NULL CHECK (per > interval '0'),
    burst       integer          NOT NULL DEFAULT 1 CHECK (burst > 0),
    tokens      double precision NOT NULL,   -- as of refilled_at
    refilled_at timestamptz      NOT NULL DEFAULT now(),
    created_at  timestamptz      NOT NULL DEFAULT now()
);
COMMENT ON TABLE queue_ext.rate_limits IS 'Token bucket per rate_limit_key: claims of its jobs are paced to max_jobs per `per`.';

CREATE TABLE queue_ext.concurrency_limits (
    key         text        PRIMARY KEY CHECK (key <> '' AND length(key) <= 200),
    max_running integer     CHECK (max_running > 0),       -- NULL: no limit (the key is only counted)
    active      integer     NOT NULL DEFAULT 0 CHECK (active >= 0),  -- jobs holding a slot
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE queue_ext.concurrency_limits IS 'Slots per concurrency_key; a row appears when a key is first used.';

SELECT pg_catalog.pg_extension_config_dump('queue_ext.rate_limits', '');
SELECT pg_catalog.pg_extension_config_dump('queue_ext.concurrency_limits', '');

-- Tokens a bucket holds now (fractional). Whole tokens are capped at `burst`, but the
-- fraction towards the next one is kept: a claim that comes a little after its token was
-- due does not push every later token back, so busy workers sustain the full rate.
CREATE FUNCTION queue_ext._tokens(r queue_ext.rate_limits) RETURNS double precision
LANGUAGE sql STABLE
AS $$
    SELECT least(r.burst + 0.999,
                 r.tokens + greatest(0, extract(epoch FROM now() - r.refilled_at))
                            * r.max_jobs / extract(epoch FROM r.per))
$$;

CREATE FUNCTION queue_ext._check_key(what text, key text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF key IS NOT NULL AND (key = '' OR length(key) > 200) THEN
        RAISE EXCEPTION '% must be 1 to 200 characters (got %)', what, length(key) USING ERRCODE = '22023';
    END IF;
END
$$;

-- Validates the limit keys of a new job; a rate limit must exist before jobs name it.
CREATE FUNCTION queue_ext._check_limit_keys(rate_limit_key text, concurrency_key text) RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    PERFORM queue_ext._check_key('rate_limit_key', rate_limit_key);
    PERFORM queue_ext._check_key('concurrency_key', concurrency_key);
    IF rate_limit_key IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM queue_ext.rate_limits AS r WHERE r.key = rate_limit_key) THEN
        RAISE EXCEPTION 'rate limit "%" does not exist', rate_limit_key USING ERRCODE = '42704',
            HINT = 'Create it first with queue_ext.set_rate_limit(key, max_jobs, per).';
    END IF;
END
$$;

-- Locks a key's slot row (creating it on first use) and returns it as it is now.
CREATE FUNCTION queue_ext._lock_key(key text) RETURNS queue_ext.concurrency_limits
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c queue_ext.concurrency_limits;
BEGIN
    LOOP
        UPDATE queue_ext.concurrency_limits AS l SET updated_at = now() WHERE l.key = _lock_key.key RETURNING * INTO c;
        EXIT WHEN FOUND;
        INSERT INTO queue_ext.concurrency_limits (key) VALUES (_lock_key.key) ON CONFLICT DO NOTHING;
    END LOOP;
    RETURN c;
END
$$;

-- Takes a slot of `key` for a job being admitted; false when the key is at its limit (the
-- job then waits). Keeps the key locked until the transaction ends.
CREATE FUNCTION queue_ext._take_slot(key text) RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c queue_ext.concurrency_limits := queue_ext._lock_key(key);
BEGIN
    IF c.max_running IS NOT NULL AND c.active >= c.max_running THEN
        RETURN false;
    END IF;
    UPDATE queue_ext.concurrency_limits AS l SET active = l.active + 1 WHERE l.key = _take_slot.key;
    RETURN true;
END
$$;

-- Admits waiting jobs of `key` (those no dependency holds) into free slots, oldest first.
-- The caller holds the key's lock. Returns how many it admitted.
CREATE FUNCTION queue_ext._admit_waiting(key text) RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c queue_ext.concurrency_limits;
    admitted integer;
    wake boolean;
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
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, enqueued_by)
        SELECT id, queue_name, 'waiting', 'queued', attempt, enqueued_by FROM admitted
    )
    SELECT count(*), coalesce(bool_or(q.is_webhook), false) INTO admitted, wake
    FROM admitted AS a JOIN queue_ext.queues AS q ON q.queue_name = a.queue_name;
    IF admitted > 0 THEN
        UPDATE queue_ext.concurrency_limits AS l SET active = l.active + admitted WHERE l.key = _admit_waiting.key;
    END IF;
    IF wake THEN
        PERFORM queue_ext._wake_dispatcher_at_commit();
    END IF;
    RETURN admitted;
END
$$;

-- A job holding a slot left job_queue (completed, dead, cancelled, dropped): free the slot
-- and admit the next waiting job of the key, in the same transaction.
CREATE FUNCTION queue_ext._slot_freed() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    c queue_ext.concurrency_limits;
BEGIN
    -- The UPDATE takes the key's lock (the row exists: the job took a slot from it).
    UPDATE queue_ext.concurrency_limits AS l SET active = greatest(l.active - 1, 0), updated_at = now()
    WHERE l.key = OLD.concurrency_key
    RETURNING * INTO c;
    IF (c.max_running IS NULL OR c.active < c.max_running)
       AND EXISTS (SELECT 1 FROM queue_ext.job_queue AS t
                   WHERE t.concurrency_key = OLD.concurrency_key AND t.status = 'waiting') THEN
        PERFORM queue_ext._admit_waiting(OLD.concurrency_key);
    END IF;
    RETURN NULL;
END
$$;

-- Fires only for slot holders: other deletions pay only for the WHEN test.
CREATE TRIGGER job_queue_slot_freed AFTER DELETE ON queue_ext.job_queue
    FOR EACH ROW WHEN (OLD.concurrency_key IS NOT NULL AND OLD.status <> 'waiting')
    EXECUTE FUNCTION queue_ext._slot_freed();

-- Creates or changes the rate limit of `key`: at most max_jobs claims per `per`, with up
-- to `burst` back to back after a quiet spell (the default 1 spaces claims evenly).
CREATE FUNCTION queue_ext.set_rate_limit(key text, max_jobs integer, per interval DEFAULT interval '1 second',
                                         burst integer DEFAULT 1)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF set_rate_limit.key IS NULL OR set_rate_limit.max_jobs IS NULL OR set_rate_limit.per IS NULL
       OR set_rate_limit.burst IS NULL THEN
        RAISE EXCEPTION 'key, max_jobs, per and burst must not be null' USING ERRCODE = '22004';
    END IF;
    PERFORM queue_ext._check_key('key', set_rate_limit.key);
    IF set_rate_limit.max_jobs < 1 THEN
        RAISE EXCEPTION 'max_jobs must be at least 1 (got %)', set_rate_limit.max_jobs USING ERRCODE = '22023';
    END IF;
    IF set_rate_limit.per <= interval '0' THEN
        RAISE EXCEPTION 'per must be a positive interval (got %)', set_rate_limit.per USING ERRCODE = '22023';
    END IF;
    IF set_rate_limit.burst < 1 THEN
        RAISE EXCEPTION 'burst must be at least 1 (got %)', set_rate_limit.burst USING ERRCODE = '22023';
    END IF;
    INSERT INTO queue_ext.rate_limits AS r (key, max_jobs, per, burst, tokens)
    VALUES (set_rate_limit.key, set_rate_limit.max_jobs, set_rate_limit.per, set_rate_limit.burst, set_rate_limit.burst)
    ON CONFLICT ON CONSTRAINT rate_limits_pkey DO UPDATE
    SET max_jobs = excluded.max_jobs, per = excluded.per, burst = excluded.burst,
        tokens = least(queue_ext._tokens(r), excluded.burst), refilled_at = greatest(r.refilled_at, now());
END
$$;

-- Removes a rate limit. Refused while live jobs name it (they could never be claimed).
CREATE FUNCTION queue_ext.remove_rate_limit(key text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    live bigint;
BEGIN
    -- Lock first, so that no enqueue can name the key between the count and the delete.
    PERFORM 1 FROM queue_ext.rate_limits AS r WHERE r.key = remove_rate_limit.key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    SELECT count(*) INTO live FROM queue_ext.job_queue AS j WHERE j.rate_limit_key = remove_rate_limit.key;
    IF live > 0 THEN
        RAISE EXCEPTION 'rate limit "%" is still used by % live jobs', remove_rate_limit.key, live
            USING ERRCODE = '55006', HINT = 'Wait for them to finish, or cancel them first.';
    END IF;
    DELETE FROM queue_ext.rate_limits AS r WHERE r.key = remove_rate_limit.key;
    RETURN true;
END
$$;

-- Sets how many jobs of `key` may hold a slot (be queued, running or retrying) at once;
-- NULL removes the limit. Raising it admits waiting jobs at once; lowering it lets the
-- jobs already admitted finish.
CREATE FUNCTION queue_ext.set_concurrency_limit(key text, max_running integer) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF set_concurrency_limit.key IS NULL THEN
        RAISE EXCEPTION 'key must not be null' USING ERRCODE = '22004';
    END IF;
    PERFORM queue_ext._check_key('key', set_concurrency_limit.key);
    IF set_concurrency_limit.max_running < 1 THEN
        RAISE EXCEPTION 'max_running must be at least 1, or NULL for no limit (got %)',
            set_concurrency_limit.max_running USING ERRCODE = '22023';
    END IF;
    PERFORM queue_ext._lock_key(set_concurrency_limit.key);
    UPDATE queue_ext.concurrency_limits AS l SET max_running = set_concurrency_limit.max_running
    WHERE l.key = set_concurrency_limit.key;
    PERFORM queue_ext._admit_waiting(set_concurrency_limit.key);
END
$$;

-- Limits in force, with what they hold back now.
CREATE FUNCTION queue_ext.list_limits()
RETURNS TABLE (kind text, key text, max_jobs integer, per interval, burst integer, tokens double precision,
               max_running integer, active integer, waiting bigint, runnable bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'rate', r.key, r.max_jobs, r.per, r.burst, queue_ext._tokens(r), NULL, NULL, NULL,
           (SELECT count(*) FROM queue_ext.job_queue AS j
            WHERE j.rate_limit_key = r.key AND j.status IN ('queued', 'retrying') AND j.run_at <= now())
    FROM queue_ext.rate_limits AS r
    UNION ALL
    SELECT 'concurrency', c.key, NULL, NULL, NULL, NULL, c.max_running, c.active,
           (SELECT count(*) FROM queue_ext.job_queue AS j WHERE j.concurrency_key = c.key AND j.status = 'waiting'),
           NULL
    FROM queue_ext.concurrency_limits AS c
    WHERE c.max_running IS NOT NULL OR c.active > 0
    ORDER BY 1, 2
$$;

-- How long until a rate-limited webhook job can next be claimed, for the dispatcher's sleep
-- (NULL when none is held back by its rate limit).
CREATE FUNCTION queue_ext._rate_limit_wait() RETURNS interval
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT min(make_interval(secs => greatest(0, 1 - queue_ext._tokens(r)) * extract(epoch FROM r.per) / r.max_jobs))
    FROM queue_ext.rate_limits AS r
    WHERE EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                  JOIN queue_ext.queues AS q ON q.queue_name = j.queue_name AND q.is_webhook AND NOT q.paused
                  WHERE j.rate_limit_key = r.key AND j.status IN ('queued', 'retrying') AND j.run_at <= now())
$$;

-- enqueue_job and enqueue_jobs take rate_limit_key and concurrency_key: new signatures.
DROP FUNCTION queue_ext.enqueue_job(text, jsonb, text, timestamptz, interval, integer, text, uuid[]);
DROP FUNCTION queue_ext.enqueue_jobs(text, jsonb[], text, timestamptz, interval, integer);

-- Every function whose definition changed, as in sql/.
-- from sql/internal.sql
-- The role that called us. Inside a SECURITY DEFINER function current_user is the owner,
-- so we read the session's active role instead (SET ROLE, as PostgREST does, included).
CREATE OR REPLACE FUNCTION queue_ext._invoker() RETURNS name
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN current_setting('role') = 'none' THEN session_user
                ELSE current_setting('role')::name END
$$;

-- from sql/internal.sql
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
        RAISE EXCEPTION 'queue "%" does not exist', _queue.queue_name
            USING ERRCODE = '42704', HINT = 'Create it with queue_ext.create_queue().';
    END IF;
    RETURN q;
END
$$;

-- from sql/internal.sql
CREATE OR REPLACE FUNCTION queue_ext._priority(priority text) RETURNS queue_ext.job_priority
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

-- from sql/internal.sql
-- Checks one payload; position names it in a batch error.
CREATE OR REPLACE FUNCTION queue_ext._check_payload(payload jsonb, item integer DEFAULT NULL) RETURNS void
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

-- from sql/internal.sql
-- When a job should start, from the enqueue options.
CREATE OR REPLACE FUNCTION queue_ext._start_time(run_at timestamptz, delay interval) RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
BEGIN
    IF run_at IS NOT NULL AND delay IS NOT NULL THEN
        RAISE EXCEPTION 'give run_at or delay, not both' USING ERRCODE = '22023';
    END IF;
    IF delay IS NOT NULL AND delay < interval '0' THEN
        RAISE EXCEPTION 'delay must not be negative (got %)', delay USING ERRCODE = '22023';
    END IF;
    RETURN coalesce(run_at, now() + delay, now());
END
$$;

-- from sql/internal.sql
CREATE OR REPLACE FUNCTION queue_ext._check_max_attempts(max_attempts integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    IF max_attempts IS NOT NULL AND (max_attempts < 1 OR max_attempts > 1000) THEN
        RAISE EXCEPTION 'max_attempts must be between 1 and 1000 (got %)', max_attempts USING ERRCODE = '22023';
    END IF;
END
$$;

-- from sql/internal.sql
-- Exponential backoff with jitter: min(base * 2^(attempt-1), cap), then a random point in
-- its upper half, so that jobs failing together do not come back together.
CREATE OR REPLACE FUNCTION queue_ext._backoff(base interval, cap interval, attempt integer) RETURNS interval
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $$
    SELECT d * (0.5 + random() * 0.5)
    FROM (SELECT least(base * power(2, least(greatest(attempt, 1) - 1, 40)), cap) AS d) AS s
$$;

-- from sql/queues.sql
-- Refuses while the queue holds live jobs, unless force: then its live jobs are cancelled
-- into the archive (not silently deleted) and its dead letters stay for inspection.
CREATE OR REPLACE FUNCTION queue_ext.drop_queue(queue_name text, force boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    live bigint;
BEGIN
    PERFORM queue_ext._queue(drop_queue.queue_name);
    IF drop_queue.queue_name LIKE 'queue\_ext.%' THEN
        RAISE EXCEPTION 'queue "%" belongs to queue_ext and cannot be dropped', drop_queue.queue_name USING ERRCODE = '42939';
    END IF;
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
    )
    INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
    SELECT id, queue_name, status, 'cancelled', attempt, worker_id, 'queue dropped', enqueued_by FROM gone;
    DELETE FROM queue_ext.webhook_targets WHERE queue_name = drop_queue.queue_name;
    DELETE FROM queue_ext.queues WHERE queue_name = drop_queue.queue_name;
END
$$;

-- from sql/jobs.sql
CREATE FUNCTION queue_ext.enqueue_job(
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
    PERFORM queue_ext._check_payload(enqueue_job.payload);
    IF enqueue_job.max_attempts IS NOT NULL THEN
        PERFORM queue_ext._check_max_attempts(enqueue_job.max_attempts);
    END IF;
    IF enqueue_job.rate_limit_key IS NOT NULL OR enqueue_job.concurrency_key IS NOT NULL THEN
        PERFORM queue_ext._check_limit_keys(enqueue_job.rate_limit_key, enqueue_job.concurrency_key);
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
            ON CONFLICT (queue_name, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING;
            EXIT WHEN FOUND;
            SELECT id INTO existing FROM queue_ext.job_queue
            WHERE queue_name = q.queue_name AND dedupe_key = enqueue_job.dedupe_key;
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
    INSERT INTO queue_ext.job_status_history (job_id, queue_name, to_status, attempt, enqueued_by)
    VALUES (new_id, q.queue_name, initial, 0, who);
    IF q.is_webhook AND initial = 'queued' THEN
        PERFORM queue_ext._wake_dispatcher_at_commit();
    END IF;
    RETURN new_id;
END
$$;

-- from sql/jobs.sql
-- Many jobs in one call and one statement; ids come back in payload order.
CREATE FUNCTION queue_ext.enqueue_jobs(
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
BEGIN
    PERFORM queue_ext._check_max_attempts(enqueue_jobs.max_attempts);
    PERFORM queue_ext._check_limit_keys(enqueue_jobs.rate_limit_key, enqueue_jobs.concurrency_key);
    IF enqueue_jobs.payloads IS NULL THEN
        RAISE EXCEPTION 'payloads must not be null' USING ERRCODE = '22004';
    END IF;
    -- Validate all before inserting any, so an error names the first bad payload.
    PERFORM queue_ext._check_payload(p, i::integer)
    FROM unnest(enqueue_jobs.payloads) WITH ORDINALITY AS u(p, i);
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
    RETURN QUERY
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
        SELECT id, q.queue_name, status, 0, who FROM new_jobs
    )
    -- v7 ids generated in insertion order sort in payload order.
    SELECT id FROM new_jobs ORDER BY id;
END
$$;

-- from sql/jobs.sql
-- Claims up to n runnable jobs from one queue: highest priority first, then the oldest
-- run_at. SKIP LOCKED lets concurrent claimers pass each other's rows instead of waiting,
-- and the row lock plus the status change mean no job is handed out twice.
CREATE OR REPLACE FUNCTION queue_ext.get_next_jobs(
    queue_name text,
    n          integer,
    worker_id  text     DEFAULT NULL,
    lease      interval DEFAULT NULL
) RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q queue_ext.queues := queue_ext._queue(get_next_jobs.queue_name);
    lease_for interval := coalesce(get_next_jobs.lease, q.lease_duration);
BEGIN
    IF get_next_jobs.n IS NULL OR get_next_jobs.n < 1 THEN
        RAISE EXCEPTION 'n must be at least 1 (got %)', coalesce(get_next_jobs.n::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF lease_for <= interval '0' THEN
        RAISE EXCEPTION 'lease must be positive (got %)', lease_for USING ERRCODE = '22023';
    END IF;
    IF q.paused THEN
        RETURN;
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
        FROM next
        WHERE j.id = next.id
        RETURNING j.*, next.old_status
    ), history AS (
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT id, queue_name, old_status, 'running', attempt, worker_id, enqueued_by FROM claimed
    )
    SELECT id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at, created_at
    FROM claimed
    ORDER BY priority DESC, run_at, id;
END
$$;

-- from sql/jobs.sql
-- Claims from several queues at once; queue_names NULL means every queue. Each queue
-- contributes its best n candidates (through the claim index), then the best n overall win.
-- Candidates not chosen stay locked only until the caller's transaction ends.
CREATE OR REPLACE FUNCTION queue_ext.get_next_jobs(
    queue_names text[],
    n           integer,
    worker_id   text     DEFAULT NULL,
    lease       interval DEFAULT NULL
) RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    unknown text;
BEGIN
    IF get_next_jobs.n IS NULL OR get_next_jobs.n < 1 THEN
        RAISE EXCEPTION 'n must be at least 1 (got %)', coalesce(get_next_jobs.n::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF get_next_jobs.lease <= interval '0' THEN
        RAISE EXCEPTION 'lease must be positive (got %)', get_next_jobs.lease USING ERRCODE = '22023';
    END IF;
    SELECT u.name INTO unknown
    FROM unnest(get_next_jobs.queue_names) AS u(name)
    WHERE NOT EXISTS (SELECT 1 FROM queue_ext.queues AS t WHERE t.queue_name = u.name)
    LIMIT 1;
    IF FOUND THEN
        PERFORM queue_ext._queue(unknown);
    END IF;
    IF EXISTS (SELECT 1 FROM queue_ext.rate_limits)
       AND EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                   WHERE (get_next_jobs.queue_names IS NULL OR j.queue_name = ANY (get_next_jobs.queue_names))
                     AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NOT NULL) THEN
        RETURN QUERY SELECT * FROM queue_ext._claim_limited(get_next_jobs.queue_names, get_next_jobs.n,
                                                            get_next_jobs.worker_id, get_next_jobs.lease);
        RETURN;
    END IF;
    RETURN QUERY
    WITH candidates AS (
        SELECT c.id, c.status AS old_status, c.priority, c.run_at, q.lease_duration
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
        WHERE NOT q.paused
          AND (get_next_jobs.queue_names IS NULL OR q.queue_name = ANY (get_next_jobs.queue_names))
    ), next AS (
        SELECT * FROM candidates ORDER BY priority DESC, run_at, id LIMIT get_next_jobs.n
    ), claimed AS (
        UPDATE queue_ext.job_queue AS j
        SET status = 'running',
            attempt = j.attempt + 1,
            lease_token = gen_random_uuid(),
            lease_expires_at = now() + coalesce(get_next_jobs.lease, next.lease_duration),
            worker_id = get_next_jobs.worker_id,
            started_at = coalesce(j.started_at, now())
        FROM next
        WHERE j.id = next.id
        RETURNING j.*, next.old_status
    ), history AS (
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT id, queue_name, old_status, 'running', attempt, worker_id, enqueued_by FROM claimed
    )
    SELECT id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at, created_at
    FROM claimed
    ORDER BY priority DESC, run_at, id;
END
$$;

-- from sql/jobs.sql
-- The claim when rate limits exist: as above, plus the jobs of every rate-limited key that
-- has tokens (at most as many as it has), and one token spent per job claimed. The bucket
-- update re-checks the tokens on the newest row version, so concurrent claimers cannot
-- overspend: a key whose tokens went meanwhile has none of its jobs claimed this time.
-- queue_names NULL means every queue; lease NULL means each queue's own.
-- jit = off: the planner cannot know how few rows the per-key LIMITs yield, overestimates
-- the statement's cost and JIT-compiles it on every call (measured: 66 ms of a 70 ms claim).
CREATE FUNCTION queue_ext._claim_limited(queue_names text[], n integer, worker_id text, lease interval)
RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE
SET jit = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH open_queues AS (
        SELECT q.queue_name, q.lease_duration FROM queue_ext.queues AS q
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
            lease_expires_at = now() + coalesce(_claim_limited.lease, o.lease_duration),
            worker_id = _claim_limited.worker_id,
            started_at = coalesce(j.started_at, now())
        FROM next, open_queues AS o
        WHERE j.id = next.id AND o.queue_name = j.queue_name
          AND (next.rate_key IS NULL OR next.rate_key IN (SELECT s.key FROM spent AS s))
        RETURNING j.*, next.old_status
    ), history AS (
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT id, queue_name, old_status, 'running', attempt, worker_id, enqueued_by FROM claimed
    )
    SELECT id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at, created_at
    FROM claimed
    ORDER BY priority DESC, run_at, id;
END
$$;

-- from sql/jobs.sql
-- One job. Plain SQL wrappers without a SET clause of their own (get_next_jobs pins the
-- path), so that they cost no more than a call to get_next_jobs.
CREATE OR REPLACE FUNCTION queue_ext.get_next_job(queue_name text, worker_id text DEFAULT NULL, lease interval DEFAULT NULL)
RETURNS SETOF queue_ext.claimed_job
LANGUAGE sql VOLATILE
AS $$ SELECT * FROM queue_ext.get_next_jobs(queue_name, 1, worker_id, lease) $$;

-- from sql/jobs.sql
CREATE OR REPLACE FUNCTION queue_ext.get_next_job(queue_names text[], worker_id text DEFAULT NULL, lease interval DEFAULT NULL)
RETURNS SETOF queue_ext.claimed_job
LANGUAGE sql VOLATILE
AS $$ SELECT * FROM queue_ext.get_next_jobs(queue_names, 1, worker_id, lease) $$;

-- from sql/jobs.sql
-- Completes a running job if the lease allows. Returns its new state ('completed', or
-- 'cancelled' when cancel_job() was called while it ran), or NULL when it matched no
-- running job. The dispatcher uses this directly (a refused result is logged, not
-- raised); complete_job raises instead.
CREATE OR REPLACE FUNCTION queue_ext._complete(job_id uuid, result jsonb, lease_token uuid) RETURNS queue_ext.job_state
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    j queue_ext.job_queue;
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
    final := CASE WHEN j.cancel_requested IS NULL THEN 'completed' ELSE 'cancelled' END;
    INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
        worker_id, result, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at, started_at,
        rate_limit_key, concurrency_key)
    VALUES (j.id, j.queue_name, j.payload, j.priority, final, j.attempt, j.max_attempts,
        j.worker_id, _complete.result, coalesce(j.cancel_requested, j.last_error), j.errors,
        CASE WHEN final = 'completed' THEN 100 ELSE j.progress END, j.progress_details,
        j.enqueued_by, j.created_at, j.run_at, j.started_at, j.rate_limit_key, j.concurrency_key);
    INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
    VALUES (j.id, j.queue_name, 'running', final, j.attempt, j.worker_id, j.cancel_requested, j.enqueued_by);
    IF final = 'completed' THEN
        -- Most jobs have no dependents: one index probe instead of a call. (An enqueue that
        -- adds a dependent holds a lock on this job's row, which our DELETE waited for.)
        IF EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = j.id) THEN
            PERFORM queue_ext._release_dependents(j.id);
        END IF;
    ELSE
        PERFORM queue_ext._cancel_dependents(j.id, format('dependency %s was cancelled', j.id));
    END IF;
    IF (SELECT has_callback FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name) THEN
        PERFORM queue_ext._emit_callback(j, CASE final WHEN 'completed' THEN 'job.completed' ELSE 'job.cancelled' END,
                                         _complete.result);
    END IF;
    RETURN final;
END
$$;

-- from sql/jobs.sql
-- Completes many jobs in one call, set-based: one statement per table for the whole batch
-- instead of a call per job (what a worker that claims with get_next_jobs(q, 100) wants).
-- lease_tokens and results, when given, pair with job_ids by position. Returns each job's
-- new state, or NULL for a job that was not running under that lease (it is left alone;
-- unlike complete_job, one stale lease does not undo the rest of the batch).
CREATE OR REPLACE FUNCTION queue_ext.complete_jobs(job_ids uuid[], lease_tokens uuid[] DEFAULT NULL, results jsonb[] DEFAULT NULL)
RETURNS TABLE (job_id uuid, status queue_ext.job_state)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    done_ids uuid[];
    done_states queue_ext.job_state[];
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
        DELETE FROM queue_ext.job_queue AS t
        USING input AS i
        WHERE t.id = i.id AND t.status = 'running'
          AND (i.token IS NULL OR (t.lease_token = i.token AND t.lease_expires_at > now()))
        RETURNING t AS job, t.*, i.result AS new_result,
                  CASE WHEN t.cancel_requested IS NULL THEN 'completed' ELSE 'cancelled' END::queue_ext.job_state AS final
    ), archived AS (
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            worker_id, result, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at, started_at,
            rate_limit_key, concurrency_key)
        SELECT id, queue_name, payload, priority, final, attempt, max_attempts, worker_id, new_result,
               coalesce(cancel_requested, last_error), errors, CASE WHEN final = 'completed' THEN 100 ELSE progress END,
               progress_details, enqueued_by, created_at, run_at, started_at, rate_limit_key, concurrency_key
        FROM done
    ), history AS (
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
        SELECT id, queue_name, 'running', final, attempt, worker_id, cancel_requested, enqueued_by FROM done
    ), flagged AS (
        SELECT d.*, q.has_callback,
               d.final = 'cancelled' OR q.has_callback
               OR EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = d.id) AS needs_more
        FROM done AS d JOIN queue_ext.queues AS q ON q.queue_name = d.queue_name
    )
    SELECT array_agg(id), array_agg(final),
           array_agg(job) FILTER (WHERE needs_more), array_agg(final) FILTER (WHERE needs_more),
           array_agg(new_result) FILTER (WHERE needs_more), array_agg(has_callback) FILTER (WHERE needs_more)
    INTO done_ids, done_states, follow, follow_states, follow_results, follow_callbacks
    FROM flagged;

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

-- from sql/jobs.sql
-- Moves a job (already deleted from job_queue by the caller) into the dead letter queue.
CREATE OR REPLACE FUNCTION queue_ext._bury(j queue_ext.job_queue, reason text, error text) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    INSERT INTO queue_ext.job_dead_letter (id, queue_name, payload, priority, attempt, max_attempts,
        worker_id, last_error, errors, reason, enqueued_by, created_at, started_at, rate_limit_key, concurrency_key)
    VALUES (j.id, j.queue_name, j.payload, j.priority, j.attempt, j.max_attempts,
        j.worker_id, j.last_error, j.errors, reason, j.enqueued_by, j.created_at, j.started_at,
        j.rate_limit_key, j.concurrency_key);
    INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
    VALUES (j.id, j.queue_name, j.status, 'dead', j.attempt, j.worker_id, error, j.enqueued_by);
    PERFORM queue_ext._cancel_dependents(j.id, format('dependency %s is dead', j.id));
    IF (SELECT has_callback FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name) THEN
        PERFORM queue_ext._emit_callback(j, 'job.dead', NULL);
    END IF;
END
$$;

-- from sql/jobs.sql
-- Records a failed attempt. The job is retried after backoff (or after retry_in, e.g. an
-- HTTP Retry-After), or buried in the dead letter queue when its attempts are used up or
-- the failure is permanent. Returns the job's new status.
-- Like complete, the non-raising core (NULL when no running job matched) and the API.
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
    message text := coalesce(_fail.error, 'unknown error');
    failure jsonb;
BEGIN
    IF _fail.retry_in < interval '0' THEN
        RAISE EXCEPTION 'retry_in must not be negative (got %)', _fail.retry_in USING ERRCODE = '22023';
    END IF;
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

-- from sql/jobs.sql
-- Completes a job and claims the next one from `queue_name` in one call and one
-- transaction: a busy worker pays one round trip and one commit per job instead of two.
CREATE OR REPLACE FUNCTION queue_ext.complete_and_get_next(
    job_id      uuid,
    queue_name  text,
    result      jsonb    DEFAULT NULL,
    lease_token uuid     DEFAULT NULL,
    worker_id   text     DEFAULT NULL,
    lease       interval DEFAULT NULL
) RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF queue_ext._complete(complete_and_get_next.job_id, complete_and_get_next.result,
                           complete_and_get_next.lease_token) IS NULL THEN
        PERFORM queue_ext._raise_not_running(complete_and_get_next.job_id, complete_and_get_next.lease_token,
                                             'complete');
    END IF;
    RETURN QUERY SELECT * FROM queue_ext.get_next_jobs(complete_and_get_next.queue_name, 1,
                                                       complete_and_get_next.worker_id, complete_and_get_next.lease);
END
$$;

-- from sql/dependencies.sql
-- Classifies a new job's dependencies and records the edges to the live ones. Returns the
-- job's initial state: 'queued' (all completed), 'waiting', or 'cancelled' (blocked_by is
-- dead or cancelled).
CREATE OR REPLACE FUNCTION queue_ext._dependency_state(new_job uuid, depends_on uuid[],
                                            OUT state queue_ext.job_state, OUT blocked_by uuid)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    missing uuid;
BEGIN
    PERFORM 1 FROM queue_ext.job_queue AS j WHERE j.id = ANY (depends_on) FOR KEY SHARE;
    SELECT d INTO missing FROM unnest(depends_on) AS d
    WHERE d IS NULL
       OR (NOT EXISTS (SELECT 1 FROM queue_ext.job_queue AS j WHERE j.id = d)
           AND NOT EXISTS (SELECT 1 FROM queue_ext.job_archive AS a WHERE a.id = d)
           AND NOT EXISTS (SELECT 1 FROM queue_ext.job_dead_letter AS x WHERE x.id = d))
    LIMIT 1;
    IF FOUND THEN
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

-- from sql/dependencies.sql
-- A job completed: drop its edges and queue every dependent left with none.
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
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, enqueued_by)
        VALUES (j.id, j.queue_name, 'waiting', 'queued', j.attempt, j.enqueued_by);
        IF (SELECT is_webhook FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name) THEN
            PERFORM queue_ext._wake_dispatcher_at_commit();
        END IF;
    END LOOP;
END
$$;

-- from sql/dependencies.sql
-- A job ended dead or cancelled: cancel everything waiting on it, and on those, and so on.
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
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, error, enqueued_by)
        VALUES (j.id, j.queue_name, 'waiting', 'cancelled', j.attempt, reason, j.enqueued_by);
        PERFORM queue_ext._cancel_dependents(j.id, format('dependency %s was cancelled', j.id));
    END LOOP;
END
$$;

-- from sql/control.sql
-- Cancels a job. Waiting, queued or retrying: it never runs (its dependents are cancelled
-- too). Running: it is marked, and its worker learns it from heartbeat/update_progress
-- (false) or complete_job/fail_job (which then record it as cancelled). Producers may only
-- cancel their own jobs. Returns the job's state after the call.
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
    IF NOT FOUND OR (j.enqueued_by <> who
                     AND NOT pg_has_role(who, 'queue_ext_worker', 'MEMBER')
                     AND NOT pg_has_role(who, 'queue_ext_admin', 'MEMBER')
                     AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = who)) THEN
        PERFORM queue_ext._raise_not_running(cancel_job.job_id, NULL, 'cancel');
    END IF;
    IF j.status = 'running' THEN
        UPDATE queue_ext.job_queue SET cancel_requested = why WHERE id = j.id;
        IF (SELECT q.notify FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name) THEN
            PERFORM queue_ext._notify(j.id, j.queue_name, 'cancelling', j.attempt, j.progress, why);
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

-- from sql/admin.sql
-- Redrive: puts a dead job back in its queue with fresh attempts. Its error history stays.
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
    IF (queue_ext._queue(d.queue_name)).is_webhook THEN  -- raises if the queue was dropped since
        PERFORM queue_ext._wake_dispatcher_at_commit();
    END IF;
    PERFORM queue_ext._check_limit_keys(d.rate_limit_key, d.concurrency_key);
    IF d.concurrency_key IS NOT NULL AND NOT queue_ext._take_slot(d.concurrency_key) THEN
        initial := 'waiting';
    END IF;
    INSERT INTO queue_ext.job_queue (id, queue_name, payload, priority, status, run_at, attempt, max_attempts,
        last_error, errors, enqueued_by, created_at, rate_limit_key, concurrency_key)
    VALUES (d.id, d.queue_name, d.payload, d.priority, initial, now(), 0, d.max_attempts,
        d.last_error, d.errors, d.enqueued_by, d.created_at, d.rate_limit_key, d.concurrency_key);
    INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, enqueued_by, error)
    VALUES (d.id, d.queue_name, 'dead', initial, 0, d.enqueued_by, 'redriven from the dead letter queue');
    RETURN d.id;
END
$$;

-- from sql/webhooks.sql
-- Enqueues a completion event for a job of a queue with a callback_url, e.g.
-- {"type": "job.completed", "job_id": ..., "queue": ..., "status": ..., "attempt": ..., "result": ...}.
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
    INSERT INTO queue_ext.job_status_history (job_id, queue_name, to_status, attempt, enqueued_by)
    VALUES (new_id, 'queue_ext.callbacks', 'queued', 0, j.enqueued_by);
    PERFORM queue_ext._wake_dispatcher_at_commit();
END
$$;

-- from sql/webhooks.sql
-- Records delivery outcomes, one JSON object per attempt:
--   {job_id, lease_token, queue_name, attempt, url, outcome: delivered|retry|failed,
--    status_code, error, duration_ms, response_headers, response_body, retry_after_ms}
-- delivered completes the job (the response is its result); retry fails it for a retry
-- (after Retry-After when given); failed fails it permanently. An outcome whose lease was
-- lost meanwhile (cancelled, reclaimed) is logged as 'stale' and changes nothing.
-- Returns how many outcomes were applied.
CREATE OR REPLACE FUNCTION queue_ext._dispatch_record(outcomes jsonb) RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    o jsonb;
    fast uuid[];
    applied uuid[] := '{}';
    ok boolean;
    response jsonb;
BEGIN
    -- The common case, set-based: successful deliveries of jobs with no cancel request in
    -- queues without callbacks are archived and logged by one statement each, instead of a
    -- function call per job (the dispatcher's throughput is bound here).
    WITH o AS (
        SELECT (e ->> 'job_id')::uuid AS id, (e ->> 'lease_token')::uuid AS token, e
        FROM jsonb_array_elements(outcomes) AS e
        WHERE e ->> 'outcome' = 'delivered'
    ), done AS (
        DELETE FROM queue_ext.job_queue AS j
        USING o
        WHERE j.id = o.id AND j.status = 'running' AND j.lease_token = o.token AND j.lease_expires_at > now()
          AND j.cancel_requested IS NULL
          AND NOT (SELECT q.has_callback FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name)
        RETURNING j.*, o.e
    ), archived AS (
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            worker_id, result, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at, started_at,
            rate_limit_key, concurrency_key)
        SELECT id, queue_name, payload, priority, 'completed', attempt, max_attempts, worker_id,
               jsonb_build_object('status', (e ->> 'status_code')::integer, 'headers', e -> 'response_headers',
                                  'body', e ->> 'response_body', 'duration_ms', (e ->> 'duration_ms')::float8),
               last_error, errors, 100, progress_details, enqueued_by, created_at, run_at, started_at,
               rate_limit_key, concurrency_key
        FROM done
    ), history AS (
        INSERT INTO queue_ext.job_status_history (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT id, queue_name, 'running', 'completed', attempt, worker_id, enqueued_by FROM done
    )
    SELECT coalesce(array_agg(id), '{}') INTO fast FROM done;
    PERFORM queue_ext._release_dependents(d) FROM unnest(fast) AS d
    WHERE EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = d);

    -- Everything else, one at a time: failures, cancellations, callbacks, stale leases.
    FOR o IN SELECT value FROM jsonb_array_elements(outcomes) WHERE NOT ((value ->> 'job_id')::uuid = ANY (fast)) LOOP
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
    FROM jsonb_array_elements(outcomes) AS e;
    RETURN cardinality(fast) + cardinality(applied);
END
$$;

-- from sql/events.sql
-- Live events: every state change of a job is published with NOTIFY on the channel
-- queue_ext_events, as a small JSON object any client can LISTEN for:
--   {"id": ..., "queue": ..., "status": ..., "attempt": ..., "progress": ..., "error": ...}
-- Status changes come from one place, the audit trail: a statement-level trigger on
-- job_status_history publishes each inserted row of a queue whose `notify` is on, so no
-- transition can be missed. NOTIFY is transactional: a rolled-back change publishes nothing.
CREATE OR REPLACE FUNCTION queue_ext._notify(job_id uuid, queue_name text, status text, attempt integer,
                                  progress real, error text) RETURNS void
LANGUAGE sql VOLATILE
AS $$
    SELECT pg_notify('queue_ext_events', json_build_object(
        'id', job_id, 'queue', queue_name, 'status', status, 'attempt', attempt,
        'progress', progress, 'error', left(error, 200))::text)
$$;

-- from sql/events.sql
CREATE OR REPLACE FUNCTION queue_ext._publish_transitions() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM queue_ext._notify(t.job_id, t.queue_name, t.to_status::text, t.attempt, NULL, t.error)
    FROM transitions AS t
    JOIN queue_ext.queues AS q ON q.queue_name = t.queue_name
    WHERE q.notify;
    RETURN NULL;
END
$$;

-- Privileges of the new and re-created functions (as in sql/grants.sql).
REVOKE ALL ON FUNCTION
    queue_ext.enqueue_job(text, jsonb, text, timestamptz, interval, integer, text, uuid[], text, text),
    queue_ext.enqueue_jobs(text, jsonb[], text, timestamptz, interval, integer, text, text),
    queue_ext._claim_limited(text[], integer, text, interval),
    queue_ext._tokens(queue_ext.rate_limits),
    queue_ext._check_key(text, text),
    queue_ext._check_limit_keys(text, text),
    queue_ext._lock_key(text),
    queue_ext._take_slot(text),
    queue_ext._admit_waiting(text),
    queue_ext._slot_freed(),
    queue_ext.set_rate_limit(text, integer, interval, integer),
    queue_ext.remove_rate_limit(text),
    queue_ext.set_concurrency_limit(text, integer),
    queue_ext.list_limits(),
    queue_ext._rate_limit_wait(),
    queue_ext.complete_jobs(uuid[], uuid[], jsonb[])
FROM PUBLIC;
REVOKE ALL ON queue_ext.rate_limits, queue_ext.concurrency_limits FROM PUBLIC;
GRANT SELECT ON queue_ext.rate_limits, queue_ext.concurrency_limits TO queue_ext_worker, queue_ext_admin;
GRANT EXECUTE ON FUNCTION
    queue_ext.enqueue_job(text, jsonb, text, timestamptz, interval, integer, text, uuid[], text, text),
    queue_ext.enqueue_jobs(text, jsonb[], text, timestamptz, interval, integer, text, text)
TO queue_ext_producer;
GRANT EXECUTE ON FUNCTION queue_ext.list_limits(), queue_ext.complete_jobs(uuid[], uuid[], jsonb[]) TO queue_ext_worker;
GRANT EXECUTE ON FUNCTION
    queue_ext.set_rate_limit(text, integer, interval, integer),
    queue_ext.remove_rate_limit(text),
    queue_ext.set_concurrency_limit(text, integer)
TO queue_ext_admin;
