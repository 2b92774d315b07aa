// Misuse gets a clear SQLSTATE and message, and changes nothing.

#[pg_test]
fn enqueue_rejects_bad_input_and_stores_nothing() {
    run("SELECT queue_ext.create_queue('q')");
    assert_error("SELECT queue_ext.enqueue_job('nope', '{}')", "42704", "queue \"nope\" does not exist");
    assert_error("SELECT queue_ext.enqueue_job('q', '{}', priority => 'urgent')", "22023", "invalid priority \"urgent\"");
    assert_error("SELECT queue_ext.enqueue_job('q', '{}', delay => '-5 seconds')", "22023", "delay must be between 0 and 100 years");
    assert_error(
        "SELECT queue_ext.enqueue_job('q', '{}', delay => '1 s', run_at => now())",
        "22023",
        "not both",
    );
    assert_error("SELECT queue_ext.enqueue_job('q', '[1,2]')", "22023", "must be a JSON object, not array");
    assert_error("SELECT queue_ext.enqueue_job('q', '\"s\"')", "22023", "not string");
    assert_error("SELECT queue_ext.enqueue_job('q', NULL)", "22004", "payload must not be null");
    assert_error("SELECT queue_ext.enqueue_job('q', '{}', max_attempts => 0)", "22023", "max_attempts");
    run("SET LOCAL queue_ext.max_payload_bytes = 64");
    assert_error(
        "SELECT queue_ext.enqueue_job('q', jsonb_build_object('blob', repeat('x', 200)))",
        "54000",
        "over the limit of 64 bytes",
    );
    assert_error(
        r#"SELECT queue_ext.enqueue_jobs('q', ARRAY['{}', '{}', '[3]']::jsonb[])"#,
        "22023",
        "payload 3 must be a JSON object",
    );
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.job_queue"), 0);
}

#[pg_test]
fn claim_rejects_bad_input() {
    run("SELECT queue_ext.create_queue('q')");
    assert_error("SELECT * FROM queue_ext.get_next_job('nope')", "42704", "does not exist");
    assert_error("SELECT * FROM queue_ext.get_next_jobs('q', 0)", "22023", "n must be at least 1");
    assert_error("SELECT * FROM queue_ext.get_next_job('q', lease => '0 s')", "22023", "lease must be between 1 second and 7 days");
}

#[pg_test]
fn complete_and_fail_refuse_jobs_that_are_not_running() {
    run("SELECT queue_ext.create_queue('q')");
    let id = enqueue("q", "{}");
    assert_error(&format!("SELECT queue_ext.complete_job('{id}')"), "55000", "it is queued, not running");
    assert_error(&format!("SELECT queue_ext.fail_job('{id}', 'x')"), "55000", "not running");
    assert_error(
        "SELECT queue_ext.complete_job('00000000-0000-0000-0000-000000000000')",
        "42704",
        "does not exist",
    );
    assert_error("SELECT queue_ext.complete_job(NULL)", "22004", "must not be null");
    // A wrong token on a running job is refused and the job is untouched.
    claim("q");
    assert_error(
        &format!("SELECT queue_ext.complete_job('{id}', lease_token => gen_random_uuid())"),
        "55000",
        "is stale",
    );
    assert_eq!(status_of(&id), "running");
}
