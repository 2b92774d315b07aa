// The happy path: enqueue, claim in the right order, complete, status, history, stats.

#[pg_test]
fn enqueue_returns_a_v7_id_and_queues_the_job() {
    run("SELECT queue_ext.create_queue('q')");
    let id = enqueue("q", r#"{"to":"a@example.com"}"#);
    assert_eq!(&id[14..15], "7", "uuid version nibble of {id}");
    assert_eq!(status_of(&id), "queued");
    assert_eq!(
        one::<String>(&format!("SELECT enqueued_by::text FROM queue_ext.job_queue WHERE id = '{id}'")),
        one::<String>("SELECT current_user::text")
    );
    assert_eq!(
        one::<i32>(&format!("SELECT max_attempts FROM queue_ext.job_queue WHERE id = '{id}'")),
        5,
        "takes the queue's default"
    );
}

#[pg_test]
fn enqueue_jobs_inserts_a_batch_in_order() {
    run("SELECT queue_ext.create_queue('q')");
    let ids = one::<Vec<pgrx::Uuid>>(
        r#"SELECT array_agg(id) FROM queue_ext.enqueue_jobs('q', ARRAY['{"n":1}','{"n":2}','{"n":3}']::jsonb[], priority => 'high') AS id"#,
    );
    assert_eq!(ids.len(), 3);
    let ns = one::<Vec<i32>>(
        "SELECT array_agg((payload->>'n')::int ORDER BY id) FROM queue_ext.job_queue WHERE priority = 'high'",
    );
    assert_eq!(ns, vec![1, 2, 3]);
    // The enqueue is recorded on the job itself, not as a history row.
    assert_eq!(
        one::<i64>("SELECT count(*) FROM queue_ext.job_queue WHERE enqueued_by = current_user AND created_at = now()"),
        3
    );
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.job_status_history"), 0);
}

#[pg_test]
fn claims_follow_priority_then_run_time() {
    run("SELECT queue_ext.create_queue('q')");
    for (n, prio) in [(1, "low"), (2, "normal"), (3, "critical"), (4, "high"), (5, "critical")] {
        run(&format!(
            "SELECT queue_ext.enqueue_job('q', '{{\"n\":{n}}}', priority => '{prio}',
                                          run_at => now() - interval '1 minute' + interval '{n} seconds')"
        ));
    }
    let order: Vec<i32> = (0..5)
        .map(|_| one::<i32>("SELECT (payload->>'n')::int FROM queue_ext.get_next_job('q')"))
        .collect();
    assert_eq!(order, vec![3, 5, 4, 2, 1]);
}

