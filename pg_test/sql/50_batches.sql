-- complete_jobs: a batch completed set-based; each job's new state comes back in input order,
-- NULL for a job not running under the given lease (the rest of the batch still completes).
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
SELECT queue_ext.create_queue('batch');
SELECT queue_ext.enqueue_job('batch', jsonb_build_object('n', n)) IS NOT NULL FROM generate_series(1, 4) AS n;
SELECT queue_ext.enqueue_job('batch', '{"child": true}',
       depends_on => ARRAY[(SELECT id FROM queue_ext.job_queue WHERE payload = '{"n": 1}')]) IS NOT NULL AS child;
CREATE TEMP TABLE claimed AS SELECT * FROM queue_ext.get_next_jobs('batch', 4);
SELECT count(*) FROM claimed;
-- Job 2 is cancelled while running; job 3 comes with a wrong lease token.
SELECT queue_ext.cancel_job((SELECT job_id FROM claimed WHERE payload = '{"n": 2}'), 'stop');
SELECT c.payload, r.status
FROM queue_ext.complete_jobs(
        (SELECT array_agg(job_id ORDER BY payload::text) FROM claimed),
        (SELECT array_agg(CASE WHEN payload = '{"n": 3}' THEN gen_random_uuid() ELSE lease_token END ORDER BY payload::text)
         FROM claimed),
        (SELECT array_agg(jsonb_build_object('done', payload) ORDER BY payload::text) FROM claimed)) AS r
JOIN claimed AS c ON c.job_id = r.job_id;
-- The dependent of job 1 was released; job 3 still runs; results were stored.
SELECT payload, status FROM queue_ext.job_queue WHERE queue_name = 'batch' ORDER BY id;
SELECT payload, status, result FROM queue_ext.job_archive WHERE queue_name = 'batch' ORDER BY id;
SELECT pg_temp.try(stmt) FROM (VALUES
    ($$SELECT * FROM queue_ext.complete_jobs(NULL)$$),
    ($$SELECT * FROM queue_ext.complete_jobs(ARRAY[gen_random_uuid()], ARRAY[]::uuid[])$$),
    ($$SELECT * FROM queue_ext.complete_jobs(ARRAY[gen_random_uuid()], NULL, ARRAY['{}', '{}']::jsonb[])$$)
) AS t(stmt);
