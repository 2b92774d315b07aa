-- Fills a scratch database with 1,000,000 finished jobs (over the last 7 days), 1,000,000
-- history rows, 100,000 dead letters, 200,000 webhook deliveries and 1,000,000 live queued
-- jobs across 10 queues, to measure what a scrape and the pages cost at that size:
--
--   createdb -h 127.0.0.1 -p PORT -U postgres scale
--   psql -h 127.0.0.1 -p PORT -U postgres -d scale -c 'CREATE EXTENSION queue_ext' -f dashboard/scale.sql
--   psql -h 127.0.0.1 -p PORT -U postgres -d scale -c '\timing on' -c 'SELECT length(queue_ext.metrics())'
--
-- Rows are written straight into the tables (as a superuser), not through enqueue_job:
-- this measures reads, and a million enqueues would take minutes.
SELECT queue_ext.create_queue('q' || n) FROM generate_series(0, 9) n;
INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts, enqueued_by, created_at, run_at, started_at, finished_at)
SELECT gen_random_uuid(), 'q' || (g % 10), jsonb_build_object('n', g, 'user', 'u' || (g % 1000)), 'normal', 'completed', 1, 5, 'postgres',
       t - interval '2 seconds', t - interval '2 seconds', t - interval '1 second', t
FROM (SELECT g, now() - (g * interval '604 milliseconds') AS t FROM generate_series(1, 1000000) g) s;
INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, enqueued_by, at)
SELECT gen_random_uuid(), 'q' || (g % 10), 'running', CASE WHEN g % 7 = 0 THEN 'retrying' ELSE 'completed' END::queue_ext.job_state, 1, 'postgres',
       now() - ((1000001 - g) * interval '604 milliseconds')
FROM generate_series(1, 1000000) g;
INSERT INTO queue_ext.job_dead_letter (id, queue_name, payload, priority, attempt, max_attempts, reason, enqueued_by, created_at, died_at)
SELECT gen_random_uuid(), 'q' || (g % 10), '{}', 'normal', 5, 5, 'exhausted', 'postgres', now() - g * interval '6 seconds', now() - g * interval '6 seconds'
FROM generate_series(1, 100000) g;
INSERT INTO queue_ext.webhook_deliveries (job_id, queue_name, attempt, url, outcome, status_code, duration_ms, delivered_at)
SELECT gen_random_uuid(), 'q' || (g % 10), 1, 'http://127.0.0.1/x', (ARRAY['delivered','retry','failed'])[1 + g % 3], 200, (g % 500)::float, now() - g * interval '3 seconds'
FROM generate_series(1, 200000) g;
VACUUM ANALYZE queue_ext.job_archive, queue_ext.job_status_log, queue_ext.job_dead_letter, queue_ext.webhook_deliveries;
INSERT INTO queue_ext.job_queue (id, queue_name, payload, status, run_at, max_attempts, enqueued_by, created_at)
SELECT gen_random_uuid(), 'q' || (g % 10), jsonb_build_object('n', g, 'user', 'u' || (g % 1000)), 'queued',
       now() - g * interval '1 millisecond', 5, 'postgres', now()
FROM generate_series(1, 1000000) g;
VACUUM ANALYZE queue_ext.job_queue;
