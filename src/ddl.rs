//! Commands that need a database to themselves: DROP DATABASE, ALTER DATABASE ... RENAME, and
//! CREATE DATABASE ... TEMPLATE. Postgres refuses them (after five seconds) while any other
//! session is connected to that database, and a dispatcher always is. So before such a
//! command runs, the dispatcher of that database is asked to leave at once, and the launcher
//! holds off restarting it for a while; if the database is still there afterwards (the
//! command failed, or only renamed or copied it), it is served again when the hold ends.

use std::ffi::{c_char, CStr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::prelude::*;

use crate::wakeup;

/// How long the launcher leaves a released database alone.
const HOLD: Duration = Duration::from_secs(10);
/// How long the command waits for the dispatcher to leave (Postgres itself waits 5 s).
const WAIT_FOR_EXIT: Duration = Duration::from_secs(4);

static mut PREVIOUS_HOOK: pg_sys::ProcessUtility_hook_type = None;

/// Installs the hook. Called from `_PG_init` while preloading: every backend inherits it.
pub fn init() {
    // SAFETY: hooks are installed once, in the postmaster, before any backend exists; the
    // previous hook is chained so other extensions keep theirs.
    unsafe {
        PREVIOUS_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: pstmt is the statement Postgres is about to run; we only read it.
    if let Some(name) = unsafe { database_needed_alone(pstmt) } {
        release(&name);
    }
    // SAFETY: passing the arguments on unchanged, to the previous hook or the standard path.
    unsafe {
        match PREVIOUS_HOOK {
            Some(previous) => previous(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    }
}

/// The database a statement needs without other sessions, if it is one of those commands.
unsafe fn database_needed_alone(pstmt: *mut pg_sys::PlannedStmt) -> Option<String> {
    let text = |p: *const c_char| {
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    // SAFETY (whole body): node pointers from the parser, read according to their tag.
    unsafe {
        let node = (*pstmt).utilityStmt;
        if node.is_null() {
            return None;
        }
        match (*node).type_ {
            pg_sys::NodeTag::T_DropdbStmt => text((*(node as *mut pg_sys::DropdbStmt)).dbname),
            pg_sys::NodeTag::T_RenameStmt => {
                let stmt = node as *mut pg_sys::RenameStmt;
                ((*stmt).renameType == pg_sys::ObjectType::OBJECT_DATABASE)
                    .then(|| text((*stmt).subname))
                    .flatten()
            }
            pg_sys::NodeTag::T_CreatedbStmt => {
                let options = (*(node as *mut pg_sys::CreatedbStmt)).options;
                if options.is_null() {
                    return None;
                }
                (0..(*options).length as usize).find_map(|i| {
                    let def = (*(*options).elements.add(i)).ptr_value as *mut pg_sys::DefElem;
                    let arg = (*def).arg;
                    (text((*def).defname).as_deref() == Some("template")
                        && !arg.is_null()
                        && (*arg).type_ == pg_sys::NodeTag::T_String)
                        .then(|| text((*(arg as *mut pg_sys::String)).sval))
                        .flatten()
                })
            }
            _ => None,
        }
    }
}

/// Asks the dispatcher of database `name` to leave now, and waits (briefly) until it has.
fn release(name: &str) {
    let Some(slots) = wakeup::slots() else { return };
    let Ok(cname) = std::ffi::CString::new(name) else {
        return;
    };
    // SAFETY: a catalog lookup by name; missing_ok, so an unknown name gives InvalidOid.
    let oid = unsafe { pg_sys::get_database_oid(cname.as_ptr(), true) }.to_u32();
    if oid == 0 {
        return;
    }
    let Some(slot) = slots
        .iter()
        .find(|s| s.db_oid.load(Ordering::Relaxed) == oid)
    else {
        return;
    };
    slot.hold_until_ms.store(
        wakeup::now_ms() + HOLD.as_millis() as i64,
        Ordering::Release,
    );
    let pid = slot.pid.load(Ordering::Acquire);
    if pid == 0 {
        return;
    }
    slot.leave_now.store(true, Ordering::Release);
    // SAFETY: a plain signal to our own dispatcher process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + WAIT_FOR_EXIT;
    while slot.pid.load(Ordering::Acquire) == pid && Instant::now() < deadline {
        // SAFETY: sleeping 10 ms in this backend, then honouring a cancel request.
        unsafe { pg_sys::pg_usleep(10_000) };
        pg_sys::check_for_interrupts!();
    }
}
