-- Claims and completions find jobs through an index however their cached plans were made.
-- A session that first runs them against an empty queue caches generic plans for an empty
-- table; when the queue then fills up (faster than autovacuum re-analyzes it), those plans
-- must not scan the whole table on every call.
SELECT queue_ext.create_queue('plans');
VACUUM ANALYZE queue_ext.job_queue;
SELECT count(*) FROM generate_series(1, 10) AS i, LATERAL queue_ext.get_next_jobs('plans', 100) AS c;
SELECT count(*) FROM generate_series(1, 10) AS i, LATERAL queue_ext.get_next_job('plans') AS c;
SELECT count(*) FROM generate_series(1, 10) AS i,
       LATERAL queue_ext.complete_jobs(ARRAY[gen_random_uuid()], ARRAY[gen_random_uuid()]) AS c WHERE c.status IS NOT NULL;
SELECT count(*) FROM queue_ext.enqueue_jobs('plans', array_fill('{}'::jsonb, ARRAY[5000]));
BEGIN;
CREATE TEMP TABLE claimed AS SELECT * FROM queue_ext.get_next_jobs('plans', 100);
INSERT INTO claimed SELECT * FROM queue_ext.get_next_job('plans');
SELECT count(*) FROM queue_ext.complete_jobs((SELECT array_agg(job_id) FROM claimed),
                                             (SELECT array_agg(lease_token) FROM claimed)) WHERE status = 'completed';
SELECT seq_scan AS job_queue_seq_scans FROM pg_stat_xact_user_tables WHERE relid = 'queue_ext.job_queue'::regclass;
COMMIT;
SELECT queue_ext.drop_queue('plans', force => true);
