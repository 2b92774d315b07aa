-- Integrations: a table trigger that enqueues row changes, and schedules with pg_cron.

-- Attach to any table:
--   CREATE TRIGGER uploads_to_queue AFTER INSERT OR UPDATE OR DELETE ON uploads
--     FOR EACH ROW EXECUTE FUNCTION queue_ext.enqueue_trigger('uploads');
-- Each change becomes a job with payload {type, table, schema, record, old_record} (the
-- shape of Supabase database webhooks). SECURITY DEFINER, so whoever writes the table
-- needs no grant on queue_ext; the job is enqueued_by that writer.
CREATE FUNCTION queue_ext.enqueue_trigger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_NARGS < 1 THEN
        RAISE EXCEPTION 'queue_ext.enqueue_trigger needs the queue name as its argument'
            USING ERRCODE = '22023', HINT = 'EXECUTE FUNCTION queue_ext.enqueue_trigger(''my_queue'')';
    END IF;
    IF TG_LEVEL <> 'ROW' THEN
        RAISE EXCEPTION 'queue_ext.enqueue_trigger must be a FOR EACH ROW trigger' USING ERRCODE = '22023';
    END IF;
    PERFORM queue_ext.enqueue_job(TG_ARGV[0], jsonb_build_object(
        'type', TG_OP,
        'table', TG_TABLE_NAME,
        'schema', TG_TABLE_SCHEMA,
        'record', CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE to_jsonb(NEW) END,
        'old_record', CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE to_jsonb(OLD) END));
    RETURN NULL;
END
$$;

CREATE FUNCTION queue_ext._require_pg_cron() RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION 'schedules need the pg_cron extension, which is not installed in this database'
            USING ERRCODE = '55000',
                  HINT = 'Add pg_cron to shared_preload_libraries, set cron.database_name, and CREATE EXTENSION pg_cron.';
    END IF;
END
$$;

-- Enqueues `payload` to `queue_name` on a pg_cron schedule ('*/5 * * * *', or pg_cron's
-- '30 seconds'). SECURITY INVOKER on purpose: pg_cron runs the job as whoever scheduled it,
-- so scheduling needs that role's own pg_cron and enqueue rights. Returns pg_cron's job id.
CREATE FUNCTION queue_ext.schedule_job(name text, schedule text, queue_name text, payload jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    id bigint;
BEGIN
    PERFORM queue_ext._require_pg_cron();
    PERFORM queue_ext._queue(schedule_job.queue_name);
    PERFORM queue_ext._check_payload(schedule_job.payload);
    EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO id
        USING 'queue_ext:' || schedule_job.name, schedule_job.schedule,
              format('SELECT queue_ext.enqueue_job(%L, %L::jsonb)', schedule_job.queue_name, schedule_job.payload);
    RETURN id;
END
$$;

CREATE FUNCTION queue_ext.unschedule_job(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    done boolean;
BEGIN
    PERFORM queue_ext._require_pg_cron();
    EXECUTE 'SELECT cron.unschedule($1)' INTO done USING 'queue_ext:' || unschedule_job.name;
    RETURN done;
END
$$;
