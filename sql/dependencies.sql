-- Job dependencies: a job enqueued with depends_on waits ('waiting') until every dependency
-- has completed, then becomes 'queued' in the same transaction as the last completion. A
-- dependency that ends dead or cancelled cancels its dependents, transitively.
--
-- Race-freedom rests on two locks. Enqueue takes FOR KEY SHARE on the live dependencies
-- before recording its edges, so a dependency cannot be completed (deleted from job_queue)
-- unseen in between. Releasing takes FOR UPDATE on the dependent before counting its
-- remaining edges, so two dependencies completing at once cannot both see the other's edge.

-- Classifies a new job's dependencies and records the edges to the live ones. Returns the
-- job's initial state: 'queued' (all completed), 'waiting', or 'cancelled' (blocked_by is
-- dead or cancelled). A producer may depend only on jobs it may see (_may_see_job, its
-- own): another role's job id gets the answer an id that does not exist gets, so that
-- depends_on cannot tell a producer whether, or in which state, someone else's job exists.
CREATE FUNCTION queue_ext._dependency_state(new_job uuid, depends_on uuid[],
                                            OUT state queue_ext.job_state, OUT blocked_by uuid)
LANGUAGE plpgsql VOLATILE
-- Plans kept across calls (statements over an array are otherwise planned on every call).
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    missing uuid;
BEGIN
    PERFORM 1 FROM queue_ext.job_queue AS j WHERE j.id = ANY (depends_on) FOR KEY SHARE;
    SELECT d INTO missing FROM unnest(depends_on) AS d
    LEFT JOIN LATERAL (
        SELECT j.enqueued_by AS owner FROM queue_ext.job_queue AS j WHERE j.id = d
        UNION ALL SELECT a.enqueued_by FROM queue_ext.job_archive AS a WHERE a.id = d
        UNION ALL SELECT x.enqueued_by FROM queue_ext.job_dead_letter AS x WHERE x.id = d
        LIMIT 1
    ) AS o ON true
    WHERE d IS NULL OR o.owner IS NULL OR NOT queue_ext._may_see_job(o.owner)
    LIMIT 1;
    IF FOUND THEN
        IF missing IS NOT NULL AND NOT queue_ext._may_see_job(NULL) THEN
            PERFORM queue_ext._raise_hidden_job(missing);
        END IF;
        RAISE EXCEPTION 'dependency % does not exist', coalesce(missing::text, 'NULL')
            USING ERRCODE = '42704', HINT = 'depends_on takes ids returned by enqueue_job.';
    END IF;
    SELECT d INTO blocked_by FROM unnest(depends_on) AS d
    WHERE EXISTS (SELECT 1 FROM queue_ext.job_dead_letter AS x WHERE x.id = d)
       OR EXISTS (SELECT 1 FROM queue_ext.job_archive AS a WHERE a.id = d AND a.status = 'cancelled')
    LIMIT 1;
    IF FOUND THEN
        state := 'cancelled';
        RETURN;
    END IF;
    INSERT INTO queue_ext.job_dependencies (job_id, depends_on)
    SELECT DISTINCT new_job, d FROM unnest(depends_on) AS d
    WHERE EXISTS (SELECT 1 FROM queue_ext.job_queue AS j WHERE j.id = d);
    state := CASE WHEN FOUND THEN 'waiting' ELSE 'queued' END;
END
$$;

-- A job completed: drop its edges and queue every dependent left with none.
CREATE FUNCTION queue_ext._release_dependents(completed uuid) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    dependents uuid[];
    dep uuid;
    slot_key text;
    j queue_ext.job_queue;
BEGIN
    WITH gone AS (
        DELETE FROM queue_ext.job_dependencies AS e WHERE e.depends_on = completed RETURNING e.job_id
    )
    SELECT array_agg(job_id) INTO dependents FROM gone;
    IF dependents IS NULL THEN
        RETURN;
    END IF;
    FOREACH dep IN ARRAY dependents LOOP
        -- A job with a concurrency key needs a slot too: lock the key before the job, the
        -- order every slot change takes (limits.sql), then let the key admit it in turn.
        SELECT t.concurrency_key INTO slot_key FROM queue_ext.job_queue AS t WHERE t.id = dep;
        IF slot_key IS NOT NULL THEN
            PERFORM queue_ext._lock_key(slot_key);
        END IF;
        PERFORM 1 FROM queue_ext.job_queue AS t WHERE t.id = dep FOR UPDATE;
        CONTINUE WHEN EXISTS (SELECT 1 FROM queue_ext.job_dependencies AS e WHERE e.job_id = dep);
        IF slot_key IS NOT NULL THEN
            PERFORM queue_ext._admit_waiting(slot_key);
            CONTINUE;
        END IF;
        UPDATE queue_ext.job_queue AS t SET status = 'queued', run_at = greatest(t.run_at, now())
        WHERE t.id = dep AND t.status = 'waiting'
        RETURNING * INTO j;
        CONTINUE WHEN NOT FOUND;
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, enqueued_by)
        VALUES (j.id, j.queue_name, 'waiting', 'queued', j.attempt, j.enqueued_by);
        PERFORM queue_ext._announce(j.queue_name);
    END LOOP;
END
$$;

-- A job ended dead or cancelled: cancel everything waiting on it, and on those, and so on.
CREATE FUNCTION queue_ext._cancel_dependents(failed uuid, reason text) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    dependents uuid[];
    dep uuid;
    j queue_ext.job_queue;
BEGIN
    WITH gone AS (
        DELETE FROM queue_ext.job_dependencies AS e WHERE e.depends_on = failed RETURNING e.job_id
    )
    SELECT array_agg(job_id) INTO dependents FROM gone;
    IF dependents IS NULL THEN
        RETURN;
    END IF;
    FOREACH dep IN ARRAY dependents LOOP
        DELETE FROM queue_ext.job_queue AS t WHERE t.id = dep AND t.status = 'waiting' RETURNING * INTO j;
        CONTINUE WHEN NOT FOUND;
        DELETE FROM queue_ext.job_dependencies AS e WHERE e.job_id = dep;
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            last_error, errors, enqueued_by, created_at, run_at, rate_limit_key, concurrency_key)
        VALUES (j.id, j.queue_name, j.payload, j.priority, 'cancelled', j.attempt, j.max_attempts,
            reason, j.errors, j.enqueued_by, j.created_at, j.run_at, j.rate_limit_key, j.concurrency_key);
        INSERT INTO queue_ext.job_status_log (job_id, queue_name, from_status, to_status, attempt, error, enqueued_by)
        VALUES (j.id, j.queue_name, 'waiting', 'cancelled', j.attempt, reason, j.enqueued_by);
        PERFORM queue_ext._cancel_dependents(j.id, format('dependency %s was cancelled', j.id));
    END LOOP;
END
$$;
