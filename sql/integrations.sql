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
    -- It returns NULL, which in a BEFORE trigger would silently skip the row being written
    -- while its job is enqueued.
    IF TG_WHEN <> 'AFTER' THEN
        RAISE EXCEPTION 'queue_ext.enqueue_trigger must be an AFTER trigger' USING ERRCODE = '22023',
            HINT = 'CREATE TRIGGER ... AFTER INSERT OR UPDATE OR DELETE ON ... FOR EACH ROW EXECUTE FUNCTION queue_ext.enqueue_trigger(''my_queue'')';
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

-- The schedule functions are SECURITY INVOKER (below), so they check their arguments
-- themselves, reading only what the calling admin may read: the internal helpers are
-- granted to no role. pg_cron names its jobs with the `name` type (63 bytes) and raises
-- XX000 for a NULL or unknown name, so the name is bounded and looked up first.

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
    limit_bytes bigint := pg_size_bytes(current_setting('queue_ext.max_payload_bytes', true));
BEGIN
    IF schedule_job.name IS NULL OR schedule_job.schedule IS NULL OR schedule_job.queue_name IS NULL
       OR schedule_job.payload IS NULL THEN
        RAISE EXCEPTION 'name, schedule, queue_name and payload must not be null' USING ERRCODE = '22004';
    END IF;
    IF length(schedule_job.name) NOT BETWEEN 1 AND 53 OR octet_length(schedule_job.name) > 53 THEN
        RAISE EXCEPTION 'schedule name must be 1 to 53 bytes long (got %)', octet_length(schedule_job.name)
            USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION 'schedules need the pg_cron extension, which is not installed in this database'
            USING ERRCODE = '55000',
                  HINT = 'Add pg_cron to shared_preload_libraries, set cron.database_name, and CREATE EXTENSION pg_cron.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM queue_ext.queues AS q WHERE q.queue_name = schedule_job.queue_name) THEN
        RAISE EXCEPTION 'queue "%" does not exist', schedule_job.queue_name USING ERRCODE = '42704';
    END IF;
    -- Internal queues take jobs only from the extension (queue_ext._refuse_internal).
    IF schedule_job.queue_name LIKE 'queue\_ext.%' THEN
        RAISE EXCEPTION 'cannot schedule jobs into queue "%": it is internal to queue_ext', schedule_job.queue_name
            USING ERRCODE = '42501';
    END IF;
    IF jsonb_typeof(schedule_job.payload) <> 'object' THEN
        RAISE EXCEPTION 'payload must be a JSON object, not %', jsonb_typeof(schedule_job.payload)
            USING ERRCODE = '22023';
    END IF;
    -- Refused now rather than by every run of the schedule.
    IF pg_column_size(schedule_job.payload) > limit_bytes THEN
        RAISE EXCEPTION 'payload is % bytes, over the limit of % bytes', pg_column_size(schedule_job.payload), limit_bytes
            USING ERRCODE = '54000';
    END IF;
    EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO id
        USING 'queue_ext:' || schedule_job.name, schedule_job.schedule,
              format('SELECT queue_ext.enqueue_job(%L, %L::jsonb)', schedule_job.queue_name, schedule_job.payload);
    RETURN id;
END
$$;

-- false when the caller has no schedule of that name.
CREATE FUNCTION queue_ext.unschedule_job(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    done boolean;
BEGIN
    IF unschedule_job.name IS NULL THEN
        RAISE EXCEPTION 'name must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') THEN
        RAISE EXCEPTION 'schedules need the pg_cron extension, which is not installed in this database'
            USING ERRCODE = '55000',
                  HINT = 'Add pg_cron to shared_preload_libraries, set cron.database_name, and CREATE EXTENSION pg_cron.';
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM cron.job WHERE jobname = $1 AND username = current_user)'
        INTO done USING 'queue_ext:' || unschedule_job.name;
    IF NOT done THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT cron.unschedule($1)' INTO done USING 'queue_ext:' || unschedule_job.name;
    RETURN done;
END
$$;
