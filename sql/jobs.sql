-- The job lifecycle: enqueue, claim, complete, fail, lease expiry.

-- What a claim hands to a worker: everything needed to do the job and to report on it.
CREATE TYPE queue_ext.claimed_job AS (
    job_id           uuid,
    queue_name       text,
    payload          jsonb,
    priority         queue_ext.job_priority,
    attempt          integer,
    max_attempts     integer,
    lease_token      uuid,
    lease_expires_at timestamptz,
    enqueued_at      timestamptz
);

-- Enqueues one job and returns its id. dedupe_key: at most one unfinished job per queue,
-- producer (the enqueuing role) and key. An enqueue whose key matches a live job of the
-- same role returns that job's id and enqueues nothing; keys are scoped to the role, so two
-- producers using the same key each get their own job, and neither can receive, or learn
-- of, the other's. Queues named queue_ext.* are internal: enqueueing there raises 42501.
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
    q queue_ext.queues;
    new_id uuid := queue_ext.uuid_generate_v7();
    who text := queue_ext._invoker();
    start timestamptz;  -- NULL: now()
    prio queue_ext.job_priority;  -- NULL: normal
    existing uuid;
    initial queue_ext.job_state := 'queued';
    blocked_by uuid;
    took_slot boolean := false;
BEGIN
    -- Each PL/pgSQL expression costs microseconds of setup in every transaction, and an
    -- enqueue is often a transaction of its own: the usual call (a queue, a payload, nothing
    -- else) evaluates one condition for all the options instead of a check and a helper call
    -- each. The checks run in the same order either way, so an error names the same problem.
    SELECT * INTO q FROM queue_ext.queues AS t WHERE t.queue_name = enqueue_job.queue_name;
    IF NOT FOUND THEN
        q := queue_ext._queue(enqueue_job.queue_name);  -- raises: no such queue
    END IF;
    IF num_nonnulls(enqueue_job.run_at, enqueue_job.delay) > 0 OR q.queue_name LIKE 'queue\_ext.%' THEN
        start := queue_ext._start_time(enqueue_job.run_at, enqueue_job.delay);
        IF q.queue_name LIKE 'queue\_ext.%' THEN
            PERFORM queue_ext._refuse_internal(q.queue_name, 'enqueue into');
        END IF;
    END IF;
    IF enqueue_job.payload IS NULL OR jsonb_typeof(enqueue_job.payload) <> 'object'
       OR pg_column_size(enqueue_job.payload) > queue_ext.max_payload_bytes() THEN
        PERFORM queue_ext._check_payload(enqueue_job.payload);
    END IF;
    IF num_nonnulls(enqueue_job.max_attempts, enqueue_job.rate_limit_key, enqueue_job.concurrency_key,
                    enqueue_job.dedupe_key) > 0 OR enqueue_job.priority IS DISTINCT FROM 'normal' THEN
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
        prio := queue_ext._priority(enqueue_job.priority);
    END IF;
    IF enqueue_job.depends_on IS NOT NULL AND cardinality(enqueue_job.depends_on) > 0 THEN
        SELECT w.state, w.blocked_by INTO initial, blocked_by
        FROM queue_ext._dependency_state(new_id, enqueue_job.depends_on) AS w;
        IF initial = 'cancelled' THEN
            -- A dependency is already dead or cancelled: this job can never run.
            INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
                last_error, enqueued_by, created_at, run_at, rate_limit_key, concurrency_key)
            VALUES (new_id, q.queue_name, enqueue_job.payload, coalesce(prio, 'normal'), 'cancelled',
                0, coalesce(enqueue_job.max_attempts, q.max_attempts),
                format('dependency %s is dead or cancelled', blocked_by), who, now(), coalesce(start, now()),
                enqueue_job.rate_limit_key, enqueue_job.concurrency_key);
            INSERT INTO queue_ext.job_status_log (job_id, queue_name, to_status, attempt, error, enqueued_by)
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
        VALUES (new_id, q.queue_name, enqueue_job.payload, coalesce(prio, 'normal'), initial, coalesce(start, now()),
                coalesce(enqueue_job.max_attempts, q.max_attempts), who,
                enqueue_job.rate_limit_key, enqueue_job.concurrency_key);
    ELSE
        -- Race-free: a concurrent enqueue with the same key makes us wait for its commit,
        -- then we see its job instead of inserting our own.
        LOOP
            INSERT INTO queue_ext.job_queue (id, queue_name, payload, priority, status, run_at, max_attempts,
                                             enqueued_by, dedupe_key, rate_limit_key, concurrency_key)
            VALUES (new_id, q.queue_name, enqueue_job.payload, coalesce(prio, 'normal'), initial,
                    coalesce(start, now()), coalesce(enqueue_job.max_attempts, q.max_attempts), who, enqueue_job.dedupe_key,
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
    IF initial <> 'queued' OR coalesce(start > now(), false) THEN
        NULL;
    ELSIF q.is_webhook THEN
        PERFORM queue_ext._wake_dispatcher_at_commit();
    ELSIF NOT queue_ext._announce_at_commit(q.queue_name) THEN
        PERFORM pg_notify('queue_ext_jobs', q.queue_name);
    END IF;
    RETURN new_id;
END
$$;

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
-- Plans kept across calls: left to choose, the plan cache planned its array statements
-- afresh on every call (58 µs of each; 17% of a batch of 20).
SET plan_cache_mode = force_generic_plan
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

-- The floors of a windowed claim on queue_name (claim_window.rs), per priority from critical
-- to low, in claim order (run_at, id): the oldest job waiting there, or, when there is none
-- or it is younger, this probe's time less a margin for producers whose transaction began
-- before the probe and commits after it. It walks the claim index from the start, as an
-- ordinary claim does, and stores the floors for this session's next claims.
CREATE FUNCTION queue_ext._claim_window_probe(queue_name text, OUT run_ats timestamptz[], OUT ids uuid[])
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    margin CONSTANT interval := '2 seconds';
BEGIN
    SELECT array_agg(CASE WHEN o.run_at < now() - margin THEN o.run_at ELSE now() - margin END ORDER BY p.ord),
           array_agg(CASE WHEN o.run_at < now() - margin THEN o.id ELSE '00000000-0000-0000-0000-000000000000' END
                     ORDER BY p.ord)
    INTO run_ats, ids
    FROM unnest('{critical,high,normal,low}'::queue_ext.job_priority[]) WITH ORDINALITY AS p(priority, ord)
    LEFT JOIN LATERAL (
        SELECT j.run_at, j.id FROM queue_ext.job_queue AS j
        WHERE j.queue_name = _claim_window_probe.queue_name
          AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL AND j.priority = p.priority
        ORDER BY j.run_at, j.id
        LIMIT 1
    ) AS o ON true;
    PERFORM queue_ext._claim_window_set(_claim_window_probe.queue_name, run_ats, ids);
END
$$;

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

-- A worker's claim of up to n runnable jobs from one queue (_claim_jobs).
CREATE FUNCTION queue_ext.get_next_jobs(
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
CREATE FUNCTION queue_ext.get_next_jobs(
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

-- The claim when rate limits exist: as above, plus the jobs of every rate-limited key that
-- has tokens (at most as many as it has), and one token spent per job claimed. The bucket
-- update re-checks the tokens on the newest row version, so concurrent claimers cannot
-- overspend: a key whose tokens went meanwhile has none of its jobs claimed this time.
-- queue_names NULL means every queue; lease NULL means each queue's own. Called only by
-- the get_next_jobs overloads, after they returned the expired leases of these queues.
-- jit = off: the planner cannot know how few rows the per-key LIMITs yield, overestimates
-- the statement's cost and JIT-compiles it on every call (measured: 66 ms of a 70 ms claim).
CREATE FUNCTION queue_ext._claim_limited(queue_names text[], n integer, worker_id text, lease interval)
RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE
SET jit = off
SET enable_seqscan = off
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH open_queues AS (
        SELECT q.queue_name, q.lease_duration, q.keep_history AND q.notify AS log_claim FROM queue_ext.queues AS q
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
            lease_token = queue_ext._lease_token(),
            lease_expires_at = now() + coalesce(_claim_limited.lease,
                (SELECT o.lease_duration FROM open_queues AS o WHERE o.queue_name = j.queue_name)),
            worker_id = _claim_limited.worker_id,
            started_at = coalesce(j.started_at, now()),
            claimed_at = now()
        -- By primary key from an array, not joined to next: a join let a cached generic plan
        -- (LIMIT unknown, guessed at 10% of the table) hash a sequential scan of the whole
        -- job_queue on every claim, or rescan the index once per row.
        WHERE j.id = ANY (ARRAY(SELECT n.id FROM next AS n
                                WHERE n.rate_key IS NULL OR n.rate_key IN (SELECT s.key FROM spent AS s)))
        RETURNING j.*
    ), history AS (
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT c.id, c.queue_name, n.old_status, 'running', c.attempt, c.worker_id, c.enqueued_by
        FROM claimed AS c JOIN next AS n ON n.id = c.id JOIN open_queues AS o ON o.queue_name = c.queue_name
        WHERE o.log_claim  -- stored only to be published (job_status_log)
    )
    SELECT id, queue_name, payload, priority, attempt, max_attempts, lease_token, lease_expires_at, created_at
    FROM claimed
    ORDER BY priority DESC, run_at, id;
END
$$;

-- One job. PL/pgSQL, not SQL: a VOLATILE SQL function is never inlined, and PostgreSQL 15
-- plans its body again on every call (measured: 45 us of a 400 us claim + complete). The
-- one-queue form calls the claim itself, not get_next_jobs: each layer of RETURN QUERY costs
-- 20-45 us of a 280 us claim + complete (pg_stat_statements, one client).
CREATE FUNCTION queue_ext.get_next_job(queue_name text, worker_id text DEFAULT NULL, lease interval DEFAULT NULL)
RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT * FROM queue_ext._claim_jobs(get_next_job.queue_name, 1, get_next_job.worker_id,
                                                     get_next_job.lease, NULL);
END
$$;

CREATE FUNCTION queue_ext.get_next_job(queue_names text[], worker_id text DEFAULT NULL, lease interval DEFAULT NULL)
RETURNS SETOF queue_ext.claimed_job
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RETURN QUERY SELECT * FROM queue_ext.get_next_jobs(get_next_job.queue_names, 1, get_next_job.worker_id,
                                                      get_next_job.lease);
END
$$;

-- Stores the claim of a running job's current attempt, for a transition that ends it some
-- other way than completion (job_status_log: the claim was not stored when it was made).
-- Nothing when it is stored already (a queue with notify on) or the queue keeps no history.
-- The caller passes the job's row as it was while running. (PL/pgSQL, whose plans are kept: as
-- a SQL function its INSERT was planned on every call, 150 µs of each failure or cancel.)
CREATE FUNCTION queue_ext._log_claim(j queue_ext.job_queue) RETURNS void
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

-- Stores the claim and completion rows of completed jobs (given as they were while running)
-- that job_status_history would otherwise derive: in a queue with notify on (to publish
-- them), or claimed before claimed_at existed. The claims first: ids order a job's rows.
CREATE FUNCTION queue_ext._log_completions(jobs queue_ext.job_queue[]) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF cardinality(jobs) > 0 THEN
        PERFORM queue_ext._log_claim(j) FROM unnest(jobs) AS j;
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, enqueued_by)
        SELECT j.id, j.queue_name, 'running', 'completed', j.attempt, j.worker_id, j.enqueued_by FROM unnest(jobs) AS j;
    END IF;
END
$$;

-- Completes a running job if the lease allows. Returns its new state ('completed', or
-- 'cancelled' when cancel_job() was called while it ran), or NULL when it matched no
-- running job. The dispatcher uses this directly (a refused result is logged, not
-- raised); complete_job raises instead.
CREATE FUNCTION queue_ext._complete(job_id uuid, result jsonb, lease_token uuid) RETURNS queue_ext.job_state
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    j queue_ext.job_queue;
    q queue_ext.queues;
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
    SELECT * INTO q FROM queue_ext.queues AS t WHERE t.queue_name = j.queue_name;
    final := CASE WHEN j.cancel_requested IS NULL THEN 'completed' ELSE 'cancelled' END;
    -- A queue without history deletes its completed jobs (cancelled ones are still kept).
    IF q.keep_history OR final = 'cancelled' THEN
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            worker_id, result, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at, started_at,
            rate_limit_key, concurrency_key, claimed_at)
        VALUES (j.id, j.queue_name, j.payload, j.priority, final, j.attempt, j.max_attempts,
            j.worker_id, _complete.result, coalesce(j.cancel_requested, j.last_error), j.errors,
            CASE WHEN final = 'completed' THEN 100 ELSE j.progress END, j.progress_details,
            j.enqueued_by, j.created_at, j.run_at, j.started_at, j.rate_limit_key, j.concurrency_key, j.claimed_at);
        -- A completion's rows are derived from the archive row (job_status_log), unless they
        -- are to be published, or the claim predates claimed_at (running across an upgrade).
        IF final = 'cancelled' OR q.notify OR j.claimed_at IS NULL THEN
            PERFORM queue_ext._log_claim(j);
            INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
            VALUES (j.id, j.queue_name, 'running', final, j.attempt, j.worker_id, j.cancel_requested, j.enqueued_by);
        END IF;
    END IF;
    IF final = 'completed' THEN
        PERFORM queue_ext._count_at_commit(j.queue_name, 'completed', 1);
        -- Most jobs have no dependents: one index probe instead of a call. (An enqueue that
        -- adds a dependent holds a lock on this job's row, which our DELETE waited for.)
        IF EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = j.id) THEN
            PERFORM queue_ext._release_dependents(j.id);
        END IF;
    ELSE
        PERFORM queue_ext._cancel_dependents(j.id, format('dependency %s was cancelled', j.id));
    END IF;
    IF q.has_callback THEN
        PERFORM queue_ext._emit_callback(j, CASE final WHEN 'completed' THEN 'job.completed' ELSE 'job.cancelled' END,
                                         _complete.result);
    END IF;
    RETURN final;
