// Shared by the in-database tests (included into `mod tests`).
use pgrx::prelude::*;

/// Runs a query expected to return one non-null value.
fn one<T: FromDatum + IntoDatum>(sql: &str) -> T {
    Spi::get_one::<T>(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap_or_else(|| panic!("{sql}: returned NULL"))
}

fn run(sql: &str) {
    Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Runs a statement in a subtransaction and returns "SQLSTATE message" of the error it
/// raised, or "no error". The surrounding test transaction carries on either way.
fn error_of(sql: &str) -> String {
    if !one::<bool>("SELECT to_regprocedure('pg_temp.error_of(text)') IS NOT NULL") {
        run("CREATE FUNCTION pg_temp.error_of(stmt text) RETURNS text LANGUAGE plpgsql AS $f$
             BEGIN EXECUTE stmt; RETURN 'no error';
             EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ' ' || SQLERRM; END $f$");
    }
    one::<String>(&format!("SELECT pg_temp.error_of($stmt${sql}$stmt$)"))
}

/// Asserts that `sql` fails with `sqlstate` and a message containing `needle`.
fn assert_error(sql: &str, sqlstate: &str, needle: &str) {
    let got = error_of(sql);
    assert!(
        got.starts_with(sqlstate) && got.contains(needle),
        "{sql}\n  expected {sqlstate} containing {needle:?}\n  got {got}"
    );
}

/// Enqueues one job to `queue` and returns its id as text.
fn enqueue(queue: &str, payload: &str) -> String {
    one::<String>(&format!(
        "SELECT queue_ext.enqueue_job('{queue}', '{payload}')::text"
    ))
}

/// Claims one job; returns (job_id, lease_token) as text.
fn claim(queue: &str) -> (String, String) {
    let (id, token) = Spi::get_two::<String, String>(&format!(
        "SELECT job_id::text, lease_token::text FROM queue_ext.get_next_job('{queue}', 'test-worker')"
    ))
    .expect("claim failed");
    (id.expect("no job to claim"), token.expect("no lease token"))
}

fn status_of(id: &str) -> String {
    one::<String>(&format!("SELECT status::text FROM queue_ext.job_status('{id}')"))
}
