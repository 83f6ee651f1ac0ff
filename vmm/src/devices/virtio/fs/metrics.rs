//! Counters of one virtio-fs device.

use std::sync::atomic::AtomicU64;

use serde::Serialize;

/// virtio-fs device counters.
#[derive(Debug, Default, Serialize)]
pub struct FsMetrics {
    /// Successful activations (the backend took the rings).
    pub activations: AtomicU64,
    /// Activations refused (wrong queue count, broken or failing backend).
    pub activation_errors: AtomicU64,
    /// Device resets by the driver.
    pub resets: AtomicU64,
    /// vhost-user exchanges that failed (refused, malformed, closed, timed out).
    pub backend_errors: AtomicU64,
    /// Hang-ups of the backend socket.
    pub backend_disconnects: AtomicU64,
    /// Calls received from the backend.
    pub call_events: AtomicU64,
    /// Interrupts raised for the guest (used buffers, and the config change announcing
    /// DEVICE_NEEDS_RESET).
    pub interrupts: AtomicU64,
    /// Failures to signal the guest.
    pub interrupt_errors: AtomicU64,
}
