// Queue management.

#[pg_test]
fn create_and_list_queues() {
    run("SELECT queue_ext.create_queue('emails', max_attempts => 3, lease_duration => '30 seconds')");
    run("SELECT queue_ext.create_queue('audio')");
    assert_eq!(
        one::<i64>("SELECT count(*) FROM queue_ext.list_queues() WHERE queue_name NOT LIKE 'queue\\_ext.%'"),
        2
    );
    assert!(
        one::<bool>("SELECT is_webhook FROM queue_ext.list_queues() WHERE queue_name = 'queue_ext.callbacks'"),
        "the internal callbacks queue is listed too"
    );
    assert_eq!(
        one::<i32>("SELECT max_attempts FROM queue_ext.list_queues() WHERE queue_name = 'emails'"),
        3
    );
    assert_eq!(
        one::<String>("SELECT lease_duration::text FROM queue_ext.list_queues() WHERE queue_name = 'emails'"),
        "00:00:30"
    );
}

#[pg_test]
fn create_queue_rejects_duplicates_and_bad_names() {
    run("SELECT queue_ext.create_queue('emails')");
    assert_error("SELECT queue_ext.create_queue('emails')", "42710", "already exists");
    run("SELECT queue_ext.create_queue('emails', if_not_exists => true)");
    assert_error("SELECT queue_ext.create_queue('Bad Name!')", "22023", "invalid queue name");
    assert_error("SELECT queue_ext.create_queue('')", "22023", "invalid queue name");
    assert_error("SELECT queue_ext.create_queue(NULL)", "22004", "must not be null");
    assert_error("SELECT queue_ext.create_queue('q', max_attempts => 0)", "22023", "max_attempts");
    assert_error("SELECT queue_ext.create_queue('q', lease_duration => '-1 s')", "22023", "lease_duration");
    assert_error("SELECT queue_ext.create_queue('q', backoff_base => '-1 s')", "22023", "backoff");
}

#[pg_test]
fn alter_queue_changes_only_what_is_given() {
    run("SELECT queue_ext.create_queue('q', max_attempts => 3, backoff_cap => '10 minutes')");
    run("SELECT queue_ext.alter_queue('q', max_attempts => 7)");
    assert_eq!(one::<i32>("SELECT max_attempts FROM queue_ext.queues WHERE queue_name = 'q'"), 7);
    assert_eq!(
        one::<String>("SELECT backoff_cap::text FROM queue_ext.queues WHERE queue_name = 'q'"),
        "00:10:00"
    );
    assert_error("SELECT queue_ext.alter_queue('nope', max_attempts => 2)", "42704", "does not exist");
    assert_error("SELECT queue_ext.alter_queue('q', max_attempts => -1)", "22023", "max_attempts");
}

#[pg_test]
fn paused_queue_hands_out_nothing_until_resumed() {
    run("SELECT queue_ext.create_queue('q')");
    enqueue("q", r#"{"n":1}"#);
    run("SELECT queue_ext.pause_queue('q')");
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.get_next_job('q')"), 0);
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.get_next_jobs(NULL::text[], 10)"), 0);
    run("SELECT queue_ext.resume_queue('q')");
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.get_next_job('q')"), 1);
    assert_error("SELECT queue_ext.pause_queue('nope')", "42704", "queue \"nope\" does not exist");
    assert_error("SELECT queue_ext.resume_queue('nope')", "42704", "does not exist");
}

#[pg_test]
fn drop_queue_refuses_live_jobs_unless_forced() {
    run("SELECT queue_ext.create_queue('q')");
    let id = enqueue("q", "{}");
    assert_error("SELECT queue_ext.drop_queue('q')", "55006", "1 live jobs");
    run("SELECT queue_ext.drop_queue('q', force => true)");
    assert_eq!(status_of(&id), "cancelled");
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.queues WHERE queue_name = 'q'"), 0);
    assert_error("SELECT queue_ext.drop_queue('q')", "42704", "does not exist");
    // An empty queue drops without force.
    run("SELECT queue_ext.create_queue('empty')");
    run("SELECT queue_ext.drop_queue('empty')");
    assert_error("SELECT queue_ext.drop_queue('queue_ext.callbacks')", "42501", "internal to queue_ext");
    assert_error("SELECT queue_ext.create_queue('queue_ext.mine')", "42939", "reserved");
}
