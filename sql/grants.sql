-- Privileges: who may call what. Runs last, after every function exists.
--
-- Functions are created EXECUTE-able by PUBLIC; take that away first so that nothing is
-- callable by a role we did not choose. Internal helpers (_*) stay owner-only.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA queue_ext FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA queue_ext FROM PUBLIC;
REVOKE ALL ON SCHEMA queue_ext FROM PUBLIC;
GRANT USAGE ON SCHEMA queue_ext TO queue_ext_producer, queue_ext_worker, queue_ext_admin;

-- Reads are filtered by row level security (schema.sql).
GRANT SELECT ON queue_ext.queues, queue_ext.job_queue, queue_ext.job_archive,
                queue_ext.job_dead_letter, queue_ext.job_status_history
    TO queue_ext_producer, queue_ext_worker, queue_ext_admin;
GRANT SELECT ON queue_ext.webhook_deliveries TO queue_ext_worker, queue_ext_admin;
GRANT SELECT ON queue_ext.webhook_targets TO queue_ext_admin;

-- Producers: enqueue, and read the status of their jobs.
GRANT EXECUTE ON FUNCTION
    queue_ext.enqueue_job(text, jsonb, text, timestamptz, interval, integer),
    queue_ext.enqueue_jobs(text, jsonb[], text, timestamptz, interval, integer),
    queue_ext.job_status(uuid),
    queue_ext.list_queues(),
    queue_ext.uuid_generate_v7()
TO queue_ext_producer;

-- Workers: claim, complete, fail, and see what they work on.
GRANT EXECUTE ON FUNCTION
    queue_ext.get_next_job(text, text, interval),
    queue_ext.get_next_job(text[], text, interval),
    queue_ext.get_next_jobs(text, integer, text, interval),
    queue_ext.get_next_jobs(text[], integer, text, interval),
    queue_ext.complete_job(uuid, jsonb, uuid),
    queue_ext.fail_job(uuid, text, uuid, boolean, interval),
    queue_ext.job_status(uuid),
    queue_ext.list_queues(),
    queue_ext.queue_stats()
TO queue_ext_worker;

-- Admins: everything public (queue management, dead letters, retention, stats). Admin is
-- also a member of producer and worker (schema.sql).
GRANT EXECUTE ON FUNCTION
    queue_ext.create_queue(text, integer, interval, interval, interval, boolean, text, text, jsonb, interval, integer, text, text, boolean),
    queue_ext.alter_queue(text, integer, interval, interval, interval, text, text, jsonb, interval, integer, text, text, boolean),
    queue_ext.drop_queue(text, boolean),
    queue_ext.pause_queue(text),
    queue_ext.resume_queue(text),
    queue_ext.cleanup_stuck_jobs(),
    queue_ext.retry_dead_job(uuid),
    queue_ext.purge_dead_letter(interval, text),
    queue_ext.purge_jobs(interval, text),
    queue_ext.queue_stats()
TO queue_ext_admin;
