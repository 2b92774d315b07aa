-- Trust: what a hostile producer, a dead worker or a bad setting can do, and that each is
-- refused or recovered from. Each section shows the attack (or the fault), then its answer.
-- try() runs a statement and shows "SQLSTATE: message" with job ids masked. Where a
-- dispatcher serving this database could get there first (its lease sweep, its claims of
-- webhook jobs and callbacks), the section runs in one transaction: it cannot see the
-- section's rows, and the outcome shown is the SQL path's alone.
\set VERBOSITY terse
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<id>', 'g');
END $$;
GRANT EXECUTE ON FUNCTION pg_temp.try(text) TO PUBLIC;
-- The lines of a statement's plan.
CREATE FUNCTION pg_temp.explain(stmt text) RETURNS SETOF text LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE 'EXPLAIN (COSTS OFF) ' || stmt;
END
$$;
CREATE ROLE regress_trust_a LOGIN;
CREATE ROLE regress_trust_b LOGIN;
CREATE ROLE regress_trust_worker LOGIN;
CREATE ROLE regress_trust_admin LOGIN;
GRANT queue_ext_producer TO regress_trust_a, regress_trust_b;
GRANT queue_ext_worker TO regress_trust_worker;
GRANT queue_ext_admin TO regress_trust_admin;

