//! Counters of one block device.

use std::sync::atomic::AtomicU64;

use serde::Serialize;

/// Block device counters.
#[derive(Debug, Default, Serialize)]
pub struct BlockMetrics {
    /// Completed read requests.
    pub reads: AtomicU64,
    /// Bytes read from the backing file into the guest.
    pub read_bytes: AtomicU64,
    /// Completed write requests.
    pub writes: AtomicU64,
    /// Bytes written from the guest to the backing file.
    pub write_bytes: AtomicU64,
    /// Completed flushes.
    pub flushes: AtomicU64,
    /// Requests answered with an I/O error (out of range, read-only, host I/O failure).
    pub io_errors: AtomicU64,
    /// Requests of a type we do not implement.
    pub unsupported: AtomicU64,
    /// Chains dropped as malformed (no room for a header or a status byte, loops, bad
    /// addresses, zero-length descriptors, readable after writable).
    pub invalid_descriptors: AtomicU64,
    /// Queue notifications handled.
    pub queue_events: AtomicU64,
    /// Failures to signal the guest.
    pub interrupt_errors: AtomicU64,
}
