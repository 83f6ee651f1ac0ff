//! Counters of the balloon.

use std::sync::atomic::AtomicU64;

use serde::Serialize;

/// Balloon counters.
#[derive(Debug, Default, Serialize)]
pub struct BalloonMetrics {
    /// Free page reports handled (one chain each).
    pub reports: AtomicU64,
    /// Ranges the guest reported free.
    pub reported_ranges: AtomicU64,
    /// Bytes given back to the host (whole pages of the reported ranges).
    pub discarded_bytes: AtomicU64,
    /// Reports dropped as malformed (a chain that does not walk, a readable descriptor,
    /// too many descriptors) and ranges outside guest RAM.
    pub invalid_descriptors: AtomicU64,
    /// Failures of the host to discard a valid range.
    pub discard_errors: AtomicU64,
    /// Buffers on the inflate or deflate queue (we never ask for either).
    pub unexpected_buffers: AtomicU64,
    /// Queue notifications handled.
    pub queue_events: AtomicU64,
    /// Failures to signal the guest.
    pub interrupt_errors: AtomicU64,
}
