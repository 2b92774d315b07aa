-- Per-key limits: rate limits spend tokens in the claim; concurrency limits hold jobs
-- beyond the limit in 'waiting' and admit them in enqueue order.
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
SELECT queue_ext.create_queue('limited');

-- Misuse: every error names what was wrong.
SELECT pg_temp.try(stmt) FROM (VALUES
    ($$SELECT queue_ext.enqueue_job('limited', '{}', rate_limit_key => 'no-such-limit')$$),
    ($$SELECT queue_ext.enqueue_job('limited', '{}', concurrency_key => '')$$),
    ($$SELECT queue_ext.enqueue_jobs('limited', ARRAY['{}']::jsonb[], rate_limit_key => 'no-such-limit')$$),
    ($$SELECT queue_ext.set_rate_limit('api', 0, '1 second')$$),
    ($$SELECT queue_ext.set_rate_limit('api', 10, '-1 second')$$),
    ($$SELECT queue_ext.set_rate_limit('api', 10, '1 second', burst => 0)$$),
    ($$SELECT queue_ext.set_rate_limit(NULL, 10)$$),
    ($$SELECT queue_ext.set_rate_limit(repeat('k', 201), 10)$$),
    ($$SELECT queue_ext.set_concurrency_limit('tenant', 0)$$),
    ($$SELECT queue_ext.set_concurrency_limit(NULL, 1)$$)
) AS t(stmt);

-- A rate limit of 2 per hour with a burst of 2: two claims now, then none.
SELECT queue_ext.set_rate_limit('api', 2, '1 hour', burst => 2);
SELECT count(*) FROM queue_ext.enqueue_jobs('limited', array_fill('{}'::jsonb, ARRAY[5]), rate_limit_key => 'api');
SELECT queue_ext.enqueue_job('limited', '{"free": true}') IS NOT NULL AS unlimited_job;
SELECT payload FROM queue_ext.get_next_jobs('limited', 10) ORDER BY payload::text;
SELECT count(*) AS claimed_later FROM queue_ext.get_next_jobs('limited', 10);
SELECT kind, key, max_jobs, per, burst, floor(tokens) AS tokens, runnable FROM queue_ext.list_limits();
SELECT pg_temp.try($$SELECT queue_ext.remove_rate_limit('api')$$);
SELECT queue_ext.remove_rate_limit('never-set');

-- A concurrency limit of 1: the first job of the key is queued, the rest wait in order.
SELECT queue_ext.set_concurrency_limit('tenant:1', 1);
SELECT queue_ext.enqueue_job('limited', jsonb_build_object('n', n), concurrency_key => 'tenant:1') IS NOT NULL
FROM generate_series(1, 3) AS n;
SELECT payload, status FROM queue_ext.job_queue WHERE concurrency_key = 'tenant:1' ORDER BY id;
SELECT job_id AS first_job, lease_token AS first_token FROM queue_ext.get_next_job('limited') \gset
SELECT count(*) AS second_claim FROM queue_ext.get_next_job('limited');
SELECT queue_ext.complete_job(:'first_job', NULL, :'first_token');
SELECT payload, status FROM queue_ext.job_queue WHERE concurrency_key = 'tenant:1' ORDER BY id;
-- Raising the limit admits the waiting job at once.
SELECT queue_ext.set_concurrency_limit('tenant:1', 5);
SELECT payload, status FROM queue_ext.job_queue WHERE concurrency_key = 'tenant:1' ORDER BY id;
SELECT kind, key, max_running, active, waiting FROM queue_ext.list_limits() WHERE kind = 'concurrency';
-- A batch takes the free slots in payload order; the rest wait.
SELECT queue_ext.set_concurrency_limit('tenant:2', 2);
SELECT count(*) FROM queue_ext.enqueue_jobs('limited', ARRAY['{"b": 1}', '{"b": 2}', '{"b": 3}']::jsonb[],
                                            concurrency_key => 'tenant:2');
SELECT payload, status FROM queue_ext.job_queue WHERE concurrency_key = 'tenant:2' ORDER BY id;
-- A duplicate enqueue returns the existing job and gives its slot back.
SELECT queue_ext.set_concurrency_limit('tenant:3', 1);
SELECT queue_ext.enqueue_job('limited', '{"d": 1}', dedupe_key => 'same', concurrency_key => 'tenant:3') AS dup1 \gset
SELECT queue_ext.enqueue_job('limited', '{"d": 2}', dedupe_key => 'same', concurrency_key => 'tenant:3') = :'dup1' AS same_job;
SELECT active FROM queue_ext.concurrency_limits WHERE key = 'tenant:3';
-- Cancelling the queued job frees its slot for the next one.
SELECT queue_ext.enqueue_job('limited', '{"d": 3}', concurrency_key => 'tenant:3') IS NOT NULL;
SELECT queue_ext.cancel_job(:'dup1', 'not needed');
SELECT payload, status FROM queue_ext.job_queue WHERE concurrency_key = 'tenant:3' ORDER BY id;
-- A job that waits for a dependency holds no slot; once released it takes its turn.
SELECT queue_ext.create_queue('chain');
SELECT queue_ext.set_concurrency_limit('tenant:4', 1);
SELECT queue_ext.enqueue_job('chain', '{"parent": true}') AS parent \gset
SELECT queue_ext.enqueue_job('chain', '{"child": true}', depends_on => ARRAY[:'parent']::uuid[],
                             concurrency_key => 'tenant:4') IS NOT NULL;
SELECT queue_ext.enqueue_job('chain', '{"other": true}', concurrency_key => 'tenant:4') IS NOT NULL;
SELECT payload, status FROM queue_ext.job_queue WHERE queue_name = 'chain' ORDER BY id;
-- Claim both runnable jobs, complete the parent: the child is released but must wait for
-- the slot that "other" holds.
SELECT count(*) FROM queue_ext.get_next_jobs('chain', 10);
SELECT queue_ext.complete_job(:'parent');
SELECT payload, status FROM queue_ext.job_queue WHERE queue_name = 'chain' ORDER BY id;
SELECT queue_ext.complete_job(id) FROM queue_ext.job_queue WHERE queue_name = 'chain' AND status = 'running';
SELECT payload, status FROM queue_ext.job_queue WHERE queue_name = 'chain' ORDER BY id;
