-- queue_ext in ten minutes, from psql. Paste it a block at a time, or run it whole:
--   psql -v ON_ERROR_STOP=1 -d yourdb -f examples/psql-walkthrough.sql
-- It needs `CREATE EXTENSION queue_ext` done and a role with queue_ext_admin (or a
-- superuser). It makes a queue named 'walkthrough' and drops it at the end.
\set QUIET on
\pset null '(null)'
\echo '== 1. A queue: 3 attempts, retries after 1 s, 2 s, ... (capped at 1 minute)'
SELECT queue_ext.create_queue('walkthrough', max_attempts => 3, backoff_base => '1 second',
                              backoff_cap => '1 minute', lease_duration => '30 seconds',
                              if_not_exists => true);

\echo '== 2. Enqueue: a job is a JSON object; the id is a UUIDv7 (time-ordered)'
SELECT queue_ext.enqueue_job('walkthrough', '{"to": "ada@example.com"}') AS first_job \gset
SELECT queue_ext.enqueue_job('walkthrough', '{"to": "urgent@example.com"}', priority => 'critical');
SELECT queue_ext.enqueue_job('walkthrough', '{"to": "later@example.com"}', delay => '1 hour');
-- Inside your own transaction: a rollback leaves no job.
BEGIN;
SELECT queue_ext.enqueue_job('walkthrough', '{"to": "never@example.com"}');
ROLLBACK;
SELECT status, count(*) FROM queue_ext.job_queue WHERE queue_name = 'walkthrough' GROUP BY 1 ORDER BY 1;

\echo '== 3. Claim: the critical job comes first; the claim is a lease with a fencing token'
SELECT job_id, payload, attempt, lease_token FROM queue_ext.get_next_job('walkthrough', 'psql-worker') \gset
SELECT :'job_id' AS claimed, :'payload' AS payload;

\echo '== 4. While it runs: progress and heartbeats extend the lease (false means: cancelled, stop)'
SELECT queue_ext.update_progress(:'job_id', 50, '{"step": "rendering"}', lease_token => :'lease_token');
SELECT queue_ext.heartbeat(:'job_id', :'lease_token');

\echo '== 5. Complete it with a result'
SELECT queue_ext.complete_job(:'job_id', '{"message_id": "m-1"}', lease_token => :'lease_token');
SELECT status, attempt, result FROM queue_ext.job_status(:'job_id');

\echo '== 6. A failure is retried after backoff; a permanent one goes to the dead letter queue'
SELECT job_id, lease_token FROM queue_ext.get_next_job('walkthrough', 'psql-worker') \gset
SELECT queue_ext.fail_job(:'job_id', 'SMTP timeout', lease_token => :'lease_token');
SELECT status, attempt, last_error, run_at > now() AS waits FROM queue_ext.job_status(:'job_id');
-- A job with one attempt goes straight to the dead letter queue when it fails.
SELECT queue_ext.enqueue_job('walkthrough', '{"to": "bounce@example.com"}', max_attempts => 1) AS bounce \gset
SELECT job_id, lease_token FROM queue_ext.get_next_job('walkthrough', 'psql-worker') \gset
SELECT queue_ext.fail_job(:'job_id', 'mailbox full', lease_token => :'lease_token');
SELECT id, attempt, last_error, reason FROM queue_ext.job_dead_letter WHERE id = :'bounce';
SELECT queue_ext.retry_dead_job(:'bounce');   -- redrive it with fresh attempts

\echo '== 7. History and stats'
SELECT from_status, to_status, attempt, worker_id, error FROM queue_ext.job_status_history
 WHERE job_id = :'first_job' ORDER BY id;
SELECT queue_name, queued, retrying, running, dead, completed_last_hour FROM queue_ext.queue_stats()
 WHERE queue_name = 'walkthrough';
SELECT queue_ext.health()->>'status' AS health, queue_ext.health()->'reasons' AS why;  -- degraded: step 6 killed a job

\echo '== 8. Workers wake on LISTEN: an enqueue announces its queue after it commits'
LISTEN queue_ext_jobs;
SELECT queue_ext.enqueue_job('walkthrough', '{"to": "wake@example.com"}');
SELECT pg_sleep(0.5) AS "psql shows the notification after this";
UNLISTEN queue_ext_jobs;

\echo '== 9. Clean up: drop the queue and everything still in it'
SELECT queue_ext.drop_queue('walkthrough', force => true);
\echo 'Done. Next: the SQL API in README.md, and workers in examples/.'
