//! Counters of one net device ("rx" is towards the guest, "tx" from it).

use std::sync::atomic::AtomicU64;

use serde::Serialize;

/// Net device counters.
#[derive(Debug, Default, Serialize)]
pub struct NetMetrics {
    /// Frames put in the guest's receive queue.
    pub rx_packets: AtomicU64,
    /// Of those, frames spread over more than one buffer (mergeable receive buffers).
    pub rx_merged: AtomicU64,
    /// Ethernet bytes (vnet header excluded) put in the guest's receive queue.
    pub rx_bytes: AtomicU64,
    /// Frames from the tap dropped because the guest's receive buffers were too small (one
    /// buffer, or with mergeable buffers a queue's worth), or the frame was shorter than a
    /// vnet header and an Ethernet header.
    pub rx_dropped: AtomicU64,
    /// Times a frame had to wait (and the tap was left unread) for lack of a receive buffer.
    pub rx_no_buffers: AtomicU64,
    /// Frames taken from the guest's transmit queue and written to the tap.
    pub tx_packets: AtomicU64,
    /// Ethernet bytes (vnet header excluded) written to the tap.
    pub tx_bytes: AtomicU64,
    /// Well-formed transmit frames the tap refused.
    pub tx_dropped: AtomicU64,
    /// Descriptor chains dropped as malformed (loops, bad addresses, zero length, wrong
    /// direction; on transmit shorter than a header and an Ethernet header or longer than
    /// 64 KiB + header, on receive shorter than a header or longer than 1 MiB).
    pub invalid_descriptors: AtomicU64,
    /// Failed reads, writes and ioctls on the tap.
    pub tap_errors: AtomicU64,
    /// Queue notifications handled.
    pub queue_events: AtomicU64,
    /// Backend (tap) wake-ups handled.
    pub backend_events: AtomicU64,
    /// Failures to signal the guest.
    pub interrupt_errors: AtomicU64,
    /// Used-buffer interrupts not raised because the driver had asked for none
    /// (`VRING_AVAIL_F_NO_INTERRUPT`, set while it polls).
    pub interrupts_suppressed: AtomicU64,
}
