-- queue_ext 0.11.0 -> 0.12.0: the dispatcher's claim skips the probe of queues it is busy with;
-- retention runs in committed batches.
--   * _dispatch_claim_rows claims at once from a queue with deliveries in flight, instead of
--     probing its claim index first: the probe walked the same index entries as the claim
--     after it, those of every job claimed since the last vacuum (12% fewer buffer reads per
--     delivered webhook, bench/dispatch_turns.py), and keeps one generic plan across turns
--     (the plan cache had planned its claim from each queue afresh on every turn).
--   * _dispatch_claim_rows takes ahead_queues and returns each queue's max_in_flight: the
--     dispatcher claims up to twice the max_in_flight of a queue whose endpoint answers fast,
--     and holds the second half until a request to the target ends (larger turns, each job's SQL cheaper, with no more requests
--     at once to the endpoint); those leases cover two request timeouts. _return_unsent puts
--     the jobs still waiting when the dispatcher stops, or when their queue is paused, back
--     in their queues, their attempt not counted; pause_queue and cancel_job tell the
--     dispatcher at commit (_recheck_unsent_at_commit), and a job cancelled while it waits
--     is cancelled before its request starts. webhook_targets.settings_version names the
--     transaction that last changed a target's URL, method, headers, timeout, secret, callback
--     or redirects; the claim returns it, and a held job whose target changed since goes back
--     to its queue unsent (_set_webhook tells the dispatcher at commit).
--   * _claim_jobs is get_next_jobs(text, ...)'s claim, which the dispatcher calls saying how
--     many of the jobs it claims go to free request slots at once: those it claims ahead of
--     them end before the first job that would be on its last attempt (after a kill -9 the
--     attempt of every job the dispatcher held counts, and a last attempt must not end
--     unsent). get_next_job(text, ...) and complete_and_get_next call it directly (the
--     former now SECURITY DEFINER, as get_next_jobs is), not through get_next_jobs.
--   * wait_for_next_job: an idle worker's wait (wait_for_jobs) and claim (get_next_job) in one
--     CALL, one round trip from the producer's commit to the claimed job.
--   * get_next_jobs(text[], ...) with one queue name is that queue's own claim, which starts
--     from floors while the xmin horizon is held, as get_next_jobs(text, ...) does.
--   * purge_jobs takes max_rows (oldest first), and the procedure purge_jobs_in_batches runs
--     it in committed batches, so that retention of a large backlog does not hold back the
--     cleanup horizon for its whole length.
--   * purge_jobs and the dispatcher's trimming of the delivery log delete by the rows'
--     addresses (ctid), not by id: a batch of 10,000 in about a fifth of the time.
--   * _backoff, _log_claim and _may_see_job are PL/pgSQL instead of SQL functions, whose
--     bodies PostgreSQL 15 planned on every call when it could not inline them (a third of a
--     failed attempt's cost, and of a job_status call); enqueue_jobs and _dependency_state
--     keep generic plans across calls.
--
-- Written once for this release and not changed afterwards; the tests check that a database
-- upgraded with it matches a fresh 0.12.0 install object for object (pg_test/upgrade.sh).
\echo Use "ALTER EXTENSION queue_ext UPDATE TO '0.12.0'" to load this file. \quit

-- The transaction that last changed where or how the queue's jobs are sent (never the
-- same for two changes, nor for a target removed and set again): the dispatcher keeps
-- it with each job it holds unsent, and does not send one whose target changed since.
ALTER TABLE queue_ext.webhook_targets
    ADD COLUMN settings_version bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint;

DROP FUNCTION queue_ext._dispatch_claim_rows(text, integer, text[], integer[], text, interval);

