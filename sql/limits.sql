-- Per-key limits, across every worker and queue.
--
-- Rate limits (set_rate_limit): jobs enqueued with a rate_limit_key are claimed no faster
-- than max_jobs per `per`. A token bucket per key, refilled continuously, holding at most
-- `burst` whole tokens; each claim spends one token per job inside the claim statement, so
-- the limit holds however many workers claim: in any window of length `per` at most
-- max_jobs + burst jobs start, and over time exactly max_jobs per `per`. (A webhook job the
-- dispatcher claimed but returns unsent, its request never started, gets its token back:
-- _return_unsent.) Rate-limited jobs have their own claim index and
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
-- PL/pgSQL, not SQL: the dispatcher asks after most turns, and a SQL function with SET is
-- planned again on every call (measured: 0.5 ms a call).
CREATE FUNCTION queue_ext._rate_limit_wait() RETURNS interval
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM queue_ext.rate_limits) THEN
        RETURN NULL;
    END IF;
    RETURN (SELECT min(make_interval(secs => greatest(0, 1 - queue_ext._tokens(r)) * extract(epoch FROM r.per) / r.max_jobs))
    FROM queue_ext.rate_limits AS r
    WHERE EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                  JOIN queue_ext.queues AS q ON q.queue_name = j.queue_name AND q.is_webhook AND NOT q.paused
                  WHERE j.rate_limit_key = r.key AND j.status IN ('queued', 'retrying') AND j.run_at <= now()));
END
$$;
