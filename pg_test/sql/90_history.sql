-- job_status_history is a view: a job's routine transitions (the claim of the attempt it runs;
-- once completed, that claim and the completion) are read from its own row, every other one
-- from job_status_log. Every way a job leaves running must leave the same trail as when all
-- rows were stored, in order, each once, and claims and completions must store nothing.
CREATE FUNCTION pg_temp.trail(job uuid) RETURNS text LANGUAGE sql AS $$
    SELECT string_agg(format('%s>%s/%s%s%s', coalesce(from_status::text, '-'), to_status, attempt,
                             CASE WHEN id > 9000000000000000000 THEN ' (derived)' ELSE '' END,
                             CASE WHEN error IS NULL THEN '' ELSE ' ' || error END), ', ' ORDER BY id)
    FROM queue_ext.job_status_history WHERE job_id = job
$$;
CREATE FUNCTION pg_temp.stored(job uuid) RETURNS bigint LANGUAGE sql AS $$
    SELECT count(*) FROM queue_ext.job_status_log WHERE job_id = job
$$;
SELECT queue_ext.create_queue('h', backoff_base => '0', max_attempts => 3);

-- Claimed, then completed: two derived rows, nothing stored.
SELECT queue_ext.enqueue_job('h', '{}') AS a \gset
SELECT lease_token AS t FROM queue_ext.get_next_job('h', 'w1') \gset
SELECT pg_temp.trail(:'a') AS running, pg_temp.stored(:'a') AS stored;
SELECT queue_ext.complete_job(:'a', NULL, :'t');
SELECT pg_temp.trail(:'a') AS completed, pg_temp.stored(:'a') AS stored;
SELECT (SELECT at FROM queue_ext.job_status_history WHERE job_id = :'a' AND to_status = 'completed')
       = (SELECT finished_at FROM queue_ext.job_archive WHERE id = :'a') AS completion_at_is_finished_at,
       (SELECT worker_id FROM queue_ext.job_status_history WHERE job_id = :'a' AND to_status = 'running') AS worker;

-- Failed, retried, failed again, completed: the failed attempts' claims are stored when they fail.
SELECT queue_ext.enqueue_job('h', '{}') AS b \gset
SELECT lease_token AS t FROM queue_ext.get_next_job('h') \gset
SELECT queue_ext.fail_job(:'b', 'first', :'t');
SELECT lease_token AS t FROM queue_ext.get_next_job('h') \gset
SELECT pg_temp.trail(:'b') AS second_attempt_running;
SELECT queue_ext.fail_job(:'b', 'second', :'t');
SELECT lease_token AS t FROM queue_ext.get_next_job('h') \gset
SELECT queue_ext.complete_job(:'b', NULL, :'t');
SELECT pg_temp.trail(:'b') AS completed_third, pg_temp.stored(:'b') AS stored;

-- The last attempt fails: dead, every row stored.
SELECT queue_ext.enqueue_job('h', '{}', max_attempts => 1) AS c \gset
SELECT lease_token AS t FROM queue_ext.get_next_job('h') \gset
SELECT queue_ext.fail_job(:'c', 'fatal', :'t');
SELECT pg_temp.trail(:'c') AS dead;

-- Cancelled while running, through complete_jobs.
SELECT queue_ext.enqueue_job('h', '{}') AS d \gset
SELECT lease_token AS t FROM queue_ext.get_next_job('h') \gset
SELECT queue_ext.cancel_job(:'d', 'stop');
SELECT status FROM queue_ext.complete_jobs(ARRAY[:'d']::uuid[], ARRAY[:'t']::uuid[]);
SELECT pg_temp.trail(:'d') AS cancelled_running;

-- A lease that expires: returned to the queue, claimed again, completed in a batch.
SELECT queue_ext.enqueue_job('h', '{}') AS e \gset
SELECT lease_token AS t FROM queue_ext.get_next_job('h', lease => '1 second') \gset
UPDATE queue_ext.job_queue SET lease_expires_at = now() - interval '1 second' WHERE id = :'e';
SELECT queue_ext.cleanup_stuck_jobs();
CREATE TEMP TABLE batch AS SELECT * FROM queue_ext.get_next_jobs('h', 10);
SELECT status FROM queue_ext.complete_jobs((SELECT array_agg(job_id) FROM batch), (SELECT array_agg(lease_token) FROM batch));
SELECT pg_temp.trail(:'e') AS returned_then_completed;

-- Dropping a queue cancels its running job after storing its claim.
SELECT queue_ext.create_queue('h_drop');
SELECT queue_ext.enqueue_job('h_drop', '{}') AS f \gset
SELECT lease_token AS t FROM queue_ext.get_next_job('h_drop') \gset
SELECT queue_ext.drop_queue('h_drop', force => true);
SELECT pg_temp.trail(:'f') AS dropped_running;