-- Claims up to n runnable jobs from one queue: highest priority first, then the oldest
-- run_at. SKIP LOCKED lets concurrent claimers pass each other's rows instead of waiting,
-- and the row lock plus the status change mean no job is handed out twice.
--
-- Every claim first returns the jobs of the queues it claims from whose lease expired
-- (the attempt fails with "lease expired", as cleanup_stuck_jobs does), so a job whose
-- worker died is retried even with no dispatcher running (no shared_preload_libraries, or
-- it is down). When nothing expired this is one probe of job_queue_lease_idx; the return
-- locks with SKIP LOCKED, so concurrent claimers never wait on each other for it. Fencing
-- is unchanged: the lease had expired, so its holder's complete/fail/heartbeat get 55000.
--
-- While the xmin horizon is held back, the claim starts from each priority's floor
-- (claim_window.rs says why and what it costs), and the expired-lease probe, which walks
-- the same kind of dead entries, runs with the floors' probe, once every 2 seconds.
--
-- get_next_jobs(text, ...) is this claim as workers call it. The dispatcher passes
-- started_at_once: it starts the requests of only that many of the jobs claimed at once, and
-- the rest wait in it for a request slot (claims ahead, _dispatch_claim_rows). Those end before
-- the first job that would be on its last attempt, which is claimed only into a free slot: a
-- dispatcher killed by a signal leaves no word of which held jobs it had sent, so its
-- successor counts the attempt of each (the request may have reached the endpoint), and a last
-- attempt must not end unsent. Jobs under a rate limit are not claimed ahead at all.
CREATE FUNCTION queue_ext._claim_jobs(queue_name text, n integer, worker_id text, lease interval,
                                      started_at_once integer)
RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE
SET jit = off
SET enable_seqscan = off
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    q queue_ext.queues := queue_ext._queue(_claim_jobs.queue_name);
    lease_for interval := coalesce(_claim_jobs.lease, q.lease_duration);
    floors timestamptz[];  -- NULL, or each priority's floor (run_at, id): claim_window.rs
    floor_ids uuid[];
    -- The jobs this call locked: their row versions' addresses, ids and states before.
    row_ids tid[];
    ids uuid[];
    old_statuses queue_ext.job_state[];
    claim_n integer := _claim_jobs.n;
