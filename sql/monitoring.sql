-- Stats and health: what dashboards, alerts and a job_processing_status view ask for.
-- Figures over finished jobs cover the last hour (the archive's finished_at index), so
-- their cost does not grow with retained history.

CREATE FUNCTION queue_ext.queue_stats()
RETURNS TABLE (
    queue_name           text,
    paused               boolean,
    waiting              bigint,
    queued               bigint,
    retrying             bigint,
    running              bigint,
    dead                 bigint,
    completed_last_hour  bigint,
    cancelled_last_hour  bigint,
    oldest_queued_age    interval,
    mean_wait            interval,
    p95_wait             interval,
    mean_run             interval,
    p95_run              interval,
    completed_per_minute numeric,
    failed_per_minute    numeric,
    retry_rate           numeric
)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT q.queue_name, q.paused,
           coalesce(live.waiting, 0), coalesce(live.queued, 0), coalesce(live.retrying, 0), coalesce(live.running, 0),
           (SELECT count(*) FROM queue_ext.job_dead_letter AS d WHERE d.queue_name = q.queue_name),
           coalesce(fin.completed, 0), coalesce(fin.cancelled, 0),
           live.oldest,
           fin.mean_wait, fin.p95_wait, fin.mean_run, fin.p95_run,
           round(coalesce(fin.completed_5m, 0) / 5.0, 2),
           round(coalesce(fails.failed_5m, 0) / 5.0, 2),
           round(fin.retried::numeric / nullif(fin.completed, 0), 3)
    FROM queue_ext.queues AS q
    LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE j.status = 'waiting')  AS waiting,
               count(*) FILTER (WHERE j.status = 'queued')   AS queued,
               count(*) FILTER (WHERE j.status = 'retrying') AS retrying,
               count(*) FILTER (WHERE j.status = 'running')  AS running,
               now() - min(j.run_at) FILTER (WHERE j.status IN ('queued', 'retrying') AND j.run_at <= now()) AS oldest
        FROM queue_ext.job_queue AS j WHERE j.queue_name = q.queue_name
    ) AS live ON true
    LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE a.status = 'completed') AS completed,
               count(*) FILTER (WHERE a.status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE a.status = 'completed' AND a.finished_at > now() - interval '5 minutes') AS completed_5m,
               count(*) FILTER (WHERE a.status = 'completed' AND a.attempt > 1) AS retried,
               avg(a.started_at - a.run_at) AS mean_wait,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY a.started_at - a.run_at) AS p95_wait,
               avg(a.finished_at - a.started_at) FILTER (WHERE a.status = 'completed') AS mean_run,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY a.finished_at - a.started_at)
                   FILTER (WHERE a.status = 'completed') AS p95_run
        FROM queue_ext.job_archive AS a
        WHERE a.queue_name = q.queue_name AND a.finished_at > now() - interval '1 hour'
    ) AS fin ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS failed_5m FROM queue_ext.job_dead_letter AS d
        WHERE d.queue_name = q.queue_name AND d.died_at > now() - interval '5 minutes'
    ) AS fails ON true
    ORDER BY q.queue_name
$$;

-- Workers seen in the last hour: SQL workers (by the worker_id they claim with) and the
-- dispatchers. A worker is stale when it holds jobs whose leases have all expired.
CREATE FUNCTION queue_ext.worker_health()
RETURNS TABLE (
    worker_id           text,
    kind                text,
    jobs_held           bigint,
    completed_last_hour bigint,
    last_seen           timestamptz,
    healthy             boolean
)
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH held AS (
        SELECT j.worker_id, count(*) AS n,
               max(greatest(j.heartbeat_at, j.started_at)) AS last,
               bool_and(j.lease_expires_at <= now()) AS all_expired
        FROM queue_ext.job_queue AS j
        WHERE j.status = 'running' AND j.worker_id IS NOT NULL
        GROUP BY j.worker_id
    ), done AS (
        SELECT a.worker_id, count(*) AS n, max(a.finished_at) AS last
        FROM queue_ext.job_archive AS a
        WHERE a.finished_at > now() - interval '1 hour' AND a.worker_id IS NOT NULL
        GROUP BY a.worker_id
    )
    SELECT coalesce(h.worker_id, d.worker_id), 'sql worker', coalesce(h.n, 0), coalesce(d.n, 0),
           greatest(h.last, d.last), NOT coalesce(h.all_expired, false)
    FROM held AS h FULL JOIN done AS d ON d.worker_id = h.worker_id
    WHERE coalesce(h.worker_id, d.worker_id) <> 'queue_ext-dispatcher'
    UNION ALL
    SELECT 'queue_ext-dispatcher (' || s.database || ')', 'dispatcher', s.in_flight, s.delivered,
           s.last_heartbeat, s.running
    FROM queue_ext.dispatcher_status() AS s
    WHERE s.database = current_database() AND s.state <> 'not_preloaded'
    ORDER BY 1
