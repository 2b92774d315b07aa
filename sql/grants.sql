-- Privileges: who may call what. Runs last, after every function exists.
--
-- Functions are created EXECUTE-able by PUBLIC; take that away first so that nothing is
-- callable by a role we did not choose. Internal helpers (_*) stay owner-only.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA queue_ext FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA queue_ext FROM PUBLIC;
REVOKE ALL ON SCHEMA queue_ext FROM PUBLIC;
GRANT USAGE ON SCHEMA queue_ext TO queue_ext_producer, queue_ext_worker, queue_ext_admin;

-- Reads are filtered by row level security (schema.sql, webhooks.sql).
GRANT SELECT ON queue_ext.queues, queue_ext.job_queue, queue_ext.job_archive,
                queue_ext.job_dead_letter, queue_ext.job_status_log,
                queue_ext.job_status_history
    TO queue_ext_producer, queue_ext_worker, queue_ext_admin;
GRANT SELECT ON queue_ext.webhook_deliveries, queue_ext.job_dependencies, queue_ext.job_processing_status
    TO queue_ext_worker, queue_ext_admin;
GRANT SELECT ON queue_ext.webhook_targets TO queue_ext_admin;
GRANT SELECT ON queue_ext.rate_limits, queue_ext.concurrency_limits TO queue_ext_worker, queue_ext_admin;

-- Producers: enqueue, follow and cancel their own jobs, attach the enqueue trigger.
GRANT EXECUTE ON FUNCTION
    queue_ext.enqueue_job(text, jsonb, text, timestamptz, interval, integer, text, uuid[], text, text),
    queue_ext.enqueue_jobs(text, jsonb[], text, timestamptz, interval, integer, text, text),
    queue_ext.job_status(uuid),
    queue_ext.cancel_job(uuid, text),
    queue_ext.list_queues(),
    queue_ext.enqueue_trigger(),
    queue_ext.uuid_generate_v7()
TO queue_ext_producer;

-- Workers: claim, report, and see what they work on.
GRANT EXECUTE ON FUNCTION
    queue_ext.get_next_job(text, text, interval),
    queue_ext.get_next_job(text[], text, interval),
    queue_ext.get_next_jobs(text, integer, text, interval),
    queue_ext.get_next_jobs(text[], integer, text, interval),
    queue_ext.complete_job(uuid, jsonb, uuid),
    queue_ext.complete_jobs(uuid[], uuid[], jsonb[]),
    queue_ext.complete_and_get_next(uuid, text, jsonb, uuid, text, interval),
    queue_ext.fail_job(uuid, text, uuid, boolean, interval),
    queue_ext.heartbeat(uuid, uuid, interval),
    queue_ext.update_progress(uuid, real, jsonb, uuid),
    queue_ext.cancel_job(uuid, text),
    queue_ext.job_status(uuid),
    queue_ext.list_queues(),
    queue_ext.queue_stats(),
    queue_ext.metrics(),
    queue_ext.worker_health(),
    queue_ext.health(),
    queue_ext.dispatcher_status(),
    queue_ext.process_jobs(text, integer),
    queue_ext.list_limits()
TO queue_ext_worker;

-- (ALL FUNCTIONS above leaves procedures out.)
REVOKE ALL ON PROCEDURE queue_ext.purge_jobs_in_batches(interval, text, integer, bigint) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE queue_ext.purge_jobs_in_batches(interval, text, integer, bigint) TO queue_ext_admin;
REVOKE ALL ON PROCEDURE queue_ext.wait_for_jobs(text[], interval, boolean) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE queue_ext.wait_for_jobs(text[], interval, boolean) TO queue_ext_worker;
REVOKE ALL ON PROCEDURE queue_ext.wait_for_next_job(text[], interval, text, interval, uuid, text, jsonb,
                                                    queue_ext.job_priority, integer, integer, uuid, timestamptz,
                                                    timestamptz) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE queue_ext.wait_for_next_job(text[], interval, text, interval, uuid, text, jsonb,
                                                       queue_ext.job_priority, integer, integer, uuid, timestamptz,
                                                       timestamptz) TO queue_ext_worker;

-- Admins: everything public (queues and webhook targets, dead letters, retention,
-- schedules). Admin is also a member of producer and worker (schema.sql).
GRANT EXECUTE ON FUNCTION
    queue_ext.create_queue(text, integer, interval, interval, interval, boolean, boolean,
                           text, text, jsonb, interval, integer, text, text, boolean, boolean),
    queue_ext.alter_queue(text, integer, interval, interval, interval, boolean,
                          text, text, jsonb, interval, integer, text, text, boolean, boolean),
    queue_ext.drop_queue(text, boolean),
    queue_ext.pause_queue(text),
    queue_ext.resume_queue(text),
    queue_ext.cleanup_stuck_jobs(),
    queue_ext.retry_dead_job(uuid),
    queue_ext.purge_dead_letter(interval, text),
    queue_ext.purge_jobs(interval, text, integer),
    queue_ext.schedule_job(text, text, text, jsonb),
    queue_ext.unschedule_job(text),
    queue_ext.set_rate_limit(text, integer, interval, integer),
    queue_ext.remove_rate_limit(text),
    queue_ext.set_concurrency_limit(text, integer)
TO queue_ext_admin;

-- A server that preloads queue_ext starts this database's dispatcher as soon as this
-- transaction commits.
SELECT queue_ext._wake_launcher_at_commit();
