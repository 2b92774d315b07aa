-- queue_ext: types, tables, indexes, roles and row level security.
--
-- Where a job lives tells you its lifecycle stage, and keeps the claim path small:
--   job_queue        live jobs only (waiting, queued, retrying, running): what claims scan
--   job_archive      finished jobs (completed, cancelled) with their result
--   job_dead_letter  jobs that exhausted their attempts or failed permanently
-- A job id is in exactly one of the three at any time. job_status_history (a view) shows every
-- move: job_status_log stores those the job's own row cannot tell (schema's end says which).

-- The live states come first (job_queue_live_state relies on the order).
CREATE TYPE queue_ext.job_state AS ENUM (
    'waiting',    -- held until its dependencies complete, or a slot of its concurrency key frees
    'queued',     -- runnable at run_at
    'retrying',   -- failed; runnable again at run_at (after backoff)
    'running',    -- claimed by a worker, under a lease
    'completed',
    'dead',       -- in job_dead_letter
    'cancelled'
);

-- Declared lowest first so that ORDER BY priority DESC claims critical work first.
CREATE TYPE queue_ext.job_priority AS ENUM ('low', 'normal', 'high', 'critical');

CREATE TABLE queue_ext.queues (
    queue_name       text PRIMARY KEY,
    max_attempts     integer     NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 1000),
    -- Bounds as create_queue/alter_queue check them (queues.sql says why).
    backoff_base     interval    NOT NULL DEFAULT '1 second' CHECK (backoff_base BETWEEN interval '0' AND interval '1 day'),
    backoff_cap      interval    NOT NULL DEFAULT '1 hour' CHECK (backoff_cap BETWEEN interval '0' AND interval '30 days'),
    lease_duration   interval    NOT NULL DEFAULT '5 minutes'
                     CHECK (lease_duration BETWEEN interval '1 second' AND interval '7 days'),
    paused           boolean     NOT NULL DEFAULT false,
    -- Both maintained by create_queue/alter_queue from queue_ext.webhook_targets, so the hot
    -- paths learn what they must do from the queue row they already read.
    is_webhook       boolean     NOT NULL DEFAULT false,
    has_callback     boolean     NOT NULL DEFAULT false,
    -- Publish every state change of this queue's jobs with NOTIFY on queue_ext_events.
    notify           boolean     NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- false: the routine records of every job (its claim and completion rows in
    -- job_status_history, and its job_archive row once completed) are not kept, for
    -- high-volume queues that do not need them; failures, retries, dead letters,
    -- cancellations and admin actions are still recorded. (Last: upgrades add it here.)
    keep_history     boolean     NOT NULL DEFAULT true,
    CONSTRAINT queue_name_format CHECK (queue_name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    CONSTRAINT backoff_cap_not_below_base CHECK (backoff_cap >= backoff_base)
);
COMMENT ON TABLE queue_ext.queues IS 'One row per queue: its defaults for retries, backoff and leases.';