---------------------------------------------------------------------------------------
-- 1. Leases expire without the dispatcher. A worker claims and dies, and its lease runs
-- out (moved into the past here rather than waited for); the next claim from that queue
-- returns the job to the queue first (the attempt counts, "lease expired") and hands it
-- out again, whichever claim it is.
BEGIN;
SELECT queue_ext.create_queue('lease_one', backoff_base => '0');
SELECT queue_ext.create_queue('lease_multi', backoff_base => '0');
SELECT queue_ext.create_queue('lease_limited', backoff_base => '0');
SELECT queue_ext.create_queue('lease_next', backoff_base => '0');
SELECT queue_ext.create_queue('lease_last', max_attempts => 1);
SELECT queue_ext.create_queue('lease_other');
SELECT queue_ext.set_rate_limit('trust_rl', 1000, '1 second', burst => 100);
SELECT queue_ext.enqueue_job('lease_one', '{"n": 1}') AS one \gset
SELECT queue_ext.enqueue_job('lease_multi', '{"n": 2}') AS multi \gset
SELECT queue_ext.enqueue_job('lease_limited', '{"n": 3}', rate_limit_key => 'trust_rl') AS limited \gset
SELECT queue_ext.enqueue_job('lease_next', '{"n": 4}') AS next_a \gset
SELECT queue_ext.enqueue_job('lease_last', '{"n": 5}') AS last \gset
SELECT queue_ext.enqueue_job('lease_next', '{"n": 6}') AS next_b \gset
SELECT queue_ext.enqueue_job('lease_other', '{"n": 7}') AS other \gset
SELECT lease_token AS one_token FROM queue_ext.get_next_job('lease_one', 'dying-worker') \gset
SELECT job_id = :'multi' AS claimed FROM queue_ext.get_next_jobs(ARRAY['lease_multi'], 1, 'dying-worker');
SELECT job_id = :'limited' AS claimed FROM queue_ext.get_next_jobs('lease_limited', 1, 'dying-worker');
SELECT job_id = :'next_a' AS claimed FROM queue_ext.get_next_job('lease_next', 'dying-worker');
SELECT job_id = :'last' AS claimed FROM queue_ext.get_next_job('lease_last', 'dying-worker');
SELECT job_id = :'other' AS claimed FROM queue_ext.get_next_job('lease_other', 'dying-worker');
-- (next_b is held by a live worker.)
SELECT job_id = :'next_b' AS claimed FROM queue_ext.get_next_job('lease_next', 'live-worker');
-- The dying worker's leases run out.
UPDATE queue_ext.job_queue SET lease_expires_at = now() - interval '1 second' WHERE worker_id = 'dying-worker';
-- The fault: six jobs running under expired leases (next_b's is live), and nobody sweeping them.
SELECT queue_name, status, attempt, lease_expires_at < now() AS expired
FROM queue_ext.job_queue WHERE queue_name LIKE 'lease\_%' ORDER BY queue_name, expired;
-- The stale holder is fenced out (55000) before the job is reclaimed...
SELECT regexp_replace(pg_temp.try(format('SELECT queue_ext.complete_job(%L, NULL, %L)', :'one', :'one_token')),
                      'expired at .*$', 'expired at <time>') AS try;
-- ...and every kind of claim reclaims, then claims it again (attempt 2).
SELECT job_id = :'one' AS reclaimed, attempt FROM queue_ext.get_next_job('lease_one', 'new-worker');
SELECT job_id = :'multi' AS reclaimed, attempt FROM queue_ext.get_next_jobs(ARRAY['lease_multi'], 1, 'new-worker');
SELECT job_id = :'limited' AS reclaimed, attempt FROM queue_ext.get_next_jobs(ARRAY['lease_limited'], 1, 'new-worker');
SELECT job_id = :'next_a' AS reclaimed, attempt
FROM queue_ext.complete_and_get_next(:'next_b', 'lease_next', worker_id => 'live-worker');
-- Out of attempts: the claim dead-letters it instead, with the reason.
SELECT count(*) AS claimed FROM queue_ext.get_next_job('lease_last', 'new-worker');
SELECT status, last_error FROM queue_ext.job_status(:'last');
SELECT reason FROM queue_ext.job_dead_letter WHERE id = :'last';
-- The lost attempt is recorded as a failure, as cleanup_stuck_jobs records it.
SELECT errors -> 0 ->> 'error' AS error, errors -> 0 ->> 'worker_id' AS worker
FROM queue_ext.job_queue WHERE id = :'one';
SELECT from_status, to_status, attempt, error FROM queue_ext.job_status_history
WHERE job_id = :'one' ORDER BY id;
-- The stale holder still cannot complete, fail or heartbeat the job now held by another.
SELECT pg_temp.try(format('SELECT queue_ext.complete_job(%L, NULL, %L)', :'one', :'one_token'));
SELECT pg_temp.try(format('SELECT queue_ext.fail_job(%L, ''x'', %L)', :'one', :'one_token'));
SELECT pg_temp.try(format('SELECT queue_ext.heartbeat(%L, %L)', :'one', :'one_token'));
SELECT status, attempt, worker_id FROM queue_ext.job_status(:'one');
-- Only the queues a claim claims from: lease_other had no claim, its job is still held
-- (until a claim of lease_other, or cleanup_stuck_jobs, the same path, returns it).
SELECT status, attempt FROM queue_ext.job_status(:'other');
SELECT queue_ext.cleanup_stuck_jobs() AS swept;
SELECT status, attempt, last_error FROM queue_ext.job_status(:'other');
-- When nothing expired the claim pays one probe of the lease index (an index or bitmap
-- scan of it, by the statistics of the moment).
SET enable_seqscan = off;
SELECT count(*) FILTER (WHERE plan ~ 'Index Scan.* job_queue_lease_idx') AS lease_index_scans,
       count(*) FILTER (WHERE plan ~ 'Index Cond: \(lease_expires_at <= now\(\)\)') AS bounded_by_now
FROM pg_temp.explain($$SELECT 1 FROM queue_ext.job_queue AS e
    WHERE e.status = 'running' AND e.lease_expires_at <= now() AND e.queue_name = 'lease_one'$$) AS plan;
RESET enable_seqscan;
SELECT queue_ext.drop_queue(q, force => true)
FROM unnest(ARRAY['lease_one', 'lease_multi', 'lease_limited', 'lease_next', 'lease_last', 'lease_other']) AS q;
SELECT queue_ext.remove_rate_limit('trust_rl');
COMMIT;

---------------------------------------------------------------------------------------
-- 2. Callbacks are leased for longer than the request they make, and the wait for a request
-- slot before it (the dispatcher claims ahead of free slots). A queue reporting to a slow
-- receiver (webhook_timeout 10 minutes) gets its callbacks leased past twice that, not for
-- the dispatcher's default timeout (30 seconds here) plus the margin.
SELECT queue_ext.create_queue('slow_receiver', callback_url => 'https://example.com/cb',
                              webhook_timeout => '10 minutes', webhook_secret => 'whsec_c2VjcmV0');
BEGIN;
SELECT queue_ext.enqueue_job('slow_receiver', '{}') AS slow \gset
SELECT queue_ext.complete_job(job_id, '{"ok": true}') FROM queue_ext.get_next_job('slow_receiver');
CREATE TEMP TABLE claim AS
SELECT * FROM queue_ext._dispatch_claim_rows('regress', 10, '{}', '{}', 'queue_ext.callbacks', '30 seconds',
                                              ARRAY['queue_ext.callbacks']);
SELECT c.url, c.timeout_ms, c.method, c.secret IS NOT NULL AS signed,
       j.lease_expires_at - now() > make_interval(secs => 2 * c.timeout_ms::float8 / 1000) AS lease_outlives_request,
       j.lease_expires_at - now() <= make_interval(secs => 2 * c.timeout_ms::float8 / 1000 + 30) AS by_the_margin
FROM claim AS c
JOIN queue_ext.job_queue AS j ON j.id = c.job_id
WHERE c.body::jsonb ->> 'queue' = 'slow_receiver';
ROLLBACK;

---------------------------------------------------------------------------------------
-- 3. Forged callbacks. A producer enqueues a "job.completed" event for another queue into
-- queue_ext.callbacks: the dispatcher would sign it with that queue's secret. Refused for
-- every caller, admins and superusers included, whichever way the job would come in.
SET ROLE regress_trust_a;
SELECT pg_temp.try($$SELECT queue_ext.enqueue_job('queue_ext.callbacks',
    '{"type": "job.completed", "queue": "slow_receiver", "result": {"paid": true}}')$$);
SELECT pg_temp.try($$SELECT queue_ext.enqueue_jobs('queue_ext.callbacks',
    ARRAY['{"type": "job.completed", "queue": "slow_receiver"}']::jsonb[])$$);
RESET ROLE;
SET ROLE regress_trust_admin;
SELECT pg_temp.try($$SELECT queue_ext.enqueue_job('queue_ext.callbacks', '{"type": "job.completed", "queue": "slow_receiver"}')$$);
RESET ROLE;
SELECT pg_temp.try($$SELECT queue_ext.enqueue_job('queue_ext.callbacks', '{"type": "job.completed", "queue": "slow_receiver"}')$$);
-- Through a table trigger that a producer can write to.
CREATE TABLE public.trust_forge (id int);
GRANT INSERT ON public.trust_forge TO regress_trust_a;
CREATE TRIGGER trust_forge AFTER INSERT ON public.trust_forge
    FOR EACH ROW EXECUTE FUNCTION queue_ext.enqueue_trigger('queue_ext.callbacks');
SET ROLE regress_trust_a;
SELECT pg_temp.try($$INSERT INTO public.trust_forge VALUES (1)$$);
RESET ROLE;
DROP TABLE public.trust_forge;
-- Nothing reached the callback queue.
SELECT count(*) AS forged FROM queue_ext.job_queue
WHERE queue_name = 'queue_ext.callbacks' AND payload ->> 'job_id' IS NULL;
-- The internal queue cannot be paused, resumed, altered, dropped or purged by name either.
SET ROLE regress_trust_admin;
SELECT pg_temp.try(stmt) FROM (VALUES
    ($$SELECT queue_ext.pause_queue('queue_ext.callbacks')$$),
    ($$SELECT queue_ext.resume_queue('queue_ext.callbacks')$$),
    ($$SELECT queue_ext.alter_queue('queue_ext.callbacks', max_attempts => 1)$$),
    ($$SELECT queue_ext.alter_queue('queue_ext.callbacks', webhook_url => 'https://attacker.example/')$$),
    ($$SELECT queue_ext.drop_queue('queue_ext.callbacks', force => true)$$),
    ($$SELECT queue_ext.purge_jobs('0', 'queue_ext.callbacks')$$),
    ($$SELECT queue_ext.purge_dead_letter(NULL, 'queue_ext.callbacks')$$)
) AS t(stmt);
RESET ROLE;
SELECT queue_name, paused, max_attempts, is_webhook FROM queue_ext.queues WHERE queue_name = 'queue_ext.callbacks';
SELECT count(*) AS targets FROM queue_ext.webhook_targets WHERE queue_name = 'queue_ext.callbacks';

---------------------------------------------------------------------------------------
-- 4. Webhook queues are not handed to SQL workers. A catch-all worker
-- (get_next_jobs(NULL::text[], ...)) would "complete" webhook jobs, and callbacks, without
-- any HTTP request: it gets only the plain queues' jobs. Named, a webhook queue is claimed.
SELECT queue_ext.create_queue('trust_hook', webhook_url => 'https://example.com/hook');
SELECT queue_ext.create_queue('trust_plain');
BEGIN;
SELECT queue_ext.enqueue_job('trust_hook', '{}') AS hook \gset
SELECT queue_ext.enqueue_job('trust_plain', '{}') AS plain \gset
SELECT queue_ext.enqueue_job('slow_receiver', '{}') AS slow2 \gset
SELECT queue_ext.complete_job(job_id) FROM queue_ext.get_next_job('slow_receiver');
-- (Queues earlier tests left jobs in are paused meanwhile, so that only these are runnable.)
CREATE TEMP TABLE trust_paused AS
    SELECT queue_name FROM queue_ext.queues
    WHERE NOT paused AND queue_name NOT LIKE 'queue\_ext.%' AND queue_name NOT IN ('trust_hook', 'trust_plain');
DO $$ BEGIN PERFORM queue_ext.pause_queue(queue_name) FROM trust_paused; END $$;
SELECT queue_name, count(*) FROM queue_ext.job_queue AS j JOIN queue_ext.queues AS q USING (queue_name)
WHERE j.status = 'queued' AND j.run_at <= now() AND NOT q.paused GROUP BY 1 ORDER BY 1;
SET ROLE regress_trust_worker;
SELECT queue_name, job_id = :'plain' AS is_plain FROM queue_ext.get_next_jobs(NULL::text[], 100, 'catch-all');
SELECT queue_name, job_id = :'hook' AS is_hook FROM queue_ext.get_next_jobs(ARRAY['trust_hook'], 100, 'named');
RESET ROLE;
SELECT queue_name, count(*) FROM queue_ext.job_queue AS j JOIN queue_ext.queues AS q USING (queue_name)
WHERE j.status = 'queued' AND j.run_at <= now() AND NOT q.paused GROUP BY 1 ORDER BY 1;
ROLLBACK;

---------------------------------------------------------------------------------------
-- 5. Dedupe keys are the producer's own. Producer b enqueues with producer a's key: it
-- gets a job of its own, not a's id (which it would then watch, cancel or depend on).
SELECT queue_ext.create_queue('trust_dedupe');
SET ROLE regress_trust_a;
SELECT queue_ext.enqueue_job('trust_dedupe', '{"from": "a"}', dedupe_key => 'invoice-42') AS dedupe_a \gset
SELECT queue_ext.enqueue_job('trust_dedupe', '{"from": "a", "again": true}', dedupe_key => 'invoice-42') = :'dedupe_a'
    AS a_deduped_against_itself;
RESET ROLE;
SET ROLE regress_trust_b;
SELECT queue_ext.enqueue_job('trust_dedupe', '{"from": "b"}', dedupe_key => 'invoice-42') AS dedupe_b \gset
SELECT :'dedupe_b' <> :'dedupe_a' AS b_got_its_own_job;
SELECT queue_ext.enqueue_job('trust_dedupe', '{"from": "b", "again": true}', dedupe_key => 'invoice-42') = :'dedupe_b'
    AS b_deduped_against_itself;
SELECT pg_temp.try(format('SELECT queue_ext.job_status(%L)', :'dedupe_a'));
RESET ROLE;
SELECT enqueued_by, payload FROM queue_ext.job_queue WHERE queue_name = 'trust_dedupe' ORDER BY enqueued_by;
SELECT indexdef FROM pg_indexes WHERE indexname = 'job_queue_dedupe_idx';

---------------------------------------------------------------------------------------
-- 6. Producers learn nothing about other producers' jobs. Producer b probes a's jobs in
-- each state, and an id that does not exist, with every function that takes a job id:
-- every answer is the same 42501, revealing neither existence nor state.
SELECT queue_ext.create_queue('trust_jobs');
SET ROLE regress_trust_a;
SELECT queue_ext.enqueue_job('trust_jobs', '{}') AS a_done \gset
SELECT queue_ext.enqueue_job('trust_jobs', '{}') AS a_running \gset
SELECT queue_ext.enqueue_job('trust_jobs', '{}', delay => '1 hour') AS a_queued \gset
RESET ROLE;
SELECT queue_ext.complete_job(job_id) FROM queue_ext.get_next_job('trust_jobs');
SELECT job_id = :'a_running' AS running FROM queue_ext.get_next_job('trust_jobs');
SET ROLE regress_trust_b;
SELECT probe, fn, pg_temp.try(format(stmt, id)) AS answer
FROM (VALUES ('queued', :'a_queued'::uuid), ('running', :'a_running'::uuid), ('completed', :'a_done'::uuid),
             ('missing', '00000000-0000-0000-0000-000000000000'::uuid)) AS p(probe, id),
     (VALUES ('cancel_job', 'SELECT queue_ext.cancel_job(%L)'),
             ('job_status', 'SELECT * FROM queue_ext.job_status(%L)'),
             ('depends_on', 'SELECT queue_ext.enqueue_job(''trust_jobs'', ''{}'', depends_on => ARRAY[%L]::uuid[])')) AS f(fn, stmt)
ORDER BY fn, probe;
SELECT count(*) AS b_enqueued FROM queue_ext.job_queue WHERE enqueued_by = 'regress_trust_b' AND queue_name = 'trust_jobs';
RESET ROLE;
-- Nothing changed for a: its jobs are where they were.
SELECT status FROM queue_ext.job_status(:'a_queued');
SELECT status FROM queue_ext.job_status(:'a_running');
-- a itself, a worker and an admin keep today's answers.
SET ROLE regress_trust_a;
SELECT status FROM queue_ext.job_status(:'a_done');
SELECT pg_temp.try(format('SELECT queue_ext.cancel_job(%L)', :'a_done'));
SELECT queue_ext.enqueue_job('trust_jobs', '{}', depends_on => ARRAY[:'a_done']::uuid[]) IS NOT NULL AS a_depends_on_own;
SELECT pg_temp.try($$SELECT queue_ext.cancel_job('00000000-0000-0000-0000-000000000000')$$);
RESET ROLE;
SET ROLE regress_trust_worker;
SELECT status FROM queue_ext.job_status(:'a_done');
SELECT pg_temp.try(stmt) FROM (VALUES
    ($$SELECT queue_ext.cancel_job('00000000-0000-0000-0000-000000000000')$$),
    ($$SELECT * FROM queue_ext.job_status('00000000-0000-0000-0000-000000000000')$$),
    ($$SELECT queue_ext.cancel_job('$$ || :'a_done' || $$')$$)
) AS t(stmt);
RESET ROLE;
SET ROLE regress_trust_admin;
SELECT queue_ext.enqueue_job('trust_jobs', '{}', depends_on => ARRAY[:'a_queued']::uuid[]) AS admin_dep \gset
SELECT status FROM queue_ext.job_status(:'admin_dep');
SELECT pg_temp.try($$SELECT queue_ext.enqueue_job('trust_jobs', '{}', depends_on => ARRAY['00000000-0000-0000-0000-000000000000']::uuid[])$$);
SELECT queue_ext.cancel_job(:'a_queued');
SELECT status FROM queue_ext.job_status(:'admin_dep');
RESET ROLE;

---------------------------------------------------------------------------------------
-- 7. Settings have bounds. Values that made every later failure or claim of a queue raise
-- 22008 (an interval or timestamp out of range) are refused up front with 22023.
SELECT pg_temp.try(stmt) FROM (VALUES
    ($$SELECT queue_ext.create_queue('trust_bad', backoff_base => '1000000 years')$$),
    ($$SELECT queue_ext.create_queue('trust_bad', backoff_base => '25 hours')$$),
    ($$SELECT queue_ext.create_queue('trust_bad', backoff_base => '-1 second')$$),
    ($$SELECT queue_ext.create_queue('trust_bad', backoff_cap => '1000000 years')$$),
    ($$SELECT queue_ext.create_queue('trust_bad', backoff_cap => '31 days')$$),
    ($$SELECT queue_ext.create_queue('trust_bad', backoff_base => '1 day', backoff_cap => '1 hour')$$),
    ($$SELECT queue_ext.create_queue('trust_bad', lease_duration => '178000000 years')$$),
    ($$SELECT queue_ext.create_queue('trust_bad', lease_duration => '8 days')$$),
    ($$SELECT queue_ext.create_queue('trust_bad', lease_duration => '500 milliseconds')$$),
    ($$SELECT queue_ext.create_queue('trust_bad', max_attempts => 1001)$$),
    ($$SELECT queue_ext.create_queue('trust_bad', lease_duration => NULL)$$),
    ($$SELECT queue_ext.alter_queue('trust_plain', backoff_base => '1000000 years')$$),
    ($$SELECT queue_ext.alter_queue('trust_plain', backoff_cap => '31 days')$$),
    ($$SELECT queue_ext.alter_queue('trust_plain', backoff_base => '2 hours')$$),
    ($$SELECT queue_ext.alter_queue('trust_plain', lease_duration => '178000000 years')$$),
    ($$SELECT queue_ext.alter_queue('trust_plain', max_attempts => 0)$$),
    ($$SELECT * FROM queue_ext.get_next_jobs('trust_plain', 1, lease => '178000000 years')$$),
    ($$SELECT * FROM queue_ext.get_next_jobs(ARRAY['trust_plain'], 1, lease => '8 days')$$),
    ($$SELECT * FROM queue_ext.get_next_job('trust_plain', lease => '0 seconds')$$),
    ($$SELECT queue_ext.heartbeat('$$ || :'a_running' || $$', extend => '178000000 years')$$),
    ($$SELECT queue_ext.heartbeat('$$ || :'a_running' || $$', extend => '0 seconds')$$),
    ($$SELECT queue_ext.enqueue_job('trust_plain', '{}', run_at => 'infinity')$$),
    ($$SELECT queue_ext.enqueue_job('trust_plain', '{}', run_at => '-infinity')$$),
    ($$SELECT queue_ext.enqueue_job('trust_plain', '{}', run_at => '10000-01-01 00:00:00+00')$$),
    ($$SELECT queue_ext.enqueue_jobs('trust_plain', ARRAY['{}']::jsonb[], run_at => 'infinity')$$),
    ($$SELECT queue_ext.enqueue_job('trust_plain', '{}', delay => '101 years')$$),
    ($$SELECT queue_ext.enqueue_job('trust_plain', '{}', delay => '-1 second')$$),
    ($$SELECT queue_ext.fail_job('$$ || :'a_running' || $$', 'x', retry_in => '101 years')$$),
    ($$SELECT queue_ext.fail_job('$$ || :'a_running' || $$', 'x', retry_in => '-1 second')$$)
) AS t(stmt);
-- Nothing was created or changed by those.
SELECT count(*) AS trust_bad FROM queue_ext.queues WHERE queue_name = 'trust_bad';
SELECT max_attempts, backoff_base, backoff_cap, lease_duration FROM queue_ext.queues WHERE queue_name = 'trust_plain';
SELECT status, attempt FROM queue_ext.job_status(:'a_running');
-- The bounds themselves are accepted, and a cap equal to the base.
SELECT queue_ext.create_queue('trust_edges', max_attempts => 1000, backoff_base => '1 day', backoff_cap => '30 days',
                              lease_duration => '7 days');
SELECT queue_ext.alter_queue('trust_edges', backoff_base => '0', backoff_cap => '0', lease_duration => '1 second');
SELECT queue_ext.alter_queue('trust_edges', backoff_cap => '1 day', backoff_base => '1 day');
SELECT queue_ext.enqueue_job('trust_edges', '{}', run_at => '9999-12-31 23:59:59+00') IS NOT NULL AS far_run_at;
SELECT queue_ext.enqueue_job('trust_edges', '{}', delay => '100 years') IS NOT NULL AS long_delay;
-- The table says the same, for writes that do not go through the functions.
SELECT pg_temp.try($$UPDATE queue_ext.queues SET backoff_base = '2 days', backoff_cap = '30 days' WHERE queue_name = 'trust_edges'$$);
SELECT pg_temp.try($$UPDATE queue_ext.queues SET lease_duration = '178000000 years' WHERE queue_name = 'trust_edges'$$);
SELECT pg_temp.try($$UPDATE queue_ext.queues SET backoff_cap = '1 hour' WHERE queue_name = 'trust_edges'$$);
-- Backoff at the largest base, cap and attempt count: no overflow, within the cap's upper half.
SELECT bool_and(queue_ext._backoff('1 day', '30 days', a) BETWEEN interval '15 days' AND interval '30 days') AS within_cap
FROM generate_series(6, 1000) AS a;
SELECT queue_ext._backoff('1 second', '1 hour', 1) BETWEEN interval '0.5 seconds' AND interval '1 second' AS first_retry;
-- A job failing at its 1000th attempt of such a queue is retried within 30 days.
SELECT queue_ext.drop_queue('trust_edges', force => true);
SELECT queue_ext.create_queue('trust_edges', max_attempts => 1000, backoff_base => '1 day', backoff_cap => '30 days');
SELECT queue_ext.enqueue_job('trust_edges', '{}') AS edge \gset
UPDATE queue_ext.job_queue SET attempt = 998 WHERE id = :'edge';
SELECT attempt FROM queue_ext.get_next_job('trust_edges');
SELECT queue_ext.fail_job(:'edge', 'still failing');
SELECT run_at - now() BETWEEN interval '15 days' AND interval '30 days' AS retry_within_cap
FROM queue_ext.job_queue WHERE id = :'edge';

---------------------------------------------------------------------------------------
-- 8. drop_queue(force) cancels the dependents of the jobs it cancels, in every queue, and
-- theirs in turn: before, they waited forever for a job that no longer existed.
SELECT queue_ext.create_queue('trust_parent');
SELECT queue_ext.create_queue('trust_child');
SELECT queue_ext.create_queue('trust_grandchild');
SELECT queue_ext.enqueue_job('trust_parent', '{}') AS parent \gset
SELECT queue_ext.enqueue_job('trust_child', '{}', depends_on => ARRAY[:'parent']::uuid[]) AS child \gset
SELECT queue_ext.enqueue_job('trust_grandchild', '{}', depends_on => ARRAY[:'child']::uuid[]) AS grandchild \gset
SELECT queue_ext.enqueue_job('trust_child', '{}') AS bystander \gset
SELECT status FROM queue_ext.job_status(:'child');
SELECT queue_ext.drop_queue('trust_parent', force => true);
SELECT 'parent' AS job, status, last_error FROM queue_ext.job_status(:'parent')
UNION ALL
SELECT 'child', status, regexp_replace(last_error, '[0-9a-f-]{36}', '<id>') FROM queue_ext.job_status(:'child')
UNION ALL
SELECT 'grandchild', status, regexp_replace(last_error, '[0-9a-f-]{36}', '<id>') FROM queue_ext.job_status(:'grandchild')
UNION ALL
SELECT 'bystander', status, last_error FROM queue_ext.job_status(:'bystander');
SELECT count(*) AS edges_left FROM queue_ext.job_dependencies
WHERE :'parent' IN (job_id, depends_on) OR :'child' IN (job_id, depends_on);

---------------------------------------------------------------------------------------
DELETE FROM queue_ext.job_queue WHERE queue_name = 'queue_ext.callbacks' AND payload ->> 'queue' = 'slow_receiver';
SELECT queue_ext.drop_queue(q, force => true)
FROM unnest(ARRAY['slow_receiver', 'trust_hook', 'trust_plain', 'trust_dedupe', 'trust_jobs', 'trust_edges',
                  'trust_child', 'trust_grandchild']) AS q;
DROP OWNED BY regress_trust_a, regress_trust_b, regress_trust_worker, regress_trust_admin;
DROP ROLE regress_trust_a, regress_trust_b, regress_trust_worker, regress_trust_admin;

-- Echoed values are bounded: a 1 MB queue name is quoted in 100 characters, and a worker id
-- (stored with every claim) is refused beyond 200.
SELECT queue_ext.enqueue_job(repeat('x', 1000000), '{}');
SELECT queue_ext.get_next_jobs('queue_ext.callbacks', 1, repeat('w', 201));
SELECT queue_ext.get_next_jobs(NULL::text[], 1, repeat('w', 201));

-- The tables keep their invariants against a direct write that bypasses the API (a
-- superuser's UPDATE): a finished state never lives in job_queue, a running job has a lease,
-- and job_archive holds only finished jobs.
SELECT queue_ext.create_queue('trust_checks');
SELECT queue_ext.enqueue_job('trust_checks', '{}') AS checked_job \gset
SELECT pg_temp.try(format('UPDATE queue_ext.job_queue SET status = %L WHERE id = %L', s, :'checked_job'))
FROM unnest(ARRAY['completed', 'dead', 'cancelled', 'running', 'retrying']) AS s;
SELECT pg_temp.try(format($$INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt,
    max_attempts, enqueued_by, created_at, run_at) VALUES (gen_random_uuid(), 'trust_checks', '{}', 'normal', %L, 0, 1,
    'x', now(), now())$$, s))
FROM unnest(ARRAY['queued', 'running', 'dead', 'completed', 'cancelled']) AS s;
SELECT queue_ext.drop_queue('trust_checks', force => true);