END
$$;

-- Records success and returns the job's final state: 'completed', or 'cancelled' if
-- cancel_job() was called while it ran. With lease_token, only the holder of a live lease
-- may complete; without it (an operator in psql) the current attempt is completed.
CREATE FUNCTION queue_ext.complete_job(job_id uuid, result jsonb DEFAULT NULL, lease_token uuid DEFAULT NULL)
RETURNS queue_ext.job_state
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    final queue_ext.job_state := queue_ext._complete(complete_job.job_id, complete_job.result, complete_job.lease_token);
BEGIN
    IF final IS NULL THEN
        PERFORM queue_ext._raise_not_running(complete_job.job_id, complete_job.lease_token, 'complete');
    END IF;
    RETURN final;
END
$$;

-- Completes many jobs in one call, set-based: one statement per table for the whole batch
-- instead of a call per job (what a worker that claims with get_next_jobs(q, 100) wants).
-- lease_tokens and results, when given, pair with job_ids by position. Returns each job's
-- new state, or NULL for a job that was not running under that lease (it is left alone;
-- unlike complete_job, one stale lease does not undo the rest of the batch).
CREATE FUNCTION queue_ext.complete_jobs(job_ids uuid[], lease_tokens uuid[] DEFAULT NULL, results jsonb[] DEFAULT NULL)
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
    logged queue_ext.job_queue[];        -- completions whose rows are stored (see _complete)
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
                  -- A completion's rows are stored only to be published, or when its claim
                  -- predates claimed_at (see _complete); a cancellation's in the loop below.
                  CASE WHEN q.keep_history AND t.cancel_requested IS NULL AND (q.notify OR t.claimed_at IS NULL)
                       THEN t END AS logged_job,
                  CASE WHEN t.cancel_requested IS NULL THEN 'completed' ELSE 'cancelled' END::queue_ext.job_state AS final,
                  CASE WHEN t.cancel_requested IS NOT NULL OR q.has_callback THEN t END AS follow_job
    ), archived AS (
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            worker_id, result, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at, started_at,
            rate_limit_key, concurrency_key, claimed_at)
        SELECT id, queue_name, payload, priority, final, attempt, max_attempts, worker_id, new_result,
               coalesce(cancel_requested, last_error), errors, CASE WHEN final = 'completed' THEN 100 ELSE progress END,
               progress_details, enqueued_by, created_at, run_at, started_at, rate_limit_key, concurrency_key, claimed_at
        FROM done WHERE kept
    )
    -- (A row value IS NOT NULL only when every field is: IS DISTINCT FROM NULL asks whether
    -- there is a row at all.)
    SELECT array_agg(id), array_agg(final), array_agg(queue_name),
           array_agg(follow_job) FILTER (WHERE follow_job IS DISTINCT FROM NULL),
           array_agg(final) FILTER (WHERE follow_job IS DISTINCT FROM NULL),
           array_agg(new_result) FILTER (WHERE follow_job IS DISTINCT FROM NULL),
           array_agg(has_callback) FILTER (WHERE follow_job IS DISTINCT FROM NULL),
           array_agg(logged_job) FILTER (WHERE logged_job IS DISTINCT FROM NULL)
    INTO done_ids, done_states, done_queues, follow, follow_states, follow_results, follow_callbacks, logged
    FROM done;
    PERFORM queue_ext._log_completions(logged);
    PERFORM queue_ext._count_at_commit(u.q, 'completed', count(*))
    FROM unnest(done_queues, done_states) AS u(q, s) WHERE u.s = 'completed' GROUP BY u.q;
    -- Dependents to release, looked up by a statement of their own: an enqueue that named one
    -- of these jobs as a dependency locked its row, and the DELETE above waited for it; only
    -- a snapshot taken after that wait sees the edge it added.
    -- (Most databases have no dependency at all: one probe instead of one per job.)
    IF EXISTS (SELECT 1 FROM queue_ext.job_dependencies) THEN
        PERFORM queue_ext._release_dependents(u.id)
        FROM unnest(done_ids, done_states) AS u(id, s)
        WHERE u.s = 'completed' AND EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.depends_on = u.id);
    END IF;

    -- The rest is per job, and rare: dependents to cancel, callbacks to send.
    FOR k IN 1 .. coalesce(cardinality(follow), 0) LOOP
        IF follow_states[k] = 'cancelled' THEN
            PERFORM queue_ext._log_claim(follow[k]);
            INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
            VALUES (follow[k].id, follow[k].queue_name, 'running', 'cancelled', follow[k].attempt, follow[k].worker_id,
                    follow[k].cancel_requested, follow[k].enqueued_by);
            PERFORM queue_ext._cancel_dependents(follow[k].id, format('dependency %s was cancelled', follow[k].id));
        END IF;
        IF follow_callbacks[k] THEN
            PERFORM queue_ext._emit_callback(follow[k],
                CASE follow_states[k] WHEN 'completed' THEN 'job.completed' ELSE 'job.cancelled' END, follow_results[k]);
        END IF;
    END LOOP;
    IF done_ids = complete_jobs.job_ids THEN
        -- Every job done, in the order given (the usual batch): nothing to match up.
        RETURN QUERY SELECT * FROM unnest(done_ids, done_states);
    ELSE
        RETURN QUERY SELECT u.id, f.state
                     FROM unnest(complete_jobs.job_ids) WITH ORDINALITY AS u(id, i)
                     LEFT JOIN unnest(done_ids, done_states) AS f(id, state) ON f.id = u.id
                     ORDER BY u.i;
    END IF;
