-- Queues without routine history (keep_history => false): enqueue, claim and completion
-- write no history row and completed jobs are deleted, not archived; failures, retries,
-- dead letters and cancellations are still recorded; switching it back on takes effect at once.
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, '[0-9a-f-]{36}', '<id>', 'g');
END $$;
CREATE FUNCTION pg_temp.trail(q text) RETURNS TABLE (from_status text, to_status text, n bigint)
LANGUAGE sql AS $$
    SELECT from_status::text, to_status::text, count(*) FROM queue_ext.job_status_history
    WHERE queue_name = q GROUP BY 1, 2 ORDER BY 1 NULLS FIRST, 2
$$;
SELECT queue_ext.create_queue('lean', max_attempts => 2, backoff_base => '0', keep_history => false);
SELECT queue_name, keep_history FROM queue_ext.list_queues() WHERE queue_name = 'lean';

-- One job per call and a batch: done, and nothing recorded.
SELECT queue_ext.enqueue_job('lean', '{"n": 1}') IS NOT NULL AS enqueued;
SELECT count(*) FROM queue_ext.enqueue_jobs('lean', ARRAY['{"n": 2}', '{"n": 3}']::jsonb[]);
SELECT job_id AS one, lease_token AS one_token FROM queue_ext.get_next_job('lean') \gset
SELECT queue_ext.complete_job(:'one', '{"ok": true}', :'one_token');
CREATE TEMP TABLE two AS SELECT * FROM queue_ext.get_next_jobs('lean', 2);
SELECT status FROM queue_ext.complete_jobs((SELECT array_agg(job_id) FROM two), (SELECT array_agg(lease_token) FROM two));
SELECT count(*) AS live FROM queue_ext.job_queue WHERE queue_name = 'lean';
SELECT count(*) AS archived FROM queue_ext.job_archive WHERE queue_name = 'lean';
SELECT * FROM pg_temp.trail('lean');
-- A completed job of such a queue is gone: asking about it says so.
SELECT pg_temp.try(format('SELECT queue_ext.job_status(%L)', :'one'));
SELECT pg_temp.try(format('SELECT queue_ext.complete_job(%L)', :'one'));

-- Failures are still recorded: a retry, then the dead letter, each with its error.
SELECT queue_ext.enqueue_job('lean', '{"n": 4}') AS four \gset
SELECT queue_ext.fail_job(job_id, 'first try failed', lease_token) FROM queue_ext.get_next_job('lean');
SELECT queue_ext.fail_job(job_id, 'second try failed', lease_token) FROM queue_ext.get_next_job('lean');
SELECT reason, last_error FROM queue_ext.job_dead_letter WHERE id = :'four';
SELECT from_status, to_status, error FROM queue_ext.job_status_history WHERE job_id = :'four' ORDER BY id;

-- Cancellations are kept: a queued job cancelled, and a running one cancelled before completing.
SELECT queue_ext.enqueue_job('lean', '{"n": 5}') AS five \gset
SELECT queue_ext.cancel_job(:'five', 'not needed');
SELECT queue_ext.enqueue_job('lean', '{"n": 6}') AS six \gset
SELECT job_id AS six_running, lease_token AS six_token FROM queue_ext.get_next_job('lean') \gset
SELECT queue_ext.cancel_job(:'six', 'stop');
SELECT queue_ext.complete_job(:'six', NULL, :'six_token');
SELECT payload, status, last_error FROM queue_ext.job_archive WHERE queue_name = 'lean' ORDER BY id;

-- Dependencies still release their dependents when a lean job completes.
SELECT queue_ext.enqueue_job('lean', '{"n": 7}') AS seven \gset
SELECT queue_ext.enqueue_job('lean', '{"after": 7}', depends_on => ARRAY[:'seven'::uuid]) AS child \gset
SELECT queue_ext.complete_job(job_id, NULL, lease_token) FROM queue_ext.get_next_job('lean');
SELECT payload, status FROM queue_ext.job_queue WHERE id = :'child';
SELECT queue_ext.complete_job(job_id, NULL, lease_token) FROM queue_ext.get_next_job('lean');

-- Back on: the next job is recorded from its enqueue to its archive row.
SELECT queue_ext.alter_queue('lean', keep_history => true);
SELECT queue_ext.enqueue_job('lean', '{"n": 8}') AS eight \gset
SELECT queue_ext.complete_job(job_id, NULL, lease_token) FROM queue_ext.get_next_job('lean');
SELECT from_status, to_status FROM queue_ext.job_status_history WHERE job_id = :'eight' ORDER BY id;
SELECT status FROM queue_ext.job_archive WHERE id = :'eight';
SELECT queue_ext.drop_queue('lean');