-- A queue with events on stores its claims and completions (they are published from the
-- table's inserts): the same trail, nothing derived, nothing twice.
SELECT queue_ext.create_queue('h_events', notify_events => true);
SELECT queue_ext.enqueue_job('h_events', '{}') AS g \gset
SELECT lease_token AS t FROM queue_ext.get_next_job('h_events') \gset
SELECT queue_ext.complete_job(:'g', NULL, :'t');
SELECT pg_temp.trail(:'g') AS with_events, pg_temp.stored(:'g') AS stored;
-- The same through complete_jobs, three jobs in one batch.
SELECT count(*) FROM queue_ext.enqueue_jobs('h_events', array_fill('{}'::jsonb, ARRAY[3]));
CREATE TEMP TABLE evbatch AS SELECT * FROM queue_ext.get_next_jobs('h_events', 3);
SELECT count(*) FROM queue_ext.complete_jobs((SELECT array_agg(job_id) FROM evbatch), (SELECT array_agg(lease_token) FROM evbatch));
SELECT pg_temp.trail(job_id) AS batch_with_events, pg_temp.stored(job_id) AS stored FROM evbatch ORDER BY job_id;
-- Events switched on while a job runs: its claim is stored with its completion.
SELECT queue_ext.enqueue_job('h', '{}') AS i \gset
SELECT lease_token AS t FROM queue_ext.get_next_job('h') \gset
SELECT queue_ext.alter_queue('h', notify_events => true);
SELECT queue_ext.complete_job(:'i', NULL, :'t');
SELECT queue_ext.alter_queue('h', notify_events => false);
SELECT pg_temp.trail(:'i') AS events_switched_on, pg_temp.stored(:'i') AS stored;

-- A job claimed before claimed_at existed (running across the update to 0.8.0): its claim
-- was stored then, and its completion is stored too.
SELECT queue_ext.enqueue_job('h', '{}') AS k \gset
SELECT lease_token AS t FROM queue_ext.get_next_job('h') \gset
INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, enqueued_by)
SELECT id, queue_name, 'queued', 'running', attempt, enqueued_by FROM queue_ext.job_queue WHERE id = :'k';
UPDATE queue_ext.job_queue SET claimed_at = NULL WHERE id = :'k';
SELECT pg_temp.trail(:'k') AS old_claim_running;
SELECT queue_ext.complete_job(:'k', NULL, :'t');
SELECT pg_temp.trail(:'k') AS old_claim_completed, pg_temp.stored(:'k') AS stored;
-- The same through complete_jobs.
SELECT queue_ext.enqueue_job('h', '{}') AS k2 \gset
SELECT lease_token AS t FROM queue_ext.get_next_job('h') \gset
INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, enqueued_by)
SELECT id, queue_name, 'queued', 'running', attempt, enqueued_by FROM queue_ext.job_queue WHERE id = :'k2';
UPDATE queue_ext.job_queue SET claimed_at = NULL WHERE id = :'k2';
SELECT status FROM queue_ext.complete_jobs(ARRAY[:'k2']::uuid[], ARRAY[:'t']::uuid[]);
SELECT pg_temp.trail(:'k2') AS old_claim_batch, pg_temp.stored(:'k2') AS stored;

-- Purging finished jobs takes their derived rows with their archive rows (the dead job's
-- two rows stay with its dead letter).
SELECT queue_ext.purge_jobs('0 seconds', 'h') > 0 AS purged;
SELECT count(*) AS left_in_history FROM queue_ext.job_status_history WHERE queue_name = 'h';

-- Many jobs in one batch: each has its claim and its completion once.
SELECT count(*) FROM queue_ext.enqueue_jobs('h', array_fill('{}'::jsonb, ARRAY[500]));
CREATE TEMP TABLE big AS SELECT * FROM queue_ext.get_next_jobs('h', 500);
SELECT count(*) FROM queue_ext.complete_jobs((SELECT array_agg(job_id) FROM big), (SELECT array_agg(lease_token) FROM big));
SELECT to_status, count(*), count(DISTINCT job_id) FROM queue_ext.job_status_history
WHERE job_id IN (SELECT job_id FROM big) GROUP BY 1 ORDER BY 1;
SELECT count(*) AS stored FROM queue_ext.job_status_log WHERE job_id IN (SELECT job_id FROM big);
SELECT queue_ext.drop_queue('h', force => true);
SELECT queue_ext.drop_queue('h_events', force => true);
