//! virtio-vsock (device id 19) with a hybrid-vsock host side on unix sockets, as in
//! Firecracker: see [`muxer`] for the host protocol.

mod connection;
mod device;
mod event_handler;
pub mod metrics;
pub mod muxer;
pub mod packet;

pub use device::Vsock;
pub use metrics::VsockMetrics;

/// Virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Receive, transmit and event queues.
pub const NUM_QUEUES: usize = 3;
/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RXQ: usize = 0;
/// Transmit queue index.
pub const TXQ: usize = 1;
/// Event queue index.
pub const EVQ: usize = 2;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The unix listener cannot be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests;
