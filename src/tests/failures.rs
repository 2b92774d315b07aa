// Failure, retries with backoff, lease expiry, the dead letter queue and retention.

#[pg_test]
fn fail_job_retries_after_jittered_exponential_backoff() {
    run("SELECT queue_ext.create_queue('q', max_attempts => 5, backoff_base => '10 seconds', backoff_cap => '25 seconds')");
    let id = enqueue("q", "{}");
    // Each attempt's delay is in the upper half of min(base * 2^(attempt-1), cap).
    for (attempt, full) in [(1, 10.0), (2, 20.0), (3, 25.0)] {
        let (_, token) = claim("q");
        assert_eq!(
            one::<String>(&format!("SELECT queue_ext.fail_job('{id}', 'try {attempt}', lease_token => '{token}')::text")),
            "retrying"
        );
        let wait = one::<f64>(&format!(
            "SELECT extract(epoch FROM run_at - now())::float8 FROM queue_ext.job_queue WHERE id = '{id}'"
        ));
        assert!(wait >= full / 2.0 && wait <= full, "attempt {attempt}: waits {wait}s, want {}..{full}", full / 2.0);
        assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.get_next_job('q')"), 0, "not before its time");
        run(&format!("UPDATE queue_ext.job_queue SET run_at = now() WHERE id = '{id}'"));
    }
    assert_eq!(
        one::<i64>(&format!("SELECT jsonb_array_length(errors) FROM queue_ext.job_status('{id}')")),
        3
    );
    assert_eq!(one::<String>(&format!("SELECT last_error FROM queue_ext.job_status('{id}')")), "try 3");
}

#[pg_test]
fn fail_job_honours_retry_in() {
    run("SELECT queue_ext.create_queue('q')");
    let id = enqueue("q", "{}");
    claim("q");
    run(&format!("SELECT queue_ext.fail_job('{id}', '429', retry_in => '90 seconds')"));
    assert_eq!(
        one::<f64>(&format!("SELECT extract(epoch FROM run_at - now())::float8 FROM queue_ext.job_queue WHERE id = '{id}'")),
        90.0
    );
    assert_error(&format!("SELECT queue_ext.fail_job('{id}', 'x', retry_in => '-1 s')"), "22023", "retry_in");
}