BEGIN
    IF length(_claim_jobs.worker_id) > 200 THEN
        -- Stored on the job and in every history row of its claims.
        RAISE EXCEPTION 'worker_id is % characters, over the limit of 200', length(_claim_jobs.worker_id)
            USING ERRCODE = '22023';
    END IF;
    IF _claim_jobs.n IS NULL OR _claim_jobs.n < 1 THEN
        RAISE EXCEPTION 'n must be at least 1 (got %)', coalesce(_claim_jobs.n::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF _claim_jobs.lease IS NOT NULL THEN
        PERFORM queue_ext._check_interval('lease', _claim_jobs.lease, '1 second', '7 days');
    END IF;
    IF q.paused THEN
        RETURN;
    END IF;
    floors := queue_ext._claim_window(q.queue_name);
    IF floors IS NULL OR cardinality(floors) = 0 THEN
        IF EXISTS (SELECT 1 FROM queue_ext.job_queue AS e
                   WHERE e.status = 'running' AND e.lease_expires_at <= now() AND e.queue_name = q.queue_name) THEN
            PERFORM queue_ext._return_running(NULL, 'lease expired', ARRAY[q.queue_name]);
        END IF;
        IF floors IS NOT NULL THEN
            SELECT * INTO floors, floor_ids FROM queue_ext._claim_window_probe(q.queue_name);
        END IF;
    ELSE
        floor_ids := queue_ext._claim_window_ids(q.queue_name);
    END IF;
    IF EXISTS (SELECT 1 FROM queue_ext.rate_limits)
       AND EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                   WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying')
                     AND j.rate_limit_key IS NOT NULL) THEN
        claim_n := least(claim_n, coalesce(_claim_jobs.started_at_once, claim_n));
        IF claim_n > 0 THEN
            RETURN QUERY SELECT * FROM queue_ext._claim_limited(ARRAY[q.queue_name], claim_n,
                                                                _claim_jobs.worker_id, lease_for);
        END IF;
        RETURN;
    END IF;
    -- Lock the jobs to claim, then change them: two statements, each with only the plan nodes
    -- it runs (the executor sets up every node of a statement on each call, run or not), and
    -- the change skipped when there is nothing to claim.
    IF floors IS NULL THEN
        SELECT array_agg(c.ctid), array_agg(c.id), array_agg(c.status) INTO row_ids, ids, old_statuses
        FROM (SELECT j.ctid, j.id, j.status
              FROM queue_ext.job_queue AS j
              WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL
                AND j.run_at <= now()
              ORDER BY j.priority DESC, j.run_at, j.id
              LIMIT _claim_jobs.n
              FOR UPDATE SKIP LOCKED) AS c;
    ELSE
        -- One range per priority, highest first: PostgreSQL 15 cannot start a scan at a
        -- floor on the third column of the index with the second one unbound.
        SELECT array_agg(c.ctid), array_agg(c.id), array_agg(c.status) INTO row_ids, ids, old_statuses
        FROM (SELECT w.ctid, w.id, w.status
              FROM unnest('{critical,high,normal,low}'::queue_ext.job_priority[], floors, floor_ids)
                   AS p(priority, floor_at, floor_id)
              CROSS JOIN LATERAL (
                  SELECT j.ctid, j.id, j.status
                  FROM queue_ext.job_queue AS j
                  WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL
                    AND j.priority = p.priority AND (j.run_at, j.id) >= (p.floor_at, p.floor_id) AND j.run_at <= now()
                  ORDER BY j.run_at, j.id
                  LIMIT _claim_jobs.n
                  FOR UPDATE SKIP LOCKED
              ) AS w
              LIMIT _claim_jobs.n) AS c;
    END IF;
    IF cardinality(row_ids) > _claim_jobs.started_at_once THEN
        -- In claim order: all of those started at once, then the rest up to the first job that
        -- would be on its last attempt. (The rows left out stay locked until commit.)
        SELECT array_agg(s.ctid ORDER BY s.pos), array_agg(s.id ORDER BY s.pos), array_agg(s.status ORDER BY s.pos)
        INTO row_ids, ids, old_statuses
        FROM (SELECT w.ctid, w.id, w.status,
                     bool_or(w.attempt + 1 >= w.max_attempts AND w.pos > _claim_jobs.started_at_once)
                         OVER (ORDER BY w.pos) AS cut, w.pos
              FROM (SELECT j.ctid, j.id, j.status, j.attempt, j.max_attempts,
                           row_number() OVER (ORDER BY j.priority DESC, j.run_at, j.id) AS pos
                    FROM queue_ext.job_queue AS j
                    WHERE j.ctid = ANY (row_ids)) AS w) AS s
        WHERE NOT s.cut;
    END IF;
    IF row_ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH claimed AS (
        UPDATE queue_ext.job_queue AS j
        SET status = 'running',
            attempt = j.attempt + 1,
            lease_token = queue_ext._lease_token(),
            lease_expires_at = now() + lease_for,
            worker_id = _claim_jobs.worker_id,
            started_at = coalesce(j.started_at, now()),
            claimed_at = now()
        -- By the locked row versions' addresses (a TID scan: no second descent of the primary
        -- key per job). FOR UPDATE returns the newest version of each row it locked, and a
        -- locked row keeps its address until this transaction ends.
        WHERE j.ctid = ANY (row_ids)
        RETURNING j.*
    )
    SELECT id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at, created_at
    FROM claimed
    ORDER BY priority DESC, run_at, id;
    IF q.keep_history AND q.notify THEN
        -- Stored only to be published (job_status_log).
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT j.id, j.queue_name, u.old_status, 'running', j.attempt, j.worker_id, j.enqueued_by
        FROM unnest(ids, old_statuses) AS u(id, old_status)
        JOIN queue_ext.job_queue AS j ON j.id = u.id;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION queue_ext._claim_jobs(text, integer, text, interval, integer) FROM PUBLIC;

-- A worker's claim of up to n runnable jobs from one queue (_claim_jobs).
CREATE OR REPLACE FUNCTION queue_ext.get_next_jobs(
    queue_name text,
    n          integer,
    worker_id  text     DEFAULT NULL,
    lease      interval DEFAULT NULL
) RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT * FROM queue_ext._claim_jobs(get_next_jobs.queue_name, get_next_jobs.n,
                                                     get_next_jobs.worker_id, get_next_jobs.lease, NULL);
