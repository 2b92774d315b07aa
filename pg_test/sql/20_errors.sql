-- Every misuse gets a SQLSTATE and a message naming the problem, and changes nothing.
-- try() runs a statement and shows "SQLSTATE: message", with job ids masked so the
-- expected output is stable.
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<id>', 'g');
END $$;
SELECT queue_ext.create_queue('q');
SELECT queue_ext.enqueue_job('q', '{}') AS id \gset
SELECT pg_temp.try(stmt) FROM (VALUES
    ($$SELECT queue_ext.enqueue_job('nope', '{}')$$),
    ($$SELECT queue_ext.enqueue_job('q', '{}', priority => 'urgent')$$),
    ($$SELECT queue_ext.enqueue_job('q', '{}', delay => '-5 minutes')$$),
    ($$SELECT queue_ext.enqueue_job('q', '[1, 2, 3]')$$),
    ($$SELECT queue_ext.enqueue_job('q', NULL)$$),
    ($$SELECT queue_ext.enqueue_jobs('q', ARRAY['{}', '"text"']::jsonb[])$$),
    ($$SET LOCAL queue_ext.max_payload_bytes = '100B'; SELECT queue_ext.enqueue_job('q', jsonb_build_object('blob', repeat('x', 500)))$$),
    ($$SELECT queue_ext.enqueue_job('q', '{}', depends_on => ARRAY['00000000-0000-0000-0000-000000000000']::uuid[])$$),
    ($$SELECT queue_ext.create_queue('Bad Name')$$),
    ($$SELECT queue_ext.create_queue('q')$$),
    ($$SELECT queue_ext.create_queue('queue_ext.mine')$$),
    ($$SELECT queue_ext.drop_queue('q')$$),
    ($$SELECT queue_ext.complete_job('00000000-0000-0000-0000-000000000000')$$),
    ($$SELECT queue_ext.complete_job('$$ || :'id' || $$')$$),
    ($$SELECT queue_ext.fail_job('$$ || :'id' || $$', 'x')$$),
    ($$SELECT * FROM queue_ext.get_next_jobs('q', 0)$$),
    ($$SELECT * FROM queue_ext.get_next_job('q', lease => '-1 second')$$),
    ($$SELECT queue_ext.create_queue('hooked', webhook_url => 'ftp://example.com/x')$$),
    ($$SELECT queue_ext.create_queue('hooked', webhook_url => 'https://example.com/x', webhook_method => 'TRACE')$$),
    ($$SELECT queue_ext.create_queue('hooked', webhook_url => 'https://example.com/x', webhook_headers => '{"X-Bad": "a\r\nInjected: 1"}')$$),
    ($$SELECT queue_ext.schedule_job('nightly', '0 3 * * *', 'q')$$)
) AS t(stmt);
-- A stale lease is refused and the job is untouched; a finished job cannot finish twice.
SELECT job_id = :'id' AS claimed_it FROM queue_ext.get_next_job('q');
SELECT pg_temp.try($$SELECT queue_ext.complete_job('$$ || :'id' || $$', lease_token => gen_random_uuid())$$);
SELECT status FROM queue_ext.job_status(:'id');
SELECT queue_ext.complete_job(:'id');
SELECT pg_temp.try($$SELECT queue_ext.complete_job('$$ || :'id' || $$')$$);
SELECT count(*) AS jobs_left_in_q FROM queue_ext.job_queue WHERE queue_name = 'q';
