//! virtio-blk (device id 2) backed by a host file: read, write (unless read-only), flush.
//! One request queue, served synchronously on the event loop with a bounded bounce buffer.

mod device;
mod event_handler;
pub mod metrics;
pub mod request;

pub use device::Block;
pub use metrics::BlockMetrics;

/// Virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// The one request queue.
pub const NUM_QUEUES: usize = 1;
/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 256;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Feature: the device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature: the device accepts FLUSH requests.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file cannot be opened or examined.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests;
