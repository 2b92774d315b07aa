// Roles, grants, row level security and pinned search paths.

#[pg_test]
fn every_security_definer_function_pins_search_path() {
    let unpinned = one::<i64>(
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'queue_ext' AND p.prosecdef
           AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)",
    );
    assert_eq!(unpinned, 0);
    assert!(one::<i64>("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'queue_ext' AND p.prosecdef") > 10);
}

#[pg_test]
fn public_can_execute_nothing() {
    let callable = one::<i64>(
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'queue_ext' AND has_function_privilege('public', p.oid, 'EXECUTE')",
    );
    assert_eq!(callable, 0);
}

#[pg_test]
fn each_role_gets_only_what_it_needs() {
    run("SELECT queue_ext.create_queue('q')");
    run("CREATE ROLE qe_test_producer; GRANT queue_ext_producer TO qe_test_producer");
    run("CREATE ROLE qe_test_worker; GRANT queue_ext_worker TO qe_test_worker");
    run("SET LOCAL ROLE qe_test_producer");
    let id = enqueue("q", "{}");
    assert_error("SELECT * FROM queue_ext.get_next_job('q')", "42501", "permission denied");
    assert_error("SELECT queue_ext.create_queue('mine')", "42501", "permission denied");
    assert_error("SELECT queue_ext._queue('q')", "42501", "permission denied");
    assert_error("UPDATE queue_ext.job_queue SET status = 'running'", "42501", "permission denied");
    assert_error("DELETE FROM queue_ext.job_queue", "42501", "permission denied");
    run("RESET ROLE");
    run("SET LOCAL ROLE qe_test_worker");
    assert_error("SELECT queue_ext.create_queue('mine')", "42501", "permission denied");
    assert_error("SELECT queue_ext.enqueue_job('q', '{}')", "42501", "permission denied");
    let (claimed, _) = claim("q");
    assert_eq!(claimed, id);
    run(&format!("SELECT queue_ext.complete_job('{id}')"));
    run("RESET ROLE");
}

#[pg_test]
fn producers_see_only_their_own_jobs() {
    run("SELECT queue_ext.create_queue('q')");
    run("CREATE ROLE qe_alice; GRANT queue_ext_producer TO qe_alice");
    run("CREATE ROLE qe_bob; GRANT queue_ext_producer TO qe_bob");
    run("CREATE ROLE qe_carol; GRANT queue_ext_worker TO qe_carol");
    run("SET LOCAL ROLE qe_alice");
    let alices = enqueue("q", r#"{"who":"alice"}"#);
    run("RESET ROLE");
    run("SET LOCAL ROLE qe_bob");
    enqueue("q", r#"{"who":"bob"}"#);
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.job_queue"), 1);
    assert_eq!(one::<String>("SELECT payload->>'who' FROM queue_ext.job_queue"), "bob");
    assert_error(
        &format!("SELECT * FROM queue_ext.job_status('{alices}')"),
        "42501",
        "does not exist or belongs to another role",
    );
    run("RESET ROLE");
    run("SET LOCAL ROLE qe_carol");
    assert_eq!(one::<i64>("SELECT count(*) FROM queue_ext.job_queue"), 2, "workers see all jobs");
    run("RESET ROLE");
    assert_eq!(
        one::<String>(&format!("SELECT enqueued_by::text FROM queue_ext.job_queue WHERE id = '{alices}'")),
        "qe_alice"
    );
}
