//! How the background workers talk to their database: every statement runs inside a
//! subtransaction whose ERROR comes back as a value, so a worker records what went wrong on
//! the job concerned and carries on, instead of exiting and taking every delivery in flight
//! with it. (Like a PL/pgSQL BEGIN ... EXCEPTION block, or pg_net's worker, which treats
//! database errors as data.)

use std::panic::AssertUnwindSafe;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// Why a statement of a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Postgres raised an ERROR.
    #[error("{message} (SQLSTATE {sqlstate})")]
    Sql { sqlstate: String, message: String },
    /// SPI refused the call (a wrong type, no rows where one was expected...).
    #[error("{0}")]
    Spi(#[from] pgrx::spi::Error),
    /// Our own code panicked: a bug, reported and survived like any other error.
    #[error("internal error in queue_ext: {0}")]
    Panic(String),
}

impl DbError {
    fn from_caught(e: CaughtError) -> DbError {
        match e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => DbError::Sql {
                sqlstate: sqlstate_text(r.sql_error_code()),
                message: r.message().to_string(),
            },
            CaughtError::RustPanic { ereport, .. } => DbError::Panic(ereport.message().to_string()),
        }
    }

    /// Whether the error says the database could not take the statement now, rather than
    /// that the values were wrong: SQLSTATE classes 25 (transaction state), 40 (rollback:
    /// serialization, deadlock), 42 (an object missing or changed: a schema mid-update), 53
    /// (resources), 55 (object state: a table turned into a view), 57 (cancelled, shutting
    /// down), 58 (system), 0A (a feature the current definitions lack).
    pub fn is_about_the_database(&self) -> bool {
        match self {
            DbError::Sql { sqlstate, .. } => {
                matches!(
                    &sqlstate[..2.min(sqlstate.len())],
                    "25" | "40" | "42" | "53" | "55" | "57" | "58" | "0A"
                )
            }
            DbError::Spi(_) | DbError::Panic(_) => false,
        }
    }
}

/// The five-character SQLSTATE of an error code (Postgres packs it six bits per character).
pub fn sqlstate_text(code: PgSqlErrorCode) -> String {
    let packed = code as i32;
    (0..5)
        .map(|i| (((packed >> (6 * i)) & 0x3f) as u8 + b'0') as char)
        .collect()
}

/// Runs `f` in a subtransaction of the current transaction. On success the subtransaction
/// is kept; on any error (or `Err`) everything `f` did is rolled back, the error is returned,
/// and the enclosing transaction goes on as if `f` had not run.
pub fn isolated<R>(f: impl FnOnce() -> Result<R, pgrx::spi::Error>) -> Result<R, DbError> {
    // SAFETY: the subtransaction protocol of PL/pgSQL's exception blocks (pl_exec.c): begin,
    // run, then release or roll back, restoring the caller's memory context and resource
    // owner either way. pgrx turns an ERROR inside `f` into a caught value after copying and
    // flushing the error state.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        let result = PgTryBuilder::new(AssertUnwindSafe(move || f().map_err(DbError::from)))
            .catch_others(|e| Err(DbError::from_caught(e)))
            .execute();
        if result.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

/// Runs `f` in a transaction of its own (for a background worker), isolated as above: an
/// error leaves nothing behind and is returned.
pub fn transaction<R>(f: impl FnOnce() -> Result<R, pgrx::spi::Error>) -> Result<R, DbError> {
    let mut f = Some(f);
    BackgroundWorker::transaction(AssertUnwindSafe(|| {
        isolated(|| f.take().expect("called once")())
    }))
}

/// Whether queue_ext is installed in the connected database.
pub fn extension_installed() -> Result<bool, DbError> {
    transaction(|| {
        Ok(Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'queue_ext')",
        )?
        .unwrap_or(false))
    })
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn errors_about_the_database_are_told_from_errors_about_the_values() {
        let sql = |code: &str| DbError::Sql {
            sqlstate: code.into(),
            message: String::new(),
        };
        for code in [
            "42883", "55000", "40001", "40P01", "57014", "0A000", "25P02",
        ] {
            assert!(sql(code).is_about_the_database(), "{code}");
        }
        for code in ["P0001", "23505", "22P02", "22001", "XX000"] {
            assert!(!sql(code).is_about_the_database(), "{code}");
        }
        assert!(!DbError::Panic("x".into()).is_about_the_database());
    }

    #[test]
    fn sqlstates_unpack() {
        assert_eq!(
            sqlstate_text(PgSqlErrorCode::ERRCODE_UNTRANSLATABLE_CHARACTER),
            "22P05"
        );
        assert_eq!(
            sqlstate_text(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE),
            "42501"
        );
    }
}