#[pg_test]
fn exhausted_attempts_go_to_the_dead_letter_queue() {
    run("SELECT queue_ext.create_queue('q', max_attempts => 2, backoff_base => '0 seconds')");
    let id = enqueue("q", r#"{"keep":"me"}"#);
    claim("q");
    run(&format!("SELECT queue_ext.fail_job('{id}', 'first')"));
    claim("q");
    assert_eq!(one::<String>(&format!("SELECT queue_ext.fail_job('{id}', 'second')::text")), "dead");
    assert_eq!(status_of(&id), "dead");
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.job_queue"), 0);
    let (payload, errors) = Spi::get_two::<pgrx::JsonB, String>(&format!(
        "SELECT payload, (SELECT string_agg(e->>'error', ',') FROM jsonb_array_elements(errors) e)
         FROM queue_ext.job_dead_letter WHERE id = '{id}'"
    ))
    .unwrap();
    assert_eq!(payload.unwrap().0, serde_json::json!({"keep": "me"}));
    assert_eq!(errors.unwrap(), "first,second");
    assert_eq!(
        one::<String>(&format!("SELECT reason FROM queue_ext.job_dead_letter WHERE id = '{id}'")),
        "failed 2 of 2 attempts"
    );
}

#[pg_test]
fn permanent_failure_goes_straight_to_the_dead_letter_queue() {
    run("SELECT queue_ext.create_queue('q', max_attempts => 10)");
    let id = enqueue("q", "{}");
    claim("q");
    run(&format!("SELECT queue_ext.fail_job('{id}', 'HTTP 400', permanent => true)"));
    assert_eq!(
        one::<String>(&format!("SELECT reason FROM queue_ext.job_dead_letter WHERE id = '{id}'")),
        "permanent failure"
    );
}

#[pg_test]
fn retry_dead_job_redrives_with_fresh_attempts() {
    run("SELECT queue_ext.create_queue('q', max_attempts => 1)");
    let id = enqueue("q", "{}");
    claim("q");
    run(&format!("SELECT queue_ext.fail_job('{id}', 'nope')"));
    run(&format!("SELECT queue_ext.retry_dead_job('{id}')"));
    assert_eq!(status_of(&id), "queued");
    assert_eq!(one::<i32>(&format!("SELECT attempt FROM queue_ext.job_status('{id}')")), 0);
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.job_dead_letter"), 0);
    let (again, _) = claim("q");
    assert_eq!(again, id);
    assert_error(&format!("SELECT queue_ext.retry_dead_job('{id}')"), "55000", "not in the dead letter queue");
    assert_error(
        "SELECT queue_ext.retry_dead_job('00000000-0000-0000-0000-000000000000')",
        "42704",
        "does not exist",
    );
}

#[pg_test]
fn expired_leases_return_to_the_queue_counting_the_attempt() {
    run("SELECT queue_ext.create_queue('q', max_attempts => 2)");
    let id = enqueue("q", "{}");
    let (_, token) = claim("q");
    assert_eq!(one::<i32>("SELECT queue_ext.cleanup_stuck_jobs()"), 0, "lease still live");
    run("UPDATE queue_ext.job_queue SET lease_expires_at = now() - interval '1 second'");
    // The holder of the expired lease can no longer complete.
    assert_error(
        &format!("SELECT queue_ext.complete_job('{id}', lease_token => '{token}')"),
        "55000",
        "lease expired",
    );
    assert_eq!(one::<i32>("SELECT queue_ext.cleanup_stuck_jobs()"), 1);
    assert_eq!(status_of(&id), "queued");
    assert_eq!(one::<String>(&format!("SELECT last_error FROM queue_ext.job_status('{id}')")), "lease expired");
    assert_error(
        &format!("SELECT queue_ext.complete_job('{id}', lease_token => '{token}')"),
        "55000",
        "is stale",
    );
    // Second claim, second expiry: that was the last attempt.
    let (_, token2) = claim("q");
    assert_ne!(token, token2, "every claim gets a new lease token");
    assert_error(&format!("SELECT queue_ext.fail_job('{id}', 'late', lease_token => '{token}')"), "55000", "is stale");
    run("UPDATE queue_ext.job_queue SET lease_expires_at = now() - interval '1 second'");
    assert_eq!(one::<i32>("SELECT queue_ext.cleanup_stuck_jobs()"), 1);
    assert_eq!(status_of(&id), "dead");
}

#[pg_test]
fn purge_jobs_and_dead_letters_apply_retention() {
    run("SELECT queue_ext.create_queue('q', max_attempts => 1)");
    for _ in 0..3 {
        let (id, _) = {
            enqueue("q", "{}");
            claim("q")
        };
        run(&format!("SELECT queue_ext.complete_job('{id}')"));
    }
    let dead = enqueue("q", "{}");
    claim("q");
    run(&format!("SELECT queue_ext.fail_job('{dead}', 'x')"));
    run("UPDATE queue_ext.job_archive SET finished_at = now() - interval '10 days' WHERE id IN (SELECT id FROM queue_ext.job_archive LIMIT 2)");
    assert_eq!(one::<i64>("SELECT queue_ext.purge_jobs('7 days')"), 2);
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.job_archive"), 1);
    assert_eq!(
        one::<i64>("SELECT count(*) FROM queue_ext.job_status_history h WHERE NOT EXISTS (SELECT 1 FROM queue_ext.job_archive a WHERE a.id = h.job_id) AND h.job_id <> (SELECT id FROM queue_ext.job_dead_letter)"),
        0,
        "history of purged jobs goes with them"
    );
    assert_eq!(one::<i64>("SELECT queue_ext.purge_dead_letter('1 day')"), 0);
    assert_eq!(one::<i64>("SELECT queue_ext.purge_dead_letter(queue_name => 'q')"), 1);
    assert_error("SELECT queue_ext.purge_jobs(NULL)", "22004", "older_than must not be null");
}

#[pg_test]
fn purge_jobs_with_max_rows_takes_the_oldest_first() {
    run("SELECT queue_ext.create_queue('q')");
    for _ in 0..4 {
        let (id, _) = {
            enqueue("q", "{}");
            claim("q")
        };
        run(&format!("SELECT queue_ext.complete_job('{id}')"));
    }
    // Finished 10, 11 and 12 days ago; the fourth is young.
    run("WITH o AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM queue_ext.job_archive)
         UPDATE queue_ext.job_archive AS a SET finished_at = now() - (9 + o.n) * interval '1 day'
         FROM o WHERE a.id = o.id AND o.n <= 3");
    let oldest = one::<String>("SELECT id::text FROM queue_ext.job_archive ORDER BY finished_at LIMIT 1");
    assert_eq!(one::<i64>("SELECT queue_ext.purge_jobs('7 days', max_rows => 1)"), 1);
    assert_eq!(one::<i64>(&format!("SELECT count(*) FROM queue_ext.job_archive WHERE id = '{oldest}'")), 0);
    assert_eq!(one::<i64>("SELECT queue_ext.purge_jobs('7 days', max_rows => 5)"), 2);
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.job_archive"), 1);
    assert_error("SELECT queue_ext.purge_jobs('7 days', max_rows => 0)", "22023", "max_rows must be at least 1");
}