-- No foreign key to queues on purpose: every enqueue would take FOR KEY SHARE on the queue
-- row, and concurrent producers would then pile up in MultiXacts. enqueue_job checks the
-- queue itself and drop_queue removes a queue's jobs.
CREATE TABLE queue_ext.job_queue (
    id               uuid        PRIMARY KEY,
    queue_name       text        NOT NULL,
    payload          jsonb       NOT NULL,
    priority         queue_ext.job_priority NOT NULL DEFAULT 'normal',
    status           queue_ext.job_state   NOT NULL DEFAULT 'queued',
    run_at           timestamptz NOT NULL DEFAULT now(),
    attempt          integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL,
    lease_token      uuid,
    lease_expires_at timestamptz,
    worker_id        text,
    last_error       text,
    errors           jsonb       NOT NULL DEFAULT '[]',
    enqueued_by      text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    heartbeat_at     timestamptz,
    progress         real,       -- 0 to 100: update_progress() is its only writer and checks it
    progress_details jsonb,
    cancel_requested text,       -- the reason, once cancel_job() was called on the running job
    dedupe_key       text,
    rate_limit_key   text,       -- claimed no faster than queue_ext.rate_limits allows (limits.sql)
    concurrency_key  text,       -- at most max_running of the key hold a slot at once (limits.sql)
    -- When the current attempt was claimed (started_at is the first attempt's). With the
    -- job's status, attempt and worker it is the claim's history row (job_status_history).
    claimed_at       timestamptz,
    -- A live state (job_state declares them first), and a running job holds a lease.
    -- PostgreSQL decodes and prepares a table's CHECK expressions again for every statement
    -- that writes it, each costing a few microseconds: the hot table has one, small (an IN
    -- list is an array constant, decoded byte by byte).
    CONSTRAINT job_queue_live_state
        CHECK (status <= 'running' AND (status <> 'running' OR (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)))
);
COMMENT ON TABLE queue_ext.job_queue IS 'Live jobs only; finished jobs move to job_archive or job_dead_letter.';

-- The claim index: only runnable rows are in it, in claim order. Rate-limited jobs have
-- their own, so that a key out of tokens is never scanned past: claims visit only keys
-- with tokens (limits.sql), and only in queues that hold rate-limited jobs at all.
CREATE INDEX job_queue_claim_idx ON queue_ext.job_queue (queue_name, priority DESC, run_at, id)
    WHERE status IN ('queued', 'retrying') AND rate_limit_key IS NULL;
CREATE INDEX job_queue_rate_claim_idx ON queue_ext.job_queue (queue_name, rate_limit_key, priority DESC, run_at, id)
    WHERE status IN ('queued', 'retrying') AND rate_limit_key IS NOT NULL;
-- Jobs held for a slot of their concurrency key, in the order they are admitted.
CREATE INDEX job_queue_key_waiting_idx ON queue_ext.job_queue (concurrency_key, id)
    WHERE status = 'waiting' AND concurrency_key IS NOT NULL;
-- Deduplication: at most one unfinished job per (queue, producer, dedupe_key). job_queue
-- holds only unfinished jobs, so a plain unique index is exactly the rule. The producer is
-- part of the key so that one role's key never matches, and hands back, another role's job.
CREATE UNIQUE INDEX job_queue_dedupe_idx ON queue_ext.job_queue (queue_name, enqueued_by, dedupe_key)
    WHERE dedupe_key IS NOT NULL;
-- Leases by expiry, for the probes that return expired ones. The predicate is the lease
-- itself, not status = 'running': the statements that change one job by id also say
-- status = 'running', and with that predicate the planner could read this whole index
-- instead of the primary key (it looks as small as one lookup), visiting every entry of
-- every finished job that vacuum cannot remove yet (an old snapshot held somewhere).
CREATE INDEX job_queue_lease_idx ON queue_ext.job_queue (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;

CREATE TABLE queue_ext.job_archive (
    id               uuid        PRIMARY KEY,
    queue_name       text        NOT NULL,
    payload          jsonb       NOT NULL,
    priority         queue_ext.job_priority NOT NULL,
    status           queue_ext.job_state   NOT NULL CHECK (status = 'completed' OR status = 'cancelled'),
    attempt          integer     NOT NULL,
    max_attempts     integer     NOT NULL,
    worker_id        text,
    result           jsonb,
    last_error       text,
    errors           jsonb       NOT NULL DEFAULT '[]',
    progress         real,
    progress_details jsonb,
    enqueued_by      text        NOT NULL,
    created_at       timestamptz NOT NULL,
    run_at           timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz NOT NULL DEFAULT now(),
    rate_limit_key   text,
    concurrency_key  text,
    claimed_at       timestamptz  -- of the last attempt: its claim's history row, with finished_at its completion's
);
COMMENT ON TABLE queue_ext.job_archive IS 'Finished jobs (completed or cancelled); purge_jobs() applies retention.';
CREATE INDEX job_archive_finished_idx ON queue_ext.job_archive (finished_at);

CREATE TABLE queue_ext.job_dead_letter (
    id               uuid        PRIMARY KEY,
    queue_name       text        NOT NULL,
    payload          jsonb       NOT NULL,
    priority         queue_ext.job_priority NOT NULL,
    attempt          integer     NOT NULL,
    max_attempts     integer     NOT NULL,
    worker_id        text,
    last_error       text,
    errors           jsonb       NOT NULL DEFAULT '[]',
    reason           text        NOT NULL,
    enqueued_by      text        NOT NULL,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    died_at          timestamptz NOT NULL DEFAULT now(),
    rate_limit_key   text,
    concurrency_key  text
);
COMMENT ON TABLE queue_ext.job_dead_letter IS 'Jobs that exhausted their attempts or failed permanently; retry_dead_job() redrives one.';
CREATE INDEX job_dead_letter_died_idx ON queue_ext.job_dead_letter (died_at);

-- Edges of the dependency graph that are not yet satisfied: job_id waits for depends_on.
-- An edge is deleted when depends_on completes; a job whose last edge goes becomes queued.
CREATE TABLE queue_ext.job_dependencies (
    job_id     uuid NOT NULL,
    depends_on uuid NOT NULL,
    PRIMARY KEY (job_id, depends_on)
);
CREATE INDEX job_dependencies_depends_on_idx ON queue_ext.job_dependencies (depends_on);
SELECT pg_catalog.pg_extension_config_dump('queue_ext.job_dependencies', '');

-- The stored part of job_status_history: every transition except the two routine ones a job's
-- own row records, the claim of its current attempt while it runs (job_queue.claimed_at) and,
-- once it completed, that claim and the completion (job_archive.claimed_at, finished_at). The
-- hot paths write no history row for them; any other way out of running stores the claim
-- first (_log_claim). Queues with notify on store the routine rows too: events are published
-- from this table's inserts (events.sql).
CREATE TABLE queue_ext.job_status_log (
    -- Orders one job's rows. Not a key: nothing looks a row up by it, and an index on it
    -- would cost every transition one more index insert.
    id          bigint      GENERATED ALWAYS AS IDENTITY,
    job_id      uuid        NOT NULL,
    queue_name  text        NOT NULL,
    from_status queue_ext.job_state,
    to_status   queue_ext.job_state NOT NULL,
    attempt     integer     NOT NULL,
    worker_id   text,
    error       text,
    enqueued_by text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE queue_ext.job_status_log IS 'The stored transitions of job_status_history: all but a running or completed job''s last claim and its completion, which the job''s row records.';
CREATE INDEX job_status_log_job_idx ON queue_ext.job_status_log (job_id);
-- The failed attempts, by time (metrics(): failures in the last 5 minutes). Routine rows
-- are not in it, so it costs them nothing.
CREATE INDEX job_status_log_failures_idx ON queue_ext.job_status_log (at)
    WHERE from_status = 'running' AND to_status IN ('retrying', 'dead');
-- Without a primary key, logical replication of purge_jobs()'s deletes needs the whole row.
ALTER TABLE queue_ext.job_status_log REPLICA IDENTITY FULL;

-- pg_dump keeps the data of these tables although they belong to the extension.
SELECT pg_catalog.pg_extension_config_dump('queue_ext.queues', '');
SELECT pg_catalog.pg_extension_config_dump('queue_ext.job_queue', '');
SELECT pg_catalog.pg_extension_config_dump('queue_ext.job_archive', '');
SELECT pg_catalog.pg_extension_config_dump('queue_ext.job_dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump('queue_ext.job_status_log', '');
SELECT pg_catalog.pg_extension_config_dump('queue_ext.job_status_log_id_seq', '');

-- Roles are cluster-wide: a second database's CREATE EXTENSION finds them already there.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'queue_ext_producer') THEN
        CREATE ROLE queue_ext_producer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'queue_ext_worker') THEN
        CREATE ROLE queue_ext_worker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'queue_ext_admin') THEN
        CREATE ROLE queue_ext_admin NOLOGIN;
    END IF;
END
$roles$;
GRANT queue_ext_producer, queue_ext_worker TO queue_ext_admin;

-- Row level security. Mutations go through SECURITY DEFINER functions (run as the table
-- owner, who bypasses RLS, so claims pay nothing for it); the policies govern what each
-- role can read directly and through the SECURITY INVOKER read functions.
ALTER TABLE queue_ext.queues             ENABLE ROW LEVEL SECURITY;
ALTER TABLE queue_ext.job_queue          ENABLE ROW LEVEL SECURITY;
ALTER TABLE queue_ext.job_archive        ENABLE ROW LEVEL SECURITY;
ALTER TABLE queue_ext.job_dead_letter    ENABLE ROW LEVEL SECURITY;
ALTER TABLE queue_ext.job_status_log     ENABLE ROW LEVEL SECURITY;

CREATE POLICY queues_visible ON queue_ext.queues FOR SELECT
    TO queue_ext_producer, queue_ext_worker, queue_ext_admin USING (true);

CREATE POLICY producer_own_jobs ON queue_ext.job_queue FOR SELECT
    TO queue_ext_producer USING (enqueued_by = current_user);
CREATE POLICY staff_all_jobs ON queue_ext.job_queue FOR SELECT
    TO queue_ext_worker, queue_ext_admin USING (true);

CREATE POLICY producer_own_jobs ON queue_ext.job_archive FOR SELECT
    TO queue_ext_producer USING (enqueued_by = current_user);
CREATE POLICY staff_all_jobs ON queue_ext.job_archive FOR SELECT
    TO queue_ext_worker, queue_ext_admin USING (true);

CREATE POLICY producer_own_jobs ON queue_ext.job_dead_letter FOR SELECT
    TO queue_ext_producer USING (enqueued_by = current_user);
CREATE POLICY staff_all_jobs ON queue_ext.job_dead_letter FOR SELECT
    TO queue_ext_worker, queue_ext_admin USING (true);

CREATE POLICY producer_own_jobs ON queue_ext.job_status_log FOR SELECT
    TO queue_ext_producer USING (enqueued_by = current_user);
CREATE POLICY staff_all_jobs ON queue_ext.job_status_log FOR SELECT
    TO queue_ext_worker, queue_ext_admin USING (true);

ALTER TABLE queue_ext.job_dependencies ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all_dependencies ON queue_ext.job_dependencies FOR SELECT
    TO queue_ext_worker, queue_ext_admin USING (true);

-- Every transition of every job after its enqueue: the stored ones, and those its row
-- records (see job_status_log). id orders one job's rows; the derived rows come last in
-- their job, with the two largest bigints (claim, completion): order a job's rows by id,
-- and rows of several jobs by at. Read with the reader's own rights (security_invoker),
-- so a producer sees the rows of its own jobs only, as in the tables. A claim's from_status
-- is the state of its job's last stored transition (a job's stored rows end in the state
-- it was claimed from; none: it was enqueued ready to run), as _log_claim stores it.
CREATE VIEW queue_ext.job_status_history WITH (security_invoker = true) AS
SELECT h.id, h.job_id, h.queue_name, h.from_status, h.to_status, h.attempt, h.worker_id, h.error,
       h.enqueued_by, h.at
FROM queue_ext.job_status_log AS h
UNION ALL
SELECT 9223372036854775806, j.id, j.queue_name, coalesce((SELECT s.to_status FROM queue_ext.job_status_log AS s
                 WHERE s.job_id = j.id ORDER BY s.id DESC LIMIT 1), 'queued'), 'running', j.attempt,
       j.worker_id, NULL, j.enqueued_by, j.claimed_at
FROM queue_ext.job_queue AS j
WHERE j.status = 'running' AND j.claimed_at IS NOT NULL
  AND (SELECT q.keep_history FROM queue_ext.queues AS q WHERE q.queue_name = j.queue_name)
  AND NOT EXISTS (SELECT 1 FROM queue_ext.job_status_log AS s
                  WHERE s.job_id = j.id AND s.attempt = j.attempt AND s.to_status = 'running')
UNION ALL
SELECT 9223372036854775806, a.id, a.queue_name, coalesce((SELECT s.to_status FROM queue_ext.job_status_log AS s
                 WHERE s.job_id = a.id ORDER BY s.id DESC LIMIT 1), 'queued'), 'running', a.attempt,
       a.worker_id, NULL, a.enqueued_by, a.claimed_at
FROM queue_ext.job_archive AS a
WHERE a.status = 'completed' AND a.claimed_at IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM queue_ext.job_status_log AS s
                  WHERE s.job_id = a.id AND s.attempt = a.attempt AND s.to_status = 'running')
UNION ALL
SELECT 9223372036854775807, a.id, a.queue_name, 'running', 'completed', a.attempt,
       a.worker_id, NULL, a.enqueued_by, a.finished_at
FROM queue_ext.job_archive AS a
WHERE a.status = 'completed' AND a.claimed_at IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM queue_ext.job_status_log AS s
                  WHERE s.job_id = a.id AND s.to_status = 'completed');
COMMENT ON VIEW queue_ext.job_status_history IS 'Audit trail: one row per status transition of every job after its enqueue (recorded on the job itself: created_at, enqueued_by).';
