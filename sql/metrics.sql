-- Prometheus text exposition of queue_ext's state: SELECT queue_ext.metrics() returns what a
-- scraper reads from GET /metrics (the dashboard serves exactly this text).
--
-- Everything is computed when scraped, from what the job lifecycle writes anyway: the hot
-- paths (enqueue, claim, complete, fail) keep no counters for it. So the cost of a scrape
-- is bounded by what it reads, and it reads only
--   * job_queue (live jobs) and job_dead_letter, counted in full: they are the backlog;
--   * the last five minutes of job_archive, job_status_log and webhook_deliveries,
--     found through their time indexes (history through its index of failed attempts),
--     so retained history of any size costs nothing.
-- Per-queue totals since the beginning cannot be had that way (purge_jobs() deletes the
-- rows a total would count, and queues with keep_history => false never write them), so the
-- *_total counters come from shared memory instead (counters.rs: each completion, failure
-- and dead letter adds to them when its transaction commits; they start at 0 when the
-- server does, as Prometheus counters may). The *_last_5m series and the histograms are
-- windows over the tables: read them as they are (histogram_quantile() works on them
-- directly), not through rate(). The dispatcher's own counters are totals since it started.

-- A label value as the text format wants it: backslash, double quote and newline escaped.
CREATE FUNCTION queue_ext._metric_label(value text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '"' || replace(replace(replace(value, E'\\', E'\\\\'), '"', E'\\"'), E'\n', E'\\n') || '"'
$$;

CREATE FUNCTION queue_ext.metrics() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER
-- The estimates of the correlated per-queue subqueries run into the millions, which makes
-- the planner JIT-compile a query that then runs in milliseconds (JIT alone took ~2 s).
SET jit = off
SET search_path = pg_catalog, pg_temp
AS $$
    WITH
    -- Histogram bounds in seconds (le); +Inf is the count.
    job_bounds(b) AS (VALUES (ARRAY[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                                   300, 900, 3600]::double precision[])),
    http_bounds(b) AS (VALUES (ARRAY[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                    30]::double precision[])),
    since(t) AS (VALUES (now() - interval '5 minutes')),
    queues AS (SELECT q.queue_name, q.paused FROM queue_ext.queues AS q),
    -- The one read that grows with the backlog: a pass over the live jobs (~0.3 s per
    -- million on a small machine).
    live AS (
        SELECT j.queue_name, j.status, count(*) AS n FROM queue_ext.job_queue AS j GROUP BY 1, 2
    ),
    dead AS (SELECT d.queue_name, count(*) AS n FROM queue_ext.job_dead_letter AS d GROUP BY 1),
    states(state) AS (VALUES ('waiting'), ('queued'), ('retrying'), ('running')),
    jobs AS (
        SELECT q.queue_name, s.state, coalesce(l.n, 0) AS n
        FROM queues AS q CROSS JOIN states AS s
        LEFT JOIN live AS l ON l.queue_name = q.queue_name AND l.status::text = s.state
        UNION ALL
        SELECT q.queue_name, 'dead', coalesce(d.n, 0) FROM queues AS q LEFT JOIN dead AS d USING (queue_name)
    ),
    -- The earliest run_at among runnable jobs, read from the head of the claim indexes (one
    -- probe per priority); the job waits only if that moment has passed. Rate-limited jobs
    -- are read from their own index, all of the queue's.
    oldest AS (
        SELECT q.queue_name,
               greatest(extract(epoch FROM now() - least(
                   (SELECT min(head.run_at) FROM unnest(enum_range(NULL::queue_ext.job_priority)) AS p(priority),
                        LATERAL (SELECT j.run_at FROM queue_ext.job_queue AS j
                                 WHERE j.queue_name = q.queue_name AND j.priority = p.priority
                                   AND j.status IN ('queued', 'retrying') AND j.rate_limit_key IS NULL
                                 ORDER BY j.run_at LIMIT 1) AS head),
                   (SELECT min(j.run_at) FROM queue_ext.job_queue AS j
                    WHERE j.queue_name = q.queue_name AND j.status IN ('queued', 'retrying')
                      AND j.rate_limit_key IS NOT NULL))), 0) AS age
        FROM queues AS q
    ),
    finished AS (
        SELECT a.queue_name, a.status, a.started_at, a.run_at, a.finished_at
        FROM queue_ext.job_archive AS a, since
        WHERE a.finished_at > since.t
    ),
    died AS (
        SELECT d.queue_name, count(*) AS n FROM queue_ext.job_dead_letter AS d, since
        WHERE d.died_at > since.t GROUP BY 1
    ),
    -- Failed attempts: every transition out of running into retrying or dead
    -- (job_status_log_failures_idx holds exactly these).
    failures AS (
        SELECT h.queue_name, count(*) AS n
        FROM queue_ext.job_status_log AS h, since
        WHERE h.at > since.t AND h.from_status = 'running' AND h.to_status IN ('retrying', 'dead')
        GROUP BY 1
    ),
    throughput AS (
        SELECT q.queue_name,
               (SELECT count(*) FROM finished AS f WHERE f.queue_name = q.queue_name AND f.status = 'completed') AS completed,
               coalesce((SELECT n FROM failures AS f WHERE f.queue_name = q.queue_name), 0) AS failed,
               coalesce((SELECT n FROM died AS d WHERE d.queue_name = q.queue_name), 0) AS dead
        FROM queues AS q
    ),
    samples AS (
        SELECT 'queue_ext_job_wait_seconds' AS metric, f.queue_name AS label,
               extract(epoch FROM f.started_at - f.run_at)::double precision AS v
        FROM finished AS f WHERE f.started_at IS NOT NULL
        UNION ALL
        SELECT 'queue_ext_job_run_seconds', f.queue_name, extract(epoch FROM f.finished_at - f.started_at)::double precision
        FROM finished AS f WHERE f.status = 'completed' AND f.started_at IS NOT NULL
    ),
    deliveries AS (
        SELECT w.queue_name, w.outcome, w.duration_ms / 1000.0 AS v
        FROM queue_ext.webhook_deliveries AS w, since
        WHERE w.delivered_at > since.t
    ),
    -- One pass per histogram: each sample lands in bucket i = how many bounds are <= it;
    -- bucket k's cumulative count is then the samples with i < k.
    job_hist AS (
        SELECT s.metric, s.label, width_bucket(s.v, jb.b) AS i, count(*) AS n, sum(s.v) AS total
        FROM samples AS s, job_bounds AS jb GROUP BY 1, 2, 3
    ),
    http_hist AS (
        SELECT d.queue_name AS label, width_bucket(d.v, hb.b) AS i, count(*) AS n, sum(d.v) AS total
        FROM deliveries AS d, http_bounds AS hb WHERE d.v IS NOT NULL GROUP BY 1, 2
    ),
    hist_lines(metric, label, lines) AS (
        SELECT m.metric, q.queue_name,
               (SELECT string_agg(format('%s_bucket{queue=%s,le="%s"} %s', m.metric, queue_ext._metric_label(q.queue_name),
                                         k.le, coalesce((SELECT sum(h.n) FROM job_hist AS h
                                                         WHERE h.metric = m.metric AND h.label = q.queue_name AND h.i < k.ord), 0)),
                                  E'\n' ORDER BY k.ord)
                FROM job_bounds AS jb, unnest(jb.b) WITH ORDINALITY AS k(le, ord))
               || format(E'\n%1$s_bucket{queue=%2$s,le="+Inf"} %3$s\n%1$s_sum{queue=%2$s} %4$s\n%1$s_count{queue=%2$s} %3$s',
                         m.metric, queue_ext._metric_label(q.queue_name),
                         coalesce((SELECT sum(h.n) FROM job_hist AS h WHERE h.metric = m.metric AND h.label = q.queue_name), 0),
                         coalesce((SELECT sum(h.total) FROM job_hist AS h WHERE h.metric = m.metric AND h.label = q.queue_name), 0))
        FROM (VALUES ('queue_ext_job_wait_seconds'), ('queue_ext_job_run_seconds')) AS m(metric), queues AS q
    ),
    http_lines(label, lines) AS (
        SELECT q.queue_name,
               (SELECT string_agg(format('queue_ext_webhook_delivery_seconds_bucket{queue=%s,le="%s"} %s',
                                         queue_ext._metric_label(q.queue_name), k.le,
                                         coalesce((SELECT sum(h.n) FROM http_hist AS h WHERE h.label = q.queue_name AND h.i < k.ord), 0)),
                                  E'\n' ORDER BY k.ord)
                FROM http_bounds AS hb, unnest(hb.b) WITH ORDINALITY AS k(le, ord))
               || format(E'\nqueue_ext_webhook_delivery_seconds_bucket{queue=%1$s,le="+Inf"} %2$s'
                         || E'\nqueue_ext_webhook_delivery_seconds_sum{queue=%1$s} %3$s'
                         || E'\nqueue_ext_webhook_delivery_seconds_count{queue=%1$s} %2$s',
                         queue_ext._metric_label(q.queue_name),
                         coalesce((SELECT sum(h.n) FROM http_hist AS h WHERE h.label = q.queue_name), 0),
                         coalesce((SELECT sum(h.total) FROM http_hist AS h WHERE h.label = q.queue_name), 0))
        FROM queues AS q WHERE q.queue_name IN (SELECT d.queue_name FROM deliveries AS d)
    ),
    outcomes(outcome) AS (VALUES ('delivered'), ('retry'), ('failed'), ('stale')),
    dispatchers AS (SELECT s.database, s.running, s.delivered, s.retried, s.failed FROM queue_ext.dispatcher_status() AS s),
    totals AS (SELECT c.* FROM queue_ext._job_counters(ARRAY(SELECT q.queue_name FROM queues AS q)) AS c),
    families(ord, header, body) AS (
        SELECT 1, E'# HELP queue_ext_jobs Jobs by queue and state now: live jobs (waiting, queued, retrying, running) and dead letters kept.\n# TYPE queue_ext_jobs gauge',
               (SELECT string_agg(format('queue_ext_jobs{queue=%s,state="%s"} %s', queue_ext._metric_label(j.queue_name), j.state, j.n),
                                  E'\n' ORDER BY j.queue_name, j.state) FROM jobs AS j)
        UNION ALL
        SELECT 2, E'# HELP queue_ext_queue_paused 1 when the queue is paused.\n# TYPE queue_ext_queue_paused gauge',
               (SELECT string_agg(format('queue_ext_queue_paused{queue=%s} %s', queue_ext._metric_label(q.queue_name), q.paused::int),
                                  E'\n' ORDER BY q.queue_name) FROM queues AS q)
        UNION ALL
        SELECT 3, E'# HELP queue_ext_oldest_queued_job_age_seconds How long the oldest runnable (queued or retrying, due) job has waited; 0 when none.\n# TYPE queue_ext_oldest_queued_job_age_seconds gauge',
               (SELECT string_agg(format('queue_ext_oldest_queued_job_age_seconds{queue=%s} %s', queue_ext._metric_label(o.queue_name),
                                         round(o.age::numeric, 3)), E'\n' ORDER BY o.queue_name) FROM oldest AS o)
        UNION ALL
        SELECT 4, E'# HELP queue_ext_jobs_completed_last_5m Jobs completed in the last 5 minutes (from job_archive: queues with keep_history => false are not counted).\n# TYPE queue_ext_jobs_completed_last_5m gauge',
               (SELECT string_agg(format('queue_ext_jobs_completed_last_5m{queue=%s} %s', queue_ext._metric_label(t.queue_name), t.completed),
                                  E'\n' ORDER BY t.queue_name) FROM throughput AS t)
        UNION ALL
        SELECT 5, E'# HELP queue_ext_jobs_failed_last_5m Failed attempts (running to retrying or dead) in the last 5 minutes.\n# TYPE queue_ext_jobs_failed_last_5m gauge',
               (SELECT string_agg(format('queue_ext_jobs_failed_last_5m{queue=%s} %s', queue_ext._metric_label(t.queue_name), t.failed),
                                  E'\n' ORDER BY t.queue_name) FROM throughput AS t)
        UNION ALL
        SELECT 6, E'# HELP queue_ext_jobs_dead_last_5m Jobs moved to the dead letter queue in the last 5 minutes (still there).\n# TYPE queue_ext_jobs_dead_last_5m gauge',
               (SELECT string_agg(format('queue_ext_jobs_dead_last_5m{queue=%s} %s', queue_ext._metric_label(t.queue_name), t.dead),
                                  E'\n' ORDER BY t.queue_name) FROM throughput AS t)
        UNION ALL
        SELECT 7, E'# HELP queue_ext_job_wait_seconds Time from run_at to claim, of jobs finished in the last 5 minutes (a window, not a running total).\n# TYPE queue_ext_job_wait_seconds histogram',
               (SELECT string_agg(h.lines, E'\n' ORDER BY h.label) FROM hist_lines AS h WHERE h.metric = 'queue_ext_job_wait_seconds')
        UNION ALL
        SELECT 8, E'# HELP queue_ext_job_run_seconds Time from claim to completion, of jobs completed in the last 5 minutes (a window, not a running total).\n# TYPE queue_ext_job_run_seconds histogram',
               (SELECT string_agg(h.lines, E'\n' ORDER BY h.label) FROM hist_lines AS h WHERE h.metric = 'queue_ext_job_run_seconds')
        UNION ALL
        SELECT 9, E'# HELP queue_ext_webhook_deliveries_last_5m Webhook delivery attempts in the last 5 minutes, by outcome.\n# TYPE queue_ext_webhook_deliveries_last_5m gauge',
               (SELECT string_agg(format('queue_ext_webhook_deliveries_last_5m{queue=%s,outcome="%s"} %s',
                                         queue_ext._metric_label(q.queue_name), o.outcome,
                                         (SELECT count(*) FROM deliveries AS d WHERE d.queue_name = q.queue_name AND d.outcome = o.outcome)),
                                  E'\n' ORDER BY q.queue_name, o.outcome)
                FROM queues AS q CROSS JOIN outcomes AS o
                WHERE q.queue_name IN (SELECT d.queue_name FROM deliveries AS d))
        UNION ALL
        SELECT 10, E'# HELP queue_ext_webhook_delivery_seconds Duration of webhook delivery attempts in the last 5 minutes (a window).\n# TYPE queue_ext_webhook_delivery_seconds histogram',
               (SELECT string_agg(h.lines, E'\n' ORDER BY h.label) FROM http_lines AS h)
        UNION ALL
        SELECT 11, E'# HELP queue_ext_dispatcher_up 1 when the dispatcher of the database is running.\n# TYPE queue_ext_dispatcher_up gauge',
               (SELECT string_agg(format('queue_ext_dispatcher_up{database=%s} %s', queue_ext._metric_label(d.database), d.running::int),
                                  E'\n' ORDER BY d.database) FROM dispatchers AS d)
        UNION ALL
        SELECT 13, E'# HELP queue_ext_jobs_completed_total Jobs completed since the server started (resets on restart; needs shared_preload_libraries).\n# TYPE queue_ext_jobs_completed_total counter',
               (SELECT string_agg(format('queue_ext_jobs_completed_total{queue=%s} %s', queue_ext._metric_label(t.queue_name), t.completed),
                                  E'\n' ORDER BY t.queue_name) FROM totals AS t)
        UNION ALL
        SELECT 14, E'# HELP queue_ext_jobs_failed_total Failed attempts (to a retry or to the dead letter queue, lost leases included) since the server started.\n# TYPE queue_ext_jobs_failed_total counter',
               (SELECT string_agg(format('queue_ext_jobs_failed_total{queue=%s} %s', queue_ext._metric_label(t.queue_name), t.failed),
                                  E'\n' ORDER BY t.queue_name) FROM totals AS t)
        UNION ALL
        SELECT 15, E'# HELP queue_ext_jobs_dead_total Jobs moved to the dead letter queue since the server started.\n# TYPE queue_ext_jobs_dead_total counter',
               (SELECT string_agg(format('queue_ext_jobs_dead_total{queue=%s} %s', queue_ext._metric_label(t.queue_name), t.dead),
                                  E'\n' ORDER BY t.queue_name) FROM totals AS t)
        UNION ALL
        SELECT 12, E'# HELP queue_ext_dispatcher_deliveries_total Webhook jobs the dispatcher finished since it started, by outcome.\n# TYPE queue_ext_dispatcher_deliveries_total counter',
               (SELECT string_agg(format('queue_ext_dispatcher_deliveries_total{database=%s,outcome="%s"} %s',
                                         queue_ext._metric_label(d.database), o.outcome, o.n),
                                  E'\n' ORDER BY d.database, o.outcome)
                FROM dispatchers AS d,
                     LATERAL (VALUES ('delivered', d.delivered), ('retried', d.retried), ('failed', d.failed)) AS o(outcome, n))
    )
    SELECT string_agg(f.header || coalesce(E'\n' || f.body, ''), E'\n' ORDER BY f.ord) || E'\n'
    FROM families AS f
$$;
COMMENT ON FUNCTION queue_ext.metrics() IS 'Prometheus text format: job counts, age, last-5-minute throughput and histograms, webhook deliveries, dispatchers.';
