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

-- Returning expired leases reads the lease index only up to now(): running jobs whose lease
-- has not expired (and the dead entries of finished ones) are never visited.
SELECT queue_ext.create_queue('plans_leases');
SELECT count(*) FROM queue_ext.enqueue_jobs('plans_leases', array_fill('{}'::jsonb, ARRAY[200]));
SELECT count(*) FROM queue_ext.get_next_jobs('plans_leases', 200, lease => '1 hour');
VACUUM ANALYZE queue_ext.job_queue;
CREATE FUNCTION pg_temp.job_rows_read() RETURNS bigint LANGUAGE sql AS $$
    SELECT pg_stat_get_xact_tuples_returned('queue_ext.job_queue'::regclass)
         + pg_stat_get_xact_tuples_fetched('queue_ext.job_queue'::regclass)
         + pg_stat_get_xact_tuples_returned('queue_ext.job_queue_lease_idx'::regclass)
$$;
-- The dispatcher calls it every second, and its cached plan can go generic (only_worker
-- unknown when planned): that plan must bound the scan too.
SET plan_cache_mode = force_generic_plan;
BEGIN;
SELECT pg_temp.job_rows_read() AS read_before \gset
SELECT queue_ext.cleanup_stuck_jobs();
SELECT pg_temp.job_rows_read() - :read_before AS job_rows_read;
COMMIT;
SELECT queue_ext.drop_queue('plans_leases', force => true);
RESET plan_cache_mode;

-- The dispatcher's record of a batch of outcomes (200 delivered, one whose lease was lost, one
-- to retry) finds each job through the primary key and matches it to its outcome in one join:
-- no lease index entry is read, and each job ends once, as its outcome says.
SELECT queue_ext.create_queue('plans_record');
SELECT count(*) FROM queue_ext.enqueue_jobs('plans_record', array_fill('{}'::jsonb, ARRAY[202]));
VACUUM ANALYZE queue_ext.job_queue;
BEGIN;
CREATE TEMP TABLE sent AS
SELECT row_number() OVER (ORDER BY job_id) AS n, * FROM queue_ext.get_next_jobs('plans_record', 202);
SELECT pg_stat_get_xact_numscans('queue_ext.job_queue_lease_idx'::regclass) AS lease_scans_before \gset
SELECT queue_ext._dispatch_record_rows(
    array_agg(job_id ORDER BY n),
    array_agg(CASE WHEN n = 1 THEN gen_random_uuid() ELSE lease_token END ORDER BY n),
    array_agg(queue_name ORDER BY n), array_agg(attempt ORDER BY n),
    array_agg('http://example.com/hook'::text ORDER BY n),
    array_agg(CASE WHEN n = 2 THEN 'retry' ELSE 'delivered' END ORDER BY n),
    array_agg(CASE WHEN n = 2 THEN 503 ELSE 200 END ORDER BY n),
    array_agg(CASE WHEN n = 2 THEN 'HTTP 503' END ORDER BY n),
    array_agg(1.5::float8 ORDER BY n),
    array_agg('{"content-type": "text/plain"}'::jsonb ORDER BY n),
    array_agg('ok'::text ORDER BY n),
    array_agg(NULL::float8 ORDER BY n)) AS applied
FROM sent;
SELECT pg_stat_get_xact_numscans('queue_ext.job_queue_lease_idx'::regclass) - :lease_scans_before
       AS lease_index_scans;
SELECT s.n, j.status FROM sent AS s JOIN queue_ext.job_queue AS j ON j.id = s.job_id ORDER BY s.n;
SELECT count(*) AS archived, count(DISTINCT a.id) AS distinct_jobs,
       count(*) FILTER (WHERE a.result = '{"body": "ok", "status": 200, "headers": {"content-type": "text/plain"}, "duration_ms": 1.5}')
           AS with_the_response
FROM queue_ext.job_archive AS a JOIN sent AS s ON s.job_id = a.id;
SELECT d.outcome, count(*) FROM queue_ext.webhook_deliveries AS d
WHERE d.queue_name = 'plans_record' GROUP BY d.outcome ORDER BY d.outcome;
-- Arrays of different lengths are refused, naming the length expected.
SELECT queue_ext._dispatch_record_rows(ARRAY[gen_random_uuid()], '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}',
                                       '{}', '{}', '{}');
ROLLBACK;
SELECT queue_ext.drop_queue('plans_record', force => true);
