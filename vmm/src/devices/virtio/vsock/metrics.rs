//! Counters of one vsock device ("rx" is towards the guest, "tx" from it).

use std::sync::atomic::AtomicU64;

use serde::Serialize;

/// Vsock device counters.
#[derive(Debug, Default, Serialize)]
pub struct VsockMetrics {
    /// Packets put in the guest's receive queue.
    pub rx_packets: AtomicU64,
    /// Payload bytes put in the guest's receive queue.
    pub rx_bytes: AtomicU64,
    /// Packets taken from the guest's transmit queue.
    pub tx_packets: AtomicU64,
    /// Payload bytes taken from the guest's transmit queue.
    pub tx_bytes: AtomicU64,
    /// Descriptor chains dropped as malformed (loops, bad addresses, zero length, wrong
    /// direction, too short).
    pub invalid_descriptors: AtomicU64,
    /// Well-formed chains holding a packet we reject (wrong CID, type or op).
    pub bad_packets: AtomicU64,
    /// Connections opened.
    pub conns_added: AtomicU64,
    /// Connections closed.
    pub conns_removed: AtomicU64,
    /// Connections refused or reset because of an error.
    pub conn_errors: AtomicU64,
    /// RST packets sent to the guest.
    pub rst_sent: AtomicU64,
    /// Control packets dropped because too many were queued.
    pub ctrl_dropped: AtomicU64,
    /// Queue notifications handled.
    pub queue_events: AtomicU64,
    /// Backend (socket) wake-ups handled.
    pub backend_events: AtomicU64,
    /// Failures to signal the guest.
    pub interrupt_errors: AtomicU64,
}
