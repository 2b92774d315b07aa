//! queue_ext: a durable job queue, and the dispatcher that drains it, inside PostgreSQL.
//!
//! The job lifecycle is SQL (see `sql/`): PL/pgSQL runs next to the data, caches its plans and
//! holds no state of its own. Rust supplies what SQL cannot: time-ordered ids, settings, and
//! the background worker that delivers webhook jobs.

use pgrx::prelude::*;

mod claim_window;
mod counters;
mod db;
mod ddl;
mod delivery;
mod dispatcher;
mod gucs;
mod http;
mod ids;
mod lanes;
mod launcher;
mod status;
mod waiting;
mod wakeup;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../sql/internal.sql",
    name = "internal",
    requires = ["schema"]
);
extension_sql_file!(
    "../sql/queues.sql",
    name = "queues",
    requires = ["internal"]
);
extension_sql_file!(
    "../sql/jobs.sql",
    name = "jobs",
    requires = [
        "queues",
        ids::uuid_generate_v7,
        ids::_lease_token,
        claim_window::_claim_window,
        claim_window::_claim_window_ids,
        claim_window::_claim_window_set
    ]
);
extension_sql_file!(
    "../sql/dependencies.sql",
    name = "dependencies",
    requires = ["jobs"]
);
extension_sql_file!(
    "../sql/limits.sql",
    name = "limits",
    requires = ["dependencies", wakeup::_wake_dispatcher_at_commit]
);
extension_sql_file!(
    "../sql/control.sql",
    name = "control",
    requires = ["limits"]
);
extension_sql_file!("../sql/admin.sql", name = "admin", requires = ["control"]);
extension_sql_file!(
    "../sql/webhooks.sql",
    name = "webhooks",
    requires = ["admin"]
);
extension_sql_file!(
    "../sql/events.sql",
    name = "events",
    requires = ["webhooks"]
);
extension_sql_file!(
    "../sql/monitoring.sql",
    name = "monitoring",
    requires = ["events", status::dispatcher_states]
);
extension_sql_file!(
    "../sql/metrics.sql",
    name = "metrics",
    requires = ["monitoring", counters::_job_counters]
);
extension_sql_file!(
    "../sql/integrations.sql",
    name = "integrations",
    requires = ["monitoring"]
);
extension_sql_file!(
    "../sql/grants.sql",
    name = "grants",
    requires = [wakeup::_wake_launcher_at_commit],
    finalize
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    wakeup::init_callbacks();
    counters::init_callbacks();
    // SAFETY: reading a flag the postmaster sets while it loads shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        wakeup::init_shmem();
        counters::init_shmem();
        ddl::init();
        launcher::register();
    }
}

/// In-database tests: each runs inside a transaction that is rolled back. One file per concern.
#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("tests/helpers.rs");
    include!("tests/queues.rs");
    include!("tests/lifecycle.rs");
    include!("tests/failures.rs");
    include!("tests/errors.rs");
    include!("tests/security.rs");
    include!("tests/features.rs");
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