#[pg_test]
fn delayed_jobs_wait_for_their_time() {
    run("SELECT queue_ext.create_queue('q')");
    run(r#"SELECT queue_ext.enqueue_job('q', '{"later":true}', delay => '1 hour')"#);
    run(r#"SELECT queue_ext.enqueue_job('q', '{"later":true}', run_at => now() + interval '1 day')"#);
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.get_next_job('q')"), 0);
    run("UPDATE queue_ext.job_queue SET run_at = now() - interval '1 second'");
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.get_next_jobs('q', 10)"), 2);
}

#[pg_test]
fn claim_takes_a_lease_and_counts_the_attempt() {
    run("SELECT queue_ext.create_queue('q', lease_duration => '2 minutes')");
    let id = enqueue("q", "{}");
    let (attempt, secs) = Spi::get_two::<i32, f64>(
        "SELECT attempt, extract(epoch FROM lease_expires_at - now())::float8 FROM queue_ext.get_next_job('q', 'w1')",
    )
    .unwrap();
    assert_eq!(attempt, Some(1));
    assert_eq!(secs, Some(120.0));
    assert_eq!(status_of(&id), "running");
    assert_eq!(
        one::<String>(&format!("SELECT worker_id FROM queue_ext.job_queue WHERE id = '{id}'")),
        "w1"
    );
    // A per-claim lease overrides the queue's.
    enqueue("q", "{}");
    assert_eq!(
        one::<f64>("SELECT extract(epoch FROM lease_expires_at - now())::float8 FROM queue_ext.get_next_job('q', lease => '5 seconds')"),
        5.0
    );
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.get_next_job('q')"), 0, "nothing left");
}

#[pg_test]
fn get_next_jobs_claims_a_batch() {
    run("SELECT queue_ext.create_queue('q')");
    run("SELECT queue_ext.enqueue_jobs('q', array_fill('{}'::jsonb, ARRAY[25]))");
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.get_next_jobs('q', 10)"), 10);
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.get_next_jobs('q', 100)"), 15);
    assert_eq!(one::<i64>("SELECT count(DISTINCT lease_token) FROM queue_ext.job_queue"), 25);
}

#[pg_test]
fn claims_from_several_queues_or_all() {
    run("SELECT queue_ext.create_queue('a')");
    run("SELECT queue_ext.create_queue('b')");
    run("SELECT queue_ext.create_queue('c')");
    enqueue("a", r#"{"q":"a"}"#);
    run(r#"SELECT queue_ext.enqueue_job('b', '{"q":"b"}', priority => 'critical')"#);
    enqueue("c", r#"{"q":"c"}"#);
    assert_eq!(
        one::<String>("SELECT queue_name FROM queue_ext.get_next_job(ARRAY['a','b'], 'w')"),
        "b",
        "the critical job wins across queues"
    );
    assert_eq!(one::<String>("SELECT queue_name FROM queue_ext.get_next_job(ARRAY['a','b'])"), "a");
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.get_next_job(ARRAY['a','b'])"), 0);
    assert_eq!(one::<String>("SELECT queue_name FROM queue_ext.get_next_jobs(NULL::text[], 5)"), "c");
    assert_error("SELECT * FROM queue_ext.get_next_job(ARRAY['a','nope'])", "42704", "queue \"nope\" does not exist");
}

#[pg_test]
fn complete_job_archives_the_result() {
    run("SELECT queue_ext.create_queue('q')");
    let id = enqueue("q", r#"{"x":1}"#);
    let (_, token) = claim("q");
    run(&format!(r#"SELECT queue_ext.complete_job('{id}', '{{"ok":true}}', lease_token => '{token}')"#));
    assert_eq!(status_of(&id), "completed");
    assert_eq!(
        one::<pgrx::JsonB>(&format!("SELECT result FROM queue_ext.job_status('{id}')")).0,
        serde_json::json!({"ok": true})
    );
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.job_queue"), 0, "left the hot table");
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.job_archive"), 1);
    assert_error(&format!("SELECT queue_ext.complete_job('{id}')"), "55000", "already completed");
}

#[pg_test]
fn complete_without_token_acts_on_the_current_attempt() {
    run("SELECT queue_ext.create_queue('q')");
    let id = enqueue("q", "{}");
    claim("q");
    run(&format!("SELECT queue_ext.complete_job('{id}')"));
    assert_eq!(status_of(&id), "completed");
}

#[pg_test]
fn history_records_every_transition() {
    run("SELECT queue_ext.create_queue('q', backoff_base => '0 seconds')");
    let id = enqueue("q", "{}");
    let (_, token) = claim("q");
    run(&format!("SELECT queue_ext.fail_job('{id}', 'boom', lease_token => '{token}')"));
    claim("q");
    run(&format!("SELECT queue_ext.complete_job('{id}')"));
    let trail = one::<String>(&format!(
        "SELECT string_agg(coalesce(from_status::text, '-') || '>' || to_status, ' ' ORDER BY id)
         FROM queue_ext.job_status_history WHERE job_id = '{id}'"
    ));
    assert_eq!(trail, "queued>running running>retrying retrying>running running>completed");
    assert_eq!(
        one::<String>(&format!(
            "SELECT error FROM queue_ext.job_status_history WHERE job_id = '{id}' AND to_status = 'retrying'"
        )),
        "boom"
    );
}

#[pg_test]
fn job_status_reports_timings_and_errors() {
    run("SELECT queue_ext.create_queue('q')");
    let id = enqueue("q", "{}");
    assert!(one::<bool>(&format!(
        "SELECT started_at IS NULL AND finished_at IS NULL AND enqueued_at IS NOT NULL FROM queue_ext.job_status('{id}')"
    )));
    claim("q");
    run(&format!("SELECT queue_ext.complete_job('{id}', '{{\"n\":2}}')"));
    assert!(one::<bool>(&format!(
        "SELECT started_at IS NOT NULL AND finished_at IS NOT NULL AND attempt = 1 FROM queue_ext.job_status('{id}')"
    )));
    assert_error(
        "SELECT * FROM queue_ext.job_status('00000000-0000-0000-0000-000000000000')",
        "42704",
        "does not exist",
    );
}

#[pg_test]
fn queue_stats_counts_by_state() {
    run("SELECT queue_ext.create_queue('q', max_attempts => 1)");
    run("SELECT queue_ext.create_queue('idle')");
    for _ in 0..4 {
        enqueue("q", "{}");
    }
    let (a, _) = claim("q");
    run(&format!("SELECT queue_ext.complete_job('{a}')"));
    let (b, _) = claim("q");
    run(&format!("SELECT queue_ext.fail_job('{b}', 'x')"));
    claim("q");
    let row = one::<String>(
        "SELECT format('%s/%s/%s/%s/%s', queued, running, dead, completed_last_hour, oldest_queued_age IS NOT NULL)
         FROM queue_ext.queue_stats() WHERE queue_name = 'q'",
    );
    assert_eq!(row, "1/1/1/1/t");
    assert_eq!(
        one::<i64>("SELECT queued + running + dead FROM queue_ext.queue_stats() WHERE queue_name = 'idle'"),
        0
    );
}

#[pg_test]
fn complete_and_get_next_does_both_in_one_call() {
    run("SELECT queue_ext.create_queue('q')");
    let first = enqueue("q", r#"{"n":1}"#);
    let second = enqueue("q", r#"{"n":2}"#);
    let (_, token) = claim("q");
    let (next, next_token) = Spi::get_two::<String, String>(&format!(
        "SELECT job_id::text, lease_token::text FROM queue_ext.complete_and_get_next('{first}', 'q', '{{\"ok\":1}}', '{token}', 'w')"
    ))
    .unwrap();
    assert_eq!(status_of(&first), "completed");
    assert_eq!(next.as_deref(), Some(second.as_str()));
    assert_eq!(status_of(&second), "running");
    assert_eq!(
        one::<i64>(&format!(
            "SELECT count(*) FROM queue_ext.complete_and_get_next('{second}', 'q', lease_token => '{}')",
            next_token.unwrap()
        )),
        0,
        "nothing left to claim"
    );
    assert_error(&format!("SELECT * FROM queue_ext.complete_and_get_next('{second}', 'q')"), "55000", "already completed");
}
