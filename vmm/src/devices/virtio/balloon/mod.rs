//! virtio-balloon (device id 5), for free page reporting only: the guest hands us pages it
//! has freed (`VIRTIO_BALLOON_F_REPORTING`) and we give their memory back to the host, so a
//! VM's resident memory falls again after its guest stops using memory, instead of staying
//! at its peak for the VM's life.
//!
//! The balloon's target stays 0: we never ask the guest for memory. The inflate and deflate
//! queues exist because the protocol has them; a guest that uses them anyway gets its buffers
//! back untouched, and they are counted.

mod device;
pub mod metrics;
pub mod report;

pub use device::Balloon;
pub use metrics::BalloonMetrics;

/// Virtio device id of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Feature: the driver reports free pages on the reporting queue.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// Queues with `VIRTIO_BALLOON_F_REPORTING` and no other optional queue: inflate, deflate,
/// reporting (virtio 1.2 §5.5.2; Linux numbers the queues it uses without gaps).
pub const NUM_QUEUES: usize = 3;
/// The reporting queue's index.
pub const REPORTING_QUEUE: usize = 2;
/// Queue sizes we offer. Linux reports at most 32 ranges at a time, in one chain; a chain
/// cannot be longer than its queue.
pub const QUEUE_SIZES: [u16; NUM_QUEUES] = [128, 128, 32];

#[cfg(test)]
mod tests;
