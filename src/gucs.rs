//! Settings, all under the reserved `queue_ext.` prefix. One static per setting, one typed
//! accessor each; `init()` registers them from `_PG_init`.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Largest payload, in bytes of stored jsonb, that enqueue accepts.
static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);

pub fn init() {
    GucRegistry::define_int_guc(
        c"queue_ext.max_payload_bytes",
        c"Largest job payload enqueue accepts, in bytes of stored jsonb.",
        c"Enqueueing a larger payload fails with SQLSTATE 54000 and nothing is stored.",
        &MAX_PAYLOAD_BYTES,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_BYTE,
    );
    // SAFETY: called once from _PG_init, after our GUCs are defined.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"queue_ext".as_ptr()) };
}

#[allow(dead_code)]
pub fn max_payload_bytes() -> i32 {
    MAX_PAYLOAD_BYTES.get()
}