$$;

-- One verdict for monitoring: {"status": "ok" | "degraded" | "failing", "reasons": [...],
-- "checks": {...}}. Failing: queue_ext is preloaded but this database's dispatcher is not
-- running (the reason says why: restarting, no background worker slot, not listed in
-- queue_ext.database...), or webhook jobs are due with no dispatcher at all. Degraded:
-- expired leases not yet returned, jobs dead in the last hour, runnable jobs waiting over
-- five minutes, stale workers, a dispatcher still starting while webhook jobs wait.
CREATE FUNCTION queue_ext.health() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    reasons text[] := '{}';
    failing boolean := false;
    dispatcher record;
    stuck bigint;
    dead_recent bigint;
    dlq bigint;
    oldest interval;
    stale_workers bigint;
    webhook_backlog bigint;
BEGIN
    SELECT s.running, s.state, s.detail, s.pid INTO dispatcher
    FROM queue_ext.dispatcher_status() AS s
    WHERE s.database = current_database()
    ORDER BY s.running DESC
    LIMIT 1;
    SELECT count(*) INTO webhook_backlog FROM queue_ext.job_queue AS j
    JOIN queue_ext.queues AS q USING (queue_name)
    WHERE q.is_webhook AND NOT q.paused AND j.status IN ('queued', 'retrying') AND j.run_at <= now();
    SELECT count(*) INTO stuck FROM queue_ext.job_queue WHERE status = 'running' AND lease_expires_at < now() - interval '1 minute';
    SELECT count(*), count(*) FILTER (WHERE died_at > now() - interval '1 hour') INTO dlq, dead_recent
    FROM queue_ext.job_dead_letter;
    SELECT now() - min(run_at) INTO oldest FROM queue_ext.job_queue
    WHERE status IN ('queued', 'retrying') AND run_at <= now();
    SELECT count(*) INTO stale_workers FROM queue_ext.worker_health() AS w WHERE NOT w.healthy;

    IF dispatcher.state IN ('not_preloaded', 'not_listed') THEN
        -- No dispatcher by configuration: only a problem when webhook work waits for one.
        IF webhook_backlog > 0 THEN
            failing := true;
            reasons := reasons || format('%s webhook jobs due but no dispatcher (%s); use process_jobs()', webhook_backlog,
                                         CASE dispatcher.state WHEN 'not_listed' THEN 'this database is not in queue_ext.database'
                                              ELSE 'queue_ext is not in shared_preload_libraries' END);
        END IF;
    ELSIF dispatcher.state = 'starting' THEN
        IF webhook_backlog > 0 THEN
            reasons := reasons || format('dispatcher starting; %s webhook jobs due', webhook_backlog);
        END IF;
    ELSIF NOT coalesce(dispatcher.running, false) THEN
        failing := true;
        reasons := reasons || format('dispatcher not running (%s): %s', coalesce(dispatcher.state, 'unknown'),
                                     coalesce(dispatcher.detail, 'no dispatcher reported for this database'));
    END IF;
    IF stuck > 0 THEN
        reasons := reasons || format('%s jobs stuck: lease expired over a minute ago', stuck);
    END IF;
    IF dead_recent > 0 THEN
        reasons := reasons || format('dead letter queue grew by %s in the last hour (%s in all)', dead_recent, dlq);
    END IF;
    IF oldest > interval '5 minutes' THEN
        reasons := reasons || format('oldest runnable job has waited %s', date_trunc('second', oldest));
    END IF;
    IF stale_workers > 0 THEN
        reasons := reasons || format('%s stale workers', stale_workers);
    END IF;
    RETURN jsonb_build_object(
        'status', CASE WHEN failing THEN 'failing' WHEN cardinality(reasons) > 0 THEN 'degraded' ELSE 'ok' END,
        'reasons', to_jsonb(reasons),
        'checks', jsonb_build_object(
            'dispatcher', jsonb_build_object('state', dispatcher.state, 'running', coalesce(dispatcher.running, false),
                                             'pid', dispatcher.pid, 'detail', dispatcher.detail),
            'stuck_jobs', stuck, 'dead_letter', dlq, 'dead_last_hour', dead_recent,
            'oldest_runnable_seconds', coalesce(extract(epoch FROM oldest)::numeric(12, 1), 0),
            'stale_workers', stale_workers, 'webhook_backlog', webhook_backlog),
        'at', now());
END
$$;

-- job_processing_status: per-queue counts at a glance, for psql and dashboards.
CREATE VIEW queue_ext.job_processing_status AS
    SELECT queue_name, queued + retrying AS pending, waiting, running, dead,
           completed_last_hour, oldest_queued_age, p95_wait, p95_run, paused
    FROM queue_ext.queue_stats();
