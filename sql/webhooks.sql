-- Webhook queues: where the dispatcher sends a queue's jobs, what it sends back on
-- completion (callbacks), and the durable log of every delivery attempt.

-- Admin-only: URLs can carry tokens, headers carry credentials, and the secret signs.
CREATE TABLE queue_ext.webhook_targets (
    queue_name       text     PRIMARY KEY,
    url              text     CHECK (url ~* '^https?://[^/?#]+'),  -- NULL: callbacks only
    method           text     NOT NULL DEFAULT 'POST' CHECK (method IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE')),
    headers          jsonb    NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(headers) = 'object'),
    timeout          interval,            -- NULL: queue_ext.http_timeout
    max_in_flight    integer  NOT NULL DEFAULT 100 CHECK (max_in_flight BETWEEN 1 AND 10000),
    secret           text,
    callback_url     text     CHECK (callback_url ~* '^https?://[^/?#]+'),
    follow_redirects boolean  NOT NULL DEFAULT false
);
COMMENT ON TABLE queue_ext.webhook_targets IS 'HTTP target of each webhook queue; readable by admins only (secrets, credentials).';

-- Every HTTP attempt, durable (unlike pg_net's UNLOGGED response table). The dispatcher
-- deletes rows older than queue_ext.delivery_log_retention.
CREATE TABLE queue_ext.webhook_deliveries (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id           uuid        NOT NULL,
    queue_name       text        NOT NULL,
    attempt          integer     NOT NULL,
    url              text        NOT NULL,
    outcome          text        NOT NULL CHECK (outcome IN ('delivered', 'retry', 'failed', 'stale')),
    status_code      integer,
    error            text,
    duration_ms      double precision,
    response_headers jsonb,
    response_body    text,
    delivered_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE queue_ext.webhook_deliveries IS 'One row per webhook delivery attempt, with the response or the error.';
CREATE INDEX webhook_deliveries_job_idx ON queue_ext.webhook_deliveries (job_id);
CREATE INDEX webhook_deliveries_at_idx ON queue_ext.webhook_deliveries (delivered_at);

SELECT pg_catalog.pg_extension_config_dump('queue_ext.webhook_targets', '');
SELECT pg_catalog.pg_extension_config_dump('queue_ext.webhook_deliveries', '');
SELECT pg_catalog.pg_extension_config_dump('queue_ext.webhook_deliveries_id_seq', '');

ALTER TABLE queue_ext.webhook_targets    ENABLE ROW LEVEL SECURITY;
ALTER TABLE queue_ext.webhook_deliveries ENABLE ROW LEVEL SECURITY;
CREATE POLICY admins_only ON queue_ext.webhook_targets FOR SELECT TO queue_ext_admin USING (true);
CREATE POLICY staff_all_deliveries ON queue_ext.webhook_deliveries FOR SELECT
    TO queue_ext_worker, queue_ext_admin USING (true);

-- Completion events of every queue with a callback_url travel through this one queue, which
-- the dispatcher drains like any webhook queue: durable, retried, signed.
INSERT INTO queue_ext.queues (queue_name, max_attempts, backoff_base, backoff_cap, lease_duration, is_webhook)
VALUES ('queue_ext.callbacks', 10, '1 second', '10 minutes', '5 minutes', true);

-- Validates and stores a queue's webhook target, then refreshes the queue's is_webhook /
-- has_callback flags. '' for url or callback_url removes it. A queue may have a callback
-- without a webhook: its jobs are done by external workers, and the callback reports them.
CREATE FUNCTION queue_ext._set_webhook(
    queue_name       text,
    url              text,
    method           text,
    headers          jsonb,
    timeout          interval,
    max_in_flight    integer,
    secret           text,
    callback_url     text,
    follow_redirects boolean
) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    bad text;
BEGIN
    IF _set_webhook.url IS NOT NULL OR _set_webhook.method IS NOT NULL OR _set_webhook.headers IS NOT NULL
       OR _set_webhook.timeout IS NOT NULL OR _set_webhook.max_in_flight IS NOT NULL
       OR _set_webhook.secret IS NOT NULL OR _set_webhook.callback_url IS NOT NULL
       OR _set_webhook.follow_redirects IS NOT NULL THEN
        IF _set_webhook.url IS NOT NULL AND _set_webhook.url <> '' AND _set_webhook.url !~* '^https?://[^/?#\s]+[^\s]*$' THEN
            RAISE EXCEPTION 'invalid webhook_url "%"', _set_webhook.url
                USING ERRCODE = '22023', HINT = 'Only absolute http:// and https:// URLs are allowed.';
        END IF;
        IF _set_webhook.callback_url IS NOT NULL AND _set_webhook.callback_url <> ''
           AND _set_webhook.callback_url !~* '^https?://[^/?#\s]+[^\s]*$' THEN
            RAISE EXCEPTION 'invalid callback_url "%"', _set_webhook.callback_url
                USING ERRCODE = '22023', HINT = 'Only absolute http:// and https:// URLs are allowed.';
        END IF;
        IF upper(_set_webhook.method) NOT IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE') THEN
            RAISE EXCEPTION 'invalid webhook_method "%"', _set_webhook.method
                USING ERRCODE = '22023', HINT = 'Use one of GET, POST, PUT, PATCH, DELETE.';
        END IF;
        IF _set_webhook.headers IS NOT NULL THEN
            IF jsonb_typeof(_set_webhook.headers) <> 'object' THEN
                RAISE EXCEPTION 'webhook_headers must be a JSON object of strings' USING ERRCODE = '22023';
            END IF;
            -- RFC 9110 token names; values without control characters (no header injection).
            SELECT key INTO bad FROM jsonb_each(_set_webhook.headers)
            WHERE key !~ '^[!#$%&''*+.^_`|~0-9A-Za-z-]+$'
               OR jsonb_typeof(value) <> 'string'
               OR (value #>> '{}') ~ '[\x01-\x08\x0a-\x1f\x7f]'
               OR lower(key) LIKE 'webhook-%'
            LIMIT 1;
            IF FOUND THEN
                RAISE EXCEPTION 'invalid webhook header "%"', bad
                    USING ERRCODE = '22023',
                          HINT = 'Header names must be HTTP tokens, values strings without control characters; webhook-* headers are reserved for signing.';
            END IF;
        END IF;
        IF _set_webhook.timeout IS NOT NULL AND (_set_webhook.timeout <= interval '0' OR _set_webhook.timeout > interval '1 hour') THEN
            RAISE EXCEPTION 'webhook_timeout must be between 0 and 1 hour (got %)', _set_webhook.timeout USING ERRCODE = '22023';
        END IF;
        IF _set_webhook.max_in_flight IS NOT NULL AND _set_webhook.max_in_flight NOT BETWEEN 1 AND 10000 THEN
            RAISE EXCEPTION 'webhook_max_in_flight must be between 1 and 10000 (got %)', _set_webhook.max_in_flight USING ERRCODE = '22023';
        END IF;
        INSERT INTO queue_ext.webhook_targets AS t (queue_name, url, method, headers, timeout, max_in_flight, secret,
                                                    callback_url, follow_redirects)
        VALUES (_set_webhook.queue_name, nullif(_set_webhook.url, ''), upper(coalesce(_set_webhook.method, 'POST')),
                coalesce(_set_webhook.headers, '{}'), _set_webhook.timeout, coalesce(_set_webhook.max_in_flight, 100),
                nullif(_set_webhook.secret, ''), nullif(_set_webhook.callback_url, ''),
                coalesce(_set_webhook.follow_redirects, false))
        ON CONFLICT (queue_name) DO UPDATE SET
            url              = CASE WHEN _set_webhook.url IS NULL THEN t.url ELSE nullif(_set_webhook.url, '') END,
            method           = coalesce(upper(_set_webhook.method), t.method),
            headers          = coalesce(_set_webhook.headers, t.headers),
            timeout          = coalesce(_set_webhook.timeout, t.timeout),
            max_in_flight    = coalesce(_set_webhook.max_in_flight, t.max_in_flight),
            secret           = CASE WHEN _set_webhook.secret IS NULL THEN t.secret ELSE nullif(_set_webhook.secret, '') END,
            callback_url     = CASE WHEN _set_webhook.callback_url IS NULL THEN t.callback_url
                                    ELSE nullif(_set_webhook.callback_url, '') END,
            follow_redirects = coalesce(_set_webhook.follow_redirects, t.follow_redirects);
    END IF;
    DELETE FROM queue_ext.webhook_targets AS t
    WHERE t.queue_name = _set_webhook.queue_name AND t.url IS NULL AND t.callback_url IS NULL;
    UPDATE queue_ext.queues AS q
    SET is_webhook   = t.url IS NOT NULL,
        has_callback = t.callback_url IS NOT NULL,
        updated_at   = now()
    FROM (SELECT _set_webhook.queue_name AS name) AS n
    LEFT JOIN queue_ext.webhook_targets AS t ON t.queue_name = n.name
    WHERE q.queue_name = n.name;
END
$$;

-- Enqueues a completion event for a job of a queue with a callback_url, e.g.
-- {"type": "job.completed", "job_id": ..., "queue": ..., "status": ..., "attempt": ..., "result": ...}.
CREATE FUNCTION queue_ext._emit_callback(j queue_ext.job_queue, event text, result jsonb) RETURNS void
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

-- The dispatcher's claim: up to `capacity` jobs from webhook queues (one queue when
-- only_queue is given), each queue capped by its max_in_flight minus what `busy` (queue ->
-- requests in flight) says the dispatcher already holds. Returns a JSON array of deliveries,
-- each with its target; the lease covers the request timeout plus a margin, so that a
-- request still in flight is never reclaimed and sent a second time. Callbacks are sent with
-- the timeout of the queue they report on (its webhook_timeout, or the default), and one
-- claim takes a batch of them: their lease covers the longest of those timeouts.
CREATE FUNCTION queue_ext._dispatch_claim(worker_id text, capacity integer, busy jsonb, only_queue text,
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

-- Records delivery outcomes, one JSON object per attempt:
--   {job_id, lease_token, queue_name, attempt, url, outcome: delivered|retry|failed,
--    status_code, error, duration_ms, response_headers, response_body, retry_after_ms}
-- delivered completes the job (the response is its result); retry fails it for a retry
-- (after Retry-After when given); failed fails it permanently. An outcome whose lease was
-- lost meanwhile (cancelled, reclaimed) is logged as 'stale' and changes nothing.
-- Returns how many outcomes were applied.
CREATE FUNCTION queue_ext._dispatch_record(outcomes jsonb) RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    o jsonb;
    delivered jsonb;       -- job id -> its 'delivered' outcome
    delivered_ids uuid[];
    fast uuid[] := '{}';
    fast_queues text[];
    unlogged uuid[] := '{}';  -- delivered jobs of queues without history: no archive or log row
    logged queue_ext.job_queue[];  -- delivered jobs whose history rows are stored (_log_completions)
    applied uuid[] := '{}';
    ok boolean;
    response jsonb;
BEGIN
    -- The common case, set-based: successful deliveries of jobs with no cancel request in
    -- queues without callbacks are archived and logged by one statement each, instead of a
    -- function call per job (the dispatcher's throughput is bound here). The outcomes are
    -- looked up by job id in a JSON object, not joined: the planner cannot estimate a
    -- jsonb_array_elements() join and chose a nested loop over it, quadratic in the batch
    -- (measured: 154 ms for 250 outcomes, 0.6 ms a job).
    SELECT jsonb_object_agg(e ->> 'job_id', e), array_agg((e ->> 'job_id')::uuid)
    INTO delivered, delivered_ids
    FROM jsonb_array_elements(outcomes) AS e
    WHERE e ->> 'outcome' = 'delivered';
    IF delivered_ids IS NOT NULL THEN
        WITH done AS (
            DELETE FROM queue_ext.job_queue AS j
            WHERE j.id = ANY (delivered_ids) AND j.status = 'running'
              AND j.lease_token = (delivered -> j.id::text ->> 'lease_token')::uuid AND j.lease_expires_at > now()
              AND j.cancel_requested IS NULL
              AND NOT (SELECT q.has_callback FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name)
            RETURNING j.*, delivered -> j.id::text AS e,
                      (SELECT q.keep_history FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name) AS keep,
                      -- Stored rows only to be published, or for a claim that predates
                      -- claimed_at (_log_completions): the archive row records the rest.
                      CASE WHEN (SELECT q.keep_history AND (q.notify OR j.claimed_at IS NULL)
                                 FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name)
                           THEN j END AS logged_job
        ), archived AS (
            INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
                worker_id, result, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at, started_at,
                rate_limit_key, concurrency_key, claimed_at)
            SELECT id, queue_name, payload, priority, 'completed', attempt, max_attempts, worker_id,
                   jsonb_build_object('status', (e ->> 'status_code')::integer, 'headers', e -> 'response_headers',
                                      'body', e ->> 'response_body', 'duration_ms', (e ->> 'duration_ms')::float8),
                   last_error, errors, 100, progress_details, enqueued_by, created_at, run_at, started_at,
                   rate_limit_key, concurrency_key, claimed_at
            FROM done WHERE keep
        )
        SELECT coalesce(array_agg(id), '{}'), coalesce(array_agg(id) FILTER (WHERE NOT keep), '{}'),
               coalesce(array_agg(queue_name), '{}'),
               array_agg(logged_job) FILTER (WHERE logged_job IS DISTINCT FROM NULL)
        INTO fast, unlogged, fast_queues, logged FROM done;
        PERFORM queue_ext._log_completions(logged);
        PERFORM queue_ext._count_at_commit(u.q, 'completed', count(*)) FROM unnest(fast_queues) AS u(q) GROUP BY u.q;
        PERFORM queue_ext._release_dependents(d) FROM unnest(fast) AS d
        WHERE EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = d);
    END IF;

    -- Everything else, one at a time: failures, cancellations, callbacks, stale leases.
    FOR o IN SELECT value FROM jsonb_array_elements(outcomes)
             WHERE cardinality(fast) < jsonb_array_length(outcomes)
               AND NOT ((value ->> 'job_id')::uuid = ANY (fast)) LOOP
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
    FROM jsonb_array_elements(outcomes) AS e
    WHERE cardinality(unlogged) < jsonb_array_length(outcomes)
      AND (cardinality(unlogged) = 0 OR NOT ((e ->> 'job_id')::uuid = ANY (unlogged)));
    RETURN cardinality(fast) + cardinality(applied);
END
$$;

-- Retention of the delivery log, batched so a big backlog never holds a long transaction.
CREATE FUNCTION queue_ext._purge_deliveries(older_than interval) RETURNS integer
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM queue_ext.webhook_deliveries
        WHERE id IN (SELECT id FROM queue_ext.webhook_deliveries
                     WHERE delivered_at < now() - older_than ORDER BY delivered_at LIMIT 10000)
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;
