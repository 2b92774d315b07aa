// Dependencies, dedupe, progress and heartbeat, cancellation, triggers, schedules, health.

#[pg_test]
fn dependencies_hold_a_job_until_all_complete() {
    run("SELECT queue_ext.create_queue('q')");
    let a = enqueue("q", r#"{"a":1}"#);
    let b = enqueue("q", r#"{"b":1}"#);
    let c = one::<String>(&format!(
        "SELECT queue_ext.enqueue_job('q', '{{}}', depends_on => ARRAY['{a}', '{b}']::uuid[])::text"
    ));
    assert_eq!(status_of(&c), "waiting");
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.get_next_jobs('q', 10)"), 2, "only a and b run");
    run(&format!("SELECT queue_ext.complete_job('{a}')"));
    assert_eq!(status_of(&c), "waiting");
    run(&format!("SELECT queue_ext.complete_job('{b}')"));
    assert_eq!(status_of(&c), "queued", "runnable as soon as the last dependency completes");
    // A dependency that already completed is satisfied at once.
    let d = one::<String>(&format!(
        "SELECT queue_ext.enqueue_job('q', '{{}}', depends_on => ARRAY['{a}']::uuid[])::text"
    ));
    assert_eq!(status_of(&d), "queued");
    assert_error(
        "SELECT queue_ext.enqueue_job('q', '{}', depends_on => ARRAY['00000000-0000-0000-0000-000000000000']::uuid[])",
        "42704",
        "dependency 00000000-0000-0000-0000-000000000000 does not exist",
    );
}

#[pg_test]
fn dedupe_key_returns_the_unfinished_job() {
    run("SELECT queue_ext.create_queue('q')");
    let first = one::<String>("SELECT queue_ext.enqueue_job('q', '{\"n\":1}', dedupe_key => 'k')::text");
    let second = one::<String>("SELECT queue_ext.enqueue_job('q', '{\"n\":2}', dedupe_key => 'k')::text");
    assert_eq!(first, second);
    let other = one::<String>("SELECT queue_ext.enqueue_job('q', '{\"n\":3}', dedupe_key => 'other')::text");
    assert_ne!(first, other);
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.job_queue"), 2);
}

#[pg_test]
fn progress_and_heartbeat_extend_the_lease_and_are_fenced() {
    run("SELECT queue_ext.create_queue('q', lease_duration => '1 minute')");
    let id = enqueue("q", "{}");
    let (_, token) = claim("q");
    run("UPDATE queue_ext.job_queue SET lease_expires_at = now() + interval '5 seconds'");
    assert!(one::<bool>(&format!(
        "SELECT queue_ext.update_progress('{id}', 42.5, '{{\"step\":\"upload\"}}', lease_token => '{token}')"
    )));
    let (progress, secs) = Spi::get_two::<f32, f64>(&format!(
        "SELECT progress, extract(epoch FROM lease_expires_at - now())::float8 FROM queue_ext.job_queue WHERE id = '{id}'"
    ))
    .unwrap();
    assert_eq!(progress, Some(42.5));
    assert_eq!(secs, Some(60.0), "progress extends the lease by the queue's lease_duration");
    assert!(one::<bool>(&format!(
        "SELECT queue_ext.heartbeat('{id}', '{token}', extend => '10 minutes')"
    )));
    assert_eq!(
        one::<f64>(&format!("SELECT extract(epoch FROM lease_expires_at - now())::float8 FROM queue_ext.job_queue WHERE id = '{id}'")),
        600.0
    );
    assert_eq!(one::<f32>(&format!("SELECT progress FROM queue_ext.job_status('{id}')")), 42.5);
    assert_error(&format!("SELECT queue_ext.heartbeat('{id}', gen_random_uuid())"), "55000", "is stale");
    assert_error(&format!("SELECT queue_ext.update_progress('{id}', 101)"), "22023", "percent must be between 0 and 100");
    assert_error(&format!("SELECT queue_ext.heartbeat('{id}', extend => '-1 s')"), "22023", "extend must be between 1 second and 7 days");
    run(&format!("SELECT queue_ext.complete_job('{id}')"));
    assert_error(&format!("SELECT queue_ext.heartbeat('{id}')"), "55000", "already completed");
    assert_eq!(one::<f32>(&format!("SELECT progress FROM queue_ext.job_status('{id}')")), 100.0);
}

#[pg_test]
fn cancelling_queued_and_running_jobs() {
    run("SELECT queue_ext.create_queue('q')");
    let queued = enqueue("q", "{}");
    assert_eq!(one::<String>(&format!("SELECT queue_ext.cancel_job('{queued}', 'not needed')::text")), "cancelled");
    assert_eq!(status_of(&queued), "cancelled");
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.get_next_job('q')"), 0, "a cancelled job never runs");
    let running = enqueue("q", "{}");
    let (_, token) = claim("q");
    assert_eq!(one::<String>(&format!("SELECT queue_ext.cancel_job('{running}')::text")), "running");
    assert!(!one::<bool>(&format!("SELECT queue_ext.heartbeat('{running}', '{token}')")), "the worker learns it");
    assert_eq!(
        one::<String>(&format!("SELECT queue_ext.complete_job('{running}', lease_token => '{token}')::text")),
        "cancelled"
    );
    assert_eq!(status_of(&running), "cancelled");
    assert_error(&format!("SELECT queue_ext.cancel_job('{running}')"), "55000", "already cancelled");
    assert_error("SELECT queue_ext.cancel_job('00000000-0000-0000-0000-000000000000')", "42704", "does not exist");
}

#[pg_test]
fn producers_cancel_only_their_own_jobs() {
    run("SELECT queue_ext.create_queue('q')");
    run("CREATE ROLE qe_p1; GRANT queue_ext_producer TO qe_p1");
    run("CREATE ROLE qe_p2; GRANT queue_ext_producer TO qe_p2");
    run("SET LOCAL ROLE qe_p1");
    let mine = enqueue("q", "{}");
    run("RESET ROLE");
    run("SET LOCAL ROLE qe_p2");
    assert_error(&format!("SELECT queue_ext.cancel_job('{mine}')"), "42501", "does not exist or belongs to another role");
    run("RESET ROLE");
    run("SET LOCAL ROLE qe_p1");
    assert_eq!(one::<String>(&format!("SELECT queue_ext.cancel_job('{mine}')::text")), "cancelled");
    run("RESET ROLE");
}

#[pg_test]
fn enqueue_trigger_turns_row_changes_into_jobs() {
    run("SELECT queue_ext.create_queue('uploads')");
    run("CREATE TABLE public.files (id int PRIMARY KEY, name text)");
    run("CREATE TRIGGER files_to_queue AFTER INSERT OR UPDATE OR DELETE ON public.files
         FOR EACH ROW EXECUTE FUNCTION queue_ext.enqueue_trigger('uploads')");
    run("INSERT INTO public.files VALUES (1, 'a.png')");
    run("UPDATE public.files SET name = 'b.png'");
    run("DELETE FROM public.files");
    let kinds = one::<String>("SELECT string_agg(payload->>'type', ',' ORDER BY id) FROM queue_ext.job_queue");
    assert_eq!(kinds, "INSERT,UPDATE,DELETE");
    let update = one::<pgrx::JsonB>("SELECT payload FROM queue_ext.job_queue WHERE payload->>'type' = 'UPDATE'").0;
    assert_eq!(update["table"], "files");
    assert_eq!(update["schema"], "public");
    assert_eq!(update["record"]["name"], "b.png");
    assert_eq!(update["old_record"]["name"], "a.png");
    run("CREATE TABLE public.bad (id int)");
    run("CREATE TRIGGER bad_t AFTER INSERT ON public.bad FOR EACH ROW EXECUTE FUNCTION queue_ext.enqueue_trigger()");
    assert_error("INSERT INTO public.bad VALUES (1)", "22023", "needs the queue name");
}

#[pg_test]
fn schedules_need_pg_cron_and_say_so() {
    run("SELECT queue_ext.create_queue('q')");
    assert_error(
        "SELECT queue_ext.schedule_job('nightly', '0 3 * * *', 'q', '{}')",
        "55000",
        "need the pg_cron extension",
    );
    assert_error("SELECT queue_ext.unschedule_job('nightly')", "55000", "pg_cron");
}

#[pg_test]
fn stats_health_and_worker_health() {
    run("SELECT queue_ext.create_queue('q', max_attempts => 1)");
    let a = enqueue("q", "{}");
    enqueue("q", "{}");
    claim("q");
    run(&format!("SELECT queue_ext.fail_job('{a}', 'boom')"));
    let health = one::<pgrx::JsonB>("SELECT queue_ext.health()").0;
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["reasons"].to_string().contains("dead letter queue grew by 1"), "{health}");
    assert_eq!(health["checks"]["dead_letter"], 1);
    let stats = one::<String>(
        "SELECT format('%s/%s/%s', queued, dead, failed_per_minute) FROM queue_ext.queue_stats() WHERE queue_name = 'q'",
    );
    assert_eq!(stats, "1/1/0.20");
    assert_eq!(one::<i64>("SELECT pending FROM queue_ext.job_processing_status WHERE queue_name = 'q'"), 1);
    let (_, _) = claim("q");
    assert_eq!(
        one::<i64>("SELECT jobs_held FROM queue_ext.worker_health() WHERE worker_id = 'test-worker'"),
        1
    );
}