END
$$;

-- One job. PL/pgSQL, not SQL: a VOLATILE SQL function is never inlined, and PostgreSQL 15
-- plans its body again on every call (measured: 45 us of a 400 us claim + complete). The
-- one-queue form calls the claim itself, not get_next_jobs: each layer of RETURN QUERY costs
-- 20-45 us of a 280 us claim + complete (pg_stat_statements, one client).
CREATE OR REPLACE FUNCTION queue_ext.get_next_job(queue_name text, worker_id text DEFAULT NULL, lease interval DEFAULT NULL)
RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT * FROM queue_ext._claim_jobs(get_next_job.queue_name, 1, get_next_job.worker_id,
                                                     get_next_job.lease, NULL);
END
$$;

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
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    IF queue_ext._complete(complete_and_get_next.job_id, complete_and_get_next.result,
                           complete_and_get_next.lease_token) IS NULL THEN
        PERFORM queue_ext._raise_not_running(complete_and_get_next.job_id, complete_and_get_next.lease_token,
                                             'complete');
    END IF;
    RETURN QUERY SELECT * FROM queue_ext._claim_jobs(complete_and_get_next.queue_name, 1,
                                                     complete_and_get_next.worker_id, complete_and_get_next.lease, NULL);
END
$$;

-- The dispatcher's claim: up to `capacity` jobs from webhook queues (one queue when
-- only_queue is given), each queue capped by its max_in_flight minus what the dispatcher
-- already holds there (busy_counts[i] for busy_queues[i]). One row per delivery, with its
-- target, the target's settings_version and the queue's max_in_flight. For the queues in ahead_queues (the dispatcher names
-- those whose endpoint answers fast), the cap on claims is twice max_in_flight: the
-- dispatcher sends at most max_in_flight requests to the target at once and the rest wait in
-- claim order for one of them to end, so a job waits at most one request timeout before its
-- own request starts (one claim takes more jobs per turn, which costs less per job, without
-- more requests at once to the endpoint). The lease covers the wait, the request timeout and
-- a margin, so that a request still in flight is never reclaimed and sent a second time. Callbacks are sent with the timeout of the queue they
-- report on (its webhook_timeout, or the default), and one claim takes a batch of them:
-- their lease covers the longest of those timeouts. Typed columns, not JSON: the dispatcher
-- reads them as they are (building and parsing a JSON document per delivery was a fifth of
-- its SQL thread's time).
CREATE FUNCTION queue_ext._dispatch_claim_rows(worker_id text, capacity integer, busy_queues text[],
                                               busy_counts integer[], only_queue text, default_timeout interval,
                                               ahead_queues text[])
RETURNS TABLE (job_id uuid, lease_token uuid, attempt integer, queue_name text, body text, url text,
               method text, header_names text[], header_values text[], timeout_ms bigint, secret text,
               follow_redirects boolean, max_in_flight integer, settings_version bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
-- A generic plan kept across turns: left to choose, the plan cache planned the claim from
-- each queue afresh on every turn (30-70 µs a turn, bench/dispatch_floor.py).
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    t record;
    room integer := capacity;
    n integer;
    held integer;  -- the dispatcher's deliveries of the queue, in flight or waiting to start
    cap integer;
    at_once integer;  -- of n, how many go to free request slots
    waits integer;  -- request timeouts a lease covers
    callback_lease interval;
BEGIN
    FOR t IN
        SELECT q.queue_name AS name, w.url AS target, w.method AS verb,
               coalesce(w.timeout, default_timeout) AS request_timeout,
               w.max_in_flight AS limit_in_flight, w.secret AS signing_secret, w.follow_redirects AS redirects,
               w.settings_version AS version,
               ARRAY(SELECT h.key FROM jsonb_each_text(w.headers) AS h ORDER BY h.key) AS names,
               ARRAY(SELECT h.value FROM jsonb_each_text(w.headers) AS h ORDER BY h.key) AS vals
        FROM queue_ext.queues AS q
        LEFT JOIN queue_ext.webhook_targets AS w ON w.queue_name = q.queue_name
        WHERE q.is_webhook AND NOT q.paused
          AND (only_queue IS NULL OR q.queue_name = only_queue)
          AND (w.url IS NOT NULL OR q.queue_name = 'queue_ext.callbacks')
        ORDER BY random()  -- no queue always goes first when capacity is short
    LOOP
        EXIT WHEN room <= 0;
        held := coalesce(busy_counts[array_position(busy_queues, t.name)], 0);
        cap := coalesce(t.limit_in_flight, 1000);
        waits := CASE WHEN t.name = ANY (ahead_queues) THEN 2 ELSE 1 END;
        n := least(room, waits * cap - held);
        CONTINUE WHEN n <= 0;
        -- Of those, the dispatcher starts at once the ones its free slots take, in claim order
        -- (so the rows keep that order); _claim_jobs says what it claims ahead of them.
        at_once := CASE WHEN waits > 1 THEN greatest(cap - held, 0) END;
        -- An idle queue with nothing to send costs a probe of its claim index, not a claim.
        -- (Here, one queue at a time: as a condition of the loop's query, the planner hashed
        -- every runnable job of every queue on each turn, 8.6 ms a turn with 60,000 queued.)
        -- A queue with deliveries in flight had jobs a moment ago and is claimed from at once:
        -- a probe there walks the same index entries as the claim after it, and the entries
        -- of the jobs claimed since the last vacuum are many then (a claimed job's entry
        -- stays in the index until vacuum removes it).
        CONTINUE WHEN held = 0
                  AND NOT EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                                  WHERE j.queue_name = t.name AND j.status IN ('queued', 'retrying')
                                    AND j.rate_limit_key IS NULL AND j.run_at <= now())
                  AND NOT EXISTS (SELECT 1 FROM queue_ext.job_queue AS j
                                  WHERE j.queue_name = t.name AND j.status IN ('queued', 'retrying')
                                    AND j.rate_limit_key IS NOT NULL AND j.run_at <= now());
        IF t.name = 'queue_ext.callbacks' THEN
            -- Each event goes to the callback_url of the queue it reports on, signed with
            -- that queue's secret.
            SELECT waits * greatest(default_timeout, max(w.timeout)) + interval '30 seconds' INTO callback_lease
            FROM queue_ext.webhook_targets AS w WHERE w.callback_url IS NOT NULL;
            RETURN QUERY
            SELECT c.job_id, c.lease_token, c.attempt, c.queue_name, c.payload::text, w.callback_url, 'POST',
                   ARRAY(SELECT h.key FROM jsonb_each_text(w.headers) AS h ORDER BY h.key),
                   ARRAY(SELECT h.value FROM jsonb_each_text(w.headers) AS h ORDER BY h.key),
                   (extract(epoch FROM coalesce(w.timeout, default_timeout)) * 1000)::bigint,
                   w.secret, coalesce(w.follow_redirects, false), cap, w.settings_version
            FROM queue_ext._claim_jobs(t.name, n, worker_id, callback_lease, at_once) WITH ORDINALITY AS c
            LEFT JOIN queue_ext.webhook_targets AS w ON w.queue_name = c.payload ->> 'queue'
            ORDER BY c.ordinality;
        ELSE
            RETURN QUERY
            SELECT c.job_id, c.lease_token, c.attempt, c.queue_name, c.payload::text, t.target, t.verb,
                   t.names, t.vals, (extract(epoch FROM t.request_timeout) * 1000)::bigint,
                   t.signing_secret, t.redirects, cap, t.version
            FROM queue_ext._claim_jobs(t.name, n, worker_id, waits * t.request_timeout + interval '30 seconds',
                                       at_once) AS c;
        END IF;
        GET DIAGNOSTICS n = ROW_COUNT;
        room := room - n;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION queue_ext._dispatch_claim_rows(text, integer, text[], integer[], text, interval, text[])
    FROM PUBLIC;

-- Puts jobs the dispatcher claimed but never sent back in their queues as if unclaimed: it
-- claims ahead of free request slots, and a job still waiting for one when its queue is
-- paused, or when the dispatcher stops, is sent nowhere, so its attempt does not count.
-- `reason` goes in their history. A job whose cancellation was asked for while it waited is
-- cancelled instead, as cancel_job cancels a job that has not started. Only jobs still
-- running under the given lease tokens; returns how many went back or were cancelled. A
-- rate-limit token the claim took is given back.
CREATE FUNCTION queue_ext._return_unsent(job_ids uuid[], lease_tokens uuid[], reason text) RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
    cancelled uuid[];
    reasons text[];
    touched text[];
BEGIN
    WITH unsent AS (
        UPDATE queue_ext.job_queue AS j
        SET status = 'queued', attempt = j.attempt - 1, lease_token = NULL, lease_expires_at = NULL,
            started_at = CASE WHEN j.attempt > 1 THEN j.started_at END
        FROM unnest(job_ids, lease_tokens) AS u(id, token)
        WHERE j.id = u.id AND j.lease_token = u.token AND j.status = 'running'
        RETURNING j.*
    ), logged AS (
        -- Their claim was published (get_next_jobs logs it for queues that notify): so is this.
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error,
                                              enqueued_by)
        SELECT s.id, s.queue_name, 'running', 'queued', s.attempt + 1, s.worker_id,
               CASE WHEN s.cancel_requested IS NULL THEN reason ELSE 'not sent: cancelled' END, s.enqueued_by
        FROM unsent AS s
        JOIN queue_ext.queues AS q ON q.queue_name = s.queue_name
        WHERE q.keep_history AND q.notify
    ), refunded AS (
        -- The claim took a rate-limit token for a request that was never made: give it back,
        -- so that the key's rate counts only requests sent.
        UPDATE queue_ext.rate_limits AS r
        SET tokens = least(r.burst + 0.999, queue_ext._tokens(r) + u.n), refilled_at = greatest(r.refilled_at, now())
        FROM (SELECT s.rate_limit_key, count(*) AS n FROM unsent AS s
              WHERE s.rate_limit_key IS NOT NULL GROUP BY s.rate_limit_key) AS u
        WHERE r.key = u.rate_limit_key
    )
    SELECT count(*),
           array_agg(s.id) FILTER (WHERE s.cancel_requested IS NOT NULL),
           array_agg(s.cancel_requested) FILTER (WHERE s.cancel_requested IS NOT NULL),
           array_agg(DISTINCT s.queue_name)
    INTO n, cancelled, reasons, touched
    FROM unsent AS s;
    PERFORM queue_ext.cancel_job(c.id, c.reason) FROM unnest(cancelled, reasons) AS c(id, reason);
    PERFORM queue_ext._announce(t.queue_name) FROM unnest(touched) AS t(queue_name);
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION queue_ext._return_unsent(uuid[], uuid[], text) FROM PUBLIC;

