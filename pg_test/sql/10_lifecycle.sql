-- A walk through the job lifecycle, as a user would do it in psql.
\set VERBOSITY terse
SELECT queue_ext.create_queue('emails', max_attempts => 2, backoff_base => '0 seconds');
SELECT queue_name, max_attempts, lease_duration, paused FROM queue_ext.list_queues() WHERE queue_name = 'emails';

-- Enqueue with priorities; claim order is critical > high > normal > low.
SELECT queue_ext.enqueue_job('emails', '{"to": "low@example.com"}', priority => 'low') IS NOT NULL AS ok;
SELECT queue_ext.enqueue_job('emails', '{"to": "normal@example.com"}') IS NOT NULL AS ok;
SELECT queue_ext.enqueue_job('emails', '{"to": "critical@example.com"}', priority => 'critical') IS NOT NULL AS ok;
SELECT count(*) FROM queue_ext.enqueue_jobs('emails', ARRAY['{"to": "b1@example.com"}', '{"to": "b2@example.com"}']::jsonb[], priority => 'high');
SELECT queue_ext.enqueue_job('emails', '{"to": "later@example.com"}', delay => '1 hour') IS NOT NULL AS ok;

SELECT payload->>'to' AS claimed, priority, attempt FROM queue_ext.get_next_job('emails', 'w1') \gset
\echo :claimed
SELECT payload->>'to' AS claimed, priority FROM queue_ext.get_next_jobs('emails', 2, 'w2') ORDER BY 1;

-- Complete the critical one with a result; its status says so.
SELECT queue_ext.complete_job(id, '{"message_id": "m-1"}') FROM queue_ext.job_queue WHERE payload->>'to' = 'critical@example.com';
SELECT status, attempt, result FROM queue_ext.job_status((SELECT id FROM queue_ext.job_archive WHERE payload->>'to' = 'critical@example.com'));

-- Fail one: it retries; fail it again: out of attempts, it goes to the dead letter queue.
SELECT queue_ext.fail_job(id, 'SMTP timeout') FROM queue_ext.job_queue WHERE payload->>'to' = 'b1@example.com';
SELECT payload->>'to', attempt FROM queue_ext.get_next_job('emails', 'w3') WHERE payload->>'to' = 'b1@example.com';
SELECT queue_ext.fail_job(id, 'SMTP timeout again') FROM queue_ext.job_queue WHERE payload->>'to' = 'b1@example.com';
SELECT payload->>'to' AS dead, attempt, reason, jsonb_array_length(errors) AS errors FROM queue_ext.job_dead_letter;

-- Redrive it, and the audit trail shows the whole story.
SELECT queue_ext.retry_dead_job(id) IS NOT NULL AS redriven FROM queue_ext.job_dead_letter;
SELECT coalesce(h.from_status::text, '-') AS from_status, h.to_status, h.attempt, h.worker_id, h.error
FROM queue_ext.job_status_history AS h
WHERE h.job_id = (SELECT id FROM queue_ext.job_queue WHERE payload->>'to' = 'b1@example.com')
ORDER BY h.id;

SELECT queue_name, waiting, queued, retrying, running, dead, completed_last_hour
FROM queue_ext.queue_stats() WHERE queue_name = 'emails';

-- Dependencies and dedupe.
SELECT queue_ext.create_queue('pipeline');
SELECT queue_ext.enqueue_job('pipeline', '{"step": "extract"}') AS extract_id \gset
SELECT queue_ext.enqueue_job('pipeline', '{"step": "load"}', depends_on => ARRAY[:'extract_id']::uuid[]) AS load_id \gset
SELECT status FROM queue_ext.job_status(:'load_id');
SELECT queue_ext.complete_job(job_id) FROM queue_ext.get_next_job('pipeline');
SELECT status FROM queue_ext.job_status(:'load_id');
SELECT queue_ext.enqueue_job('pipeline', '{}', dedupe_key => 'nightly') = queue_ext.enqueue_job('pipeline', '{}', dedupe_key => 'nightly') AS deduped;