END
$$;

-- Moves a job (already deleted from job_queue by the caller) into the dead letter queue.
CREATE FUNCTION queue_ext._bury(j queue_ext.job_queue, reason text, error text) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    INSERT INTO queue_ext.job_dead_letter (id, queue_name, payload, priority, attempt, max_attempts,
        worker_id, last_error, errors, reason, enqueued_by, created_at, started_at, rate_limit_key, concurrency_key)
    VALUES (j.id, j.queue_name, j.payload, j.priority, j.attempt, j.max_attempts,
        j.worker_id, j.last_error, j.errors, reason, j.enqueued_by, j.created_at, j.started_at,
        j.rate_limit_key, j.concurrency_key);
    INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
    VALUES (j.id, j.queue_name, j.status, 'dead', j.attempt, j.worker_id, error, j.enqueued_by);
    PERFORM queue_ext._count_at_commit(j.queue_name, 'dead', 1);
    PERFORM queue_ext._cancel_dependents(j.id, format('dependency %s is dead', j.id));
    IF (SELECT has_callback FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name) THEN
        PERFORM queue_ext._emit_callback(j, 'job.dead', NULL);
    END IF;
END
$$;

-- Records a failed attempt. The job is retried after backoff (or after retry_in, e.g. an
-- HTTP Retry-After), or buried in the dead letter queue when its attempts are used up or
-- the failure is permanent. Returns the job's new status.
-- Like complete, the non-raising core (NULL when no running job matched) and the API.
CREATE FUNCTION queue_ext._fail(
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
    PERFORM queue_ext._log_claim(j);
    failure := jsonb_build_object('attempt', j.attempt, 'error', message, 'at', now(), 'worker_id', j.worker_id);
    j.errors := j.errors || jsonb_build_array(failure);
    j.last_error := message;
    PERFORM queue_ext._count_at_commit(j.queue_name, 'failed', 1);

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
    INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
    VALUES (j.id, j.queue_name, 'running', 'retrying', j.attempt, j.worker_id, message, j.enqueued_by);
    IF q.has_callback THEN
        PERFORM queue_ext._emit_callback(j, 'job.failed', NULL);
    END IF;
    RETURN 'retrying';
END
$$;

CREATE FUNCTION queue_ext.fail_job(
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

-- Returns running jobs to the queue, counting the lost attempt as a failure with `reason`;
-- jobs out of attempts go to the dead letter queue. Either those whose lease expired, or
-- (only_worker) every job a restarted dispatcher held; of the queues in queue_names only,
-- when given (a claim returns the expired leases of the queues it claims from). The one
-- path for lost attempts: cleanup_stuck_jobs, the dispatcher and every claim use it.
-- Returns how many it handled.
CREATE FUNCTION queue_ext._return_running(only_worker text, reason text, queue_names text[] DEFAULT NULL)
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
        WHERE t.status = 'running' AND t.lease_expires_at IS NOT NULL  -- (always: lets job_queue_lease_idx serve)
          -- A bound of the index scan: it stops at the first lease still running, instead of
          -- reading every entry (the dead ones of finished jobs too, until vacuum).
          AND t.lease_expires_at <= CASE WHEN only_worker IS NULL THEN now() ELSE 'infinity' END
          AND (only_worker IS NULL OR t.worker_id = only_worker)
          AND (queue_names IS NULL OR t.queue_name = ANY (queue_names))
        ORDER BY t.lease_expires_at
        FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM queue_ext._log_claim(j);
        j.errors := j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempt, 'error', reason, 'at', now(), 'worker_id', j.worker_id));
        j.last_error := reason;
        PERFORM queue_ext._count_at_commit(j.queue_name, 'failed', 1);
        IF j.attempt >= j.max_attempts THEN
            DELETE FROM queue_ext.job_queue WHERE id = j.id;
            PERFORM queue_ext._bury(j, format('%s on the last of %s attempts', reason, j.max_attempts), reason);
        ELSE
            UPDATE queue_ext.job_queue
            SET status = 'queued', run_at = now(), lease_token = NULL, lease_expires_at = NULL,
                last_error = j.last_error, errors = j.errors
            WHERE id = j.id;
            INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, worker_id, error, enqueued_by)
            VALUES (j.id, j.queue_name, 'running', 'queued', j.attempt, j.worker_id, reason, j.enqueued_by);
            PERFORM queue_ext._announce(j.queue_name);
        END IF;
        handled := handled + 1;
    END LOOP;
    RETURN handled;
END
$$;

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

-- Returns running jobs whose lease has expired to the queue (the attempt counts, with the
-- error "lease expired"). Safe to run concurrently and from pg_cron; the dispatcher also
-- runs it every few seconds. Returns how many jobs it handled.
CREATE FUNCTION queue_ext.cleanup_stuck_jobs() RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT queue_ext._return_running(NULL, 'lease expired') $$;

-- Completes a job and claims the next one from `queue_name` in one call and one
-- transaction: a busy worker pays one round trip and one commit per job instead of two.
CREATE FUNCTION queue_ext.complete_and_get_next(
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