-- pause_queue, cancel_job and drop_queue have the dispatcher look again at the jobs it holds
-- unsent, once they commit: a paused queue's jobs go back to it, a cancelled job is
-- cancelled, a dropped queue's jobs are not sent.
CREATE FUNCTION queue_ext."_recheck_unsent_at_commit"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_recheck_unsent_at_commit_wrapper';
REVOKE ALL ON FUNCTION queue_ext._recheck_unsent_at_commit() FROM PUBLIC;

-- Validates and stores a queue's webhook target, then refreshes the queue's is_webhook /
-- has_callback flags. '' for url or callback_url removes it. A queue may have a callback
-- without a webhook: its jobs are done by external workers, and the callback reports them.
CREATE OR REPLACE FUNCTION queue_ext._set_webhook(
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
    before queue_ext.webhook_targets;
BEGIN
    SELECT * INTO before FROM queue_ext.webhook_targets AS t WHERE t.queue_name = _set_webhook.queue_name;
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
    IF before.queue_name IS NOT NULL THEN
        -- Jobs the dispatcher claimed ahead and holds unsent were claimed with the old target:
        -- a new version sends them back to the queue, to be claimed with the new one. (Not
        -- for max_in_flight: the dispatcher's lanes follow it as it is.)
        UPDATE queue_ext.webhook_targets AS t
        SET settings_version = pg_current_xact_id()::text::bigint
        WHERE t.queue_name = _set_webhook.queue_name
          AND (t.url, t.method, t.headers, t.timeout, t.secret, t.callback_url, t.follow_redirects)
              IS DISTINCT FROM (before.url, before.method, before.headers, before.timeout, before.secret,
                                before.callback_url, before.follow_redirects);
        PERFORM queue_ext._recheck_unsent_at_commit();
    END IF;
    UPDATE queue_ext.queues AS q
    SET is_webhook   = t.url IS NOT NULL,
        has_callback = t.callback_url IS NOT NULL,
        updated_at   = now()
    FROM (SELECT _set_webhook.queue_name AS name) AS n
    LEFT JOIN queue_ext.webhook_targets AS t ON t.queue_name = n.name
    WHERE q.queue_name = n.name;
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

CREATE OR REPLACE FUNCTION queue_ext.pause_queue(queue_name text) RETURNS void
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

-- Cancels a job. Waiting, queued or retrying: it never runs (its dependents are cancelled
-- too); so is a webhook job still waiting in the dispatcher for a request slot. Running: it
-- is marked, and its worker learns it from heartbeat/update_progress
-- (false) or complete_job/fail_job (which then record it as cancelled). Producers may only
-- cancel their own jobs: for anyone else's they get the answer a job that does not exist
-- gets (_may_see_job), learning neither that it exists nor its state. Returns the job's
-- state after the call.
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

DROP FUNCTION queue_ext.purge_jobs(interval, text);

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

REVOKE ALL ON FUNCTION queue_ext.purge_jobs(interval, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION queue_ext.purge_jobs(interval, text, integer) TO queue_ext_admin;
REVOKE ALL ON PROCEDURE queue_ext.purge_jobs_in_batches(interval, text, integer, bigint) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE queue_ext.purge_jobs_in_batches(interval, text, integer, bigint) TO queue_ext_admin;

-- Retention of the delivery log, batched so a big backlog never holds a long transaction.
-- By the rows' addresses (a TID scan), as purge_jobs: a batch of 10,000 in ~17 ms, 85-105 by id.
CREATE OR REPLACE FUNCTION queue_ext._purge_deliveries(older_than interval) RETURNS integer
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM queue_ext.webhook_deliveries AS w
        WHERE w.ctid = ANY (ARRAY(SELECT d.ctid FROM queue_ext.webhook_deliveries AS d
                                  WHERE d.delivered_at < now() - older_than
                                  ORDER BY d.delivered_at LIMIT 10000))
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

-- Helpers whose plans are kept across calls (see the header).
CREATE OR REPLACE FUNCTION queue_ext._backoff(base interval, cap interval, attempt integer) RETURNS interval
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
AS $$
BEGIN
    RETURN make_interval(secs => least(extract(epoch FROM base)::float8
                                           * power(2::float8, least(greatest(attempt, 1) - 1, 1000)),
                                       extract(epoch FROM cap)::float8)
                                 * (0.5 + random() * 0.5));
END
$$;

CREATE OR REPLACE FUNCTION queue_ext._may_see_job(owner name) RETURNS boolean
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

CREATE OR REPLACE FUNCTION queue_ext._log_claim(j queue_ext.job_queue) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id,
                                          enqueued_by, at)
    SELECT j.id, j.queue_name,
           -- As job_status_history derives it (schema.sql).
           coalesce((SELECT s.to_status FROM queue_ext.job_status_log AS s
                     WHERE s.job_id = j.id ORDER BY s.id DESC LIMIT 1), 'queued'),
           'running', j.attempt, j.worker_id, j.enqueued_by, coalesce(j.claimed_at, j.started_at, now())
    WHERE j.status = 'running'
      AND (SELECT q.keep_history FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name)
      AND NOT EXISTS (SELECT 1 FROM queue_ext.job_status_log AS s
                      WHERE s.job_id = j.id AND s.attempt = j.attempt AND s.to_status = 'running');
END
$$;

ALTER FUNCTION queue_ext.enqueue_jobs(text, jsonb[], text, timestamptz, interval, integer, text, text)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION queue_ext._dependency_state(uuid, uuid[]) SET plan_cache_mode = force_generic_plan;

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
REVOKE ALL ON PROCEDURE queue_ext.wait_for_next_job(text[], interval, text, interval, uuid, text, jsonb,
                                                    queue_ext.job_priority, integer, integer, uuid, timestamptz,
                                                    timestamptz) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE queue_ext.wait_for_next_job(text[], interval, text, interval, uuid, text, jsonb,
                                                       queue_ext.job_priority, integer, integer, uuid, timestamptz,
                                                       timestamptz) TO queue_ext_worker;

-- Claims from several queues at once. Each queue contributes its best n candidates
-- (through the claim index), then the best n overall win. Candidates not chosen stay locked
-- only until the caller's transaction ends. Expired leases of these queues are returned
-- first, as in get_next_jobs(text, ...). An array of one name is that queue's own claim.
-- queue_names NULL (a catch-all worker) means every queue a SQL worker should do: not
-- webhook queues (their jobs are HTTP requests the dispatcher or process_jobs() makes: a
-- SQL worker would "complete" them without sending anything) and not the internal
-- queue_ext.* queues. A queue named explicitly is claimed whatever it is.
-- jit = off: the cached generic plan of the LATERAL claim is costed high enough to be
-- JIT-compiled on every call (measured: 300 ms per empty claim, 0.12 ms without).
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
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    unknown text;
    names text[] := get_next_jobs.queue_names;
    -- The jobs this call locked: see get_next_jobs(text, ...).
    row_ids tid[];
    ids uuid[];
    old_statuses queue_ext.job_state[];
    any_logged boolean;  -- whether any of them is in a queue that stores its claims
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
    IF cardinality(names) = 1 THEN
        -- One queue: its own claim, which also starts from floors while the xmin horizon is
        -- held (claim_window.rs); the claim below is for several.
        RETURN QUERY SELECT * FROM queue_ext._claim_jobs(names[1], get_next_jobs.n, get_next_jobs.worker_id,
                                                         get_next_jobs.lease, NULL);
        RETURN;
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
    -- Lock, then change: see get_next_jobs(text, ...).
    SELECT array_agg(n.ctid), array_agg(n.id), array_agg(n.status), bool_or(n.log_claim)
    INTO row_ids, ids, old_statuses, any_logged
    FROM (SELECT c.ctid, c.id, c.status, q.keep_history AND q.notify AS log_claim
          FROM queue_ext.queues AS q
          CROSS JOIN LATERAL (
              SELECT j.ctid, j.id, j.status, j.priority, j.run_at
              FROM queue_ext.job_queue AS j
              WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL
                AND j.run_at <= now()
              ORDER BY j.priority DESC, j.run_at, j.id
              LIMIT get_next_jobs.n
              FOR UPDATE SKIP LOCKED
          ) AS c
          WHERE NOT q.paused AND q.queue_name = ANY (names)
          ORDER BY c.priority DESC, c.run_at, c.id
          LIMIT get_next_jobs.n) AS n;
    IF row_ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH claimed AS (
        UPDATE queue_ext.job_queue AS j
        SET status = 'running',
            attempt = j.attempt + 1,
            lease_token = queue_ext._lease_token(),
            lease_expires_at = now() + coalesce(get_next_jobs.lease,
                (SELECT q.lease_duration FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name)),
            worker_id = get_next_jobs.worker_id,
            started_at = coalesce(j.started_at, now()),
            claimed_at = now()
        WHERE j.ctid = ANY (row_ids)  -- see get_next_jobs(text, ...)
        RETURNING j.*
    )
    SELECT id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at, created_at
    FROM claimed
    ORDER BY priority DESC, run_at, id;
    IF any_logged THEN
        -- Stored only to be published (job_status_log).
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT j.id, j.queue_name, u.old_status, 'running', j.attempt, j.worker_id, j.enqueued_by
        FROM unnest(ids, old_statuses) AS u(id, old_status)
        JOIN queue_ext.job_queue AS j ON j.id = u.id
        JOIN queue_ext.queues AS q ON q.queue_name = j.queue_name
        WHERE q.keep_history AND q.notify;
    END IF;
END
$$;
