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

-- A statement that changes one running job by id reads it through the primary key. With
-- nothing bounding its key, job_queue_lease_idx could look as cheap as one lookup to the
-- planner, and reading all of it visits the entries of every finished job that vacuum
-- cannot remove yet (while an old snapshot is held), so no such statement may use it.
SELECT queue_ext.create_queue('plans_by_id');
SELECT count(*) FROM queue_ext.enqueue_jobs('plans_by_id', array_fill('{}'::jsonb, ARRAY[5]));
VACUUM ANALYZE queue_ext.job_queue;
BEGIN;
CREATE TEMP TABLE held AS SELECT row_number() OVER (ORDER BY job_id) AS n, * FROM queue_ext.get_next_jobs('plans_by_id', 5);
SELECT pg_stat_get_xact_numscans('queue_ext.job_queue_lease_idx'::regclass) AS lease_scans_before \gset
SELECT queue_ext.heartbeat(job_id, lease_token) FROM held WHERE n = 1;
SELECT queue_ext.update_progress(job_id, 50, NULL, lease_token) FROM held WHERE n = 2;
SELECT queue_ext.fail_job(job_id, 'boom', lease_token) FROM held WHERE n = 3;
SELECT queue_ext.complete_job(job_id, NULL, lease_token) FROM held WHERE n = 4;
SELECT * FROM queue_ext.complete_jobs((SELECT array_agg(job_id) FROM held WHERE n = 5),
                                      (SELECT array_agg(lease_token) FROM held WHERE n = 5)) WHERE status IS NULL;
SELECT pg_stat_get_xact_numscans('queue_ext.job_queue_lease_idx'::regclass) - :lease_scans_before
       AS lease_index_scans_by_id;
COMMIT;
SELECT queue_ext.drop_queue('plans_by_id', force => true);
