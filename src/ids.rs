//! Job ids: UUID version 7 (RFC 9562). The leading 48 bits are the Unix time in milliseconds,
//! so new ids land at the right edge of the primary-key btree instead of at random pages, and
//! ids sort in creation order. PostgreSQL 15 has no built-in v7 generator.

use pgrx::prelude::*;

#[pg_extern(volatile, parallel_safe)]
pub fn uuid_generate_v7() -> pgrx::Uuid {
    // uuid's now_v7 keeps a counter in the random bits, so ids made in the same millisecond
    // by this backend still increase. Its random bits come from a thread-local generator
    // seeded by the OS (fast-rng), not a getrandom() system call per id.
    pgrx::Uuid::from_bytes(*uuid::Uuid::now_v7().as_bytes())
}

/// Lease tokens: random (version 4) UUIDs from the same thread-local generator (a CSPRNG seeded
/// by the OS in each backend; the postmaster never draws from it, so forked backends share no
/// state). gen_random_uuid() calls into OpenSSL for every row of a batch claim.
#[pg_extern(volatile, parallel_safe)]
pub fn _lease_token() -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*uuid::Uuid::new_v4().as_bytes())
}

#[cfg(test)]
mod unit {
    #[test]
    fn v7_ids_increase() {
        let a = uuid::Uuid::now_v7();
        let b = uuid::Uuid::now_v7();
        assert_eq!(a.get_version_num(), 7);
        assert!(b > a);
    }

    #[test]
    fn lease_tokens_are_random_v4() {
        let a = super::_lease_token();
        let b = super::_lease_token();
        assert_eq!(a.as_bytes()[6] >> 4, 4);
        assert_ne!(a.as_bytes(), b.as_bytes());
    }
}
