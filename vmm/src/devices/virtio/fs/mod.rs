//! virtio-fs (device id 26) as a vhost-user frontend: the queues are served by an external
//! backend (virtiofsd) that maps guest RAM from our memfd. We negotiate with it over its
//! unix socket, hand it the memory table, the rings, the KVM ioeventfds as kick fds and our
//! own call eventfds, and forward its calls to the guest as virtio-mmio interrupts.

mod device;
mod event_handler;
pub mod metrics;
mod vhost_user;

use std::time::Duration;

pub use device::Fs;
pub use metrics::FsMetrics;

/// Virtio device id of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// Size of the `tag` field of `struct virtio_fs_config`.
pub const TAG_LEN: usize = 36;
/// Size of the whole configuration space: `tag[36]`, `le32 num_request_queues`.
pub const CONFIG_SPACE_LEN: usize = TAG_LEN + 4;
/// `VIRTIO_RING_F_INDIRECT_DESC`: handled by the backend if it offers it.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// `VIRTIO_RING_F_EVENT_IDX`: handled by the backend if it offers it.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user bit in the virtio feature word, never
/// offered to the guest.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Longest any one exchange with the backend (a request and its reply, or a whole
/// activation or reset sequence) may take before the connection is cut.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors creating or driving the device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The backend socket cannot be reached.
    #[error("cannot connect to the vhost-user backend {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A vhost-user request failed (the backend refused it, closed the connection, sent
    /// something malformed, or did not answer within [`BACKEND_TIMEOUT`]).
    #[error("vhost-user {step} failed: {source}")]
    Protocol {
        /// The request.
        step: &'static str,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks something we need.
    #[error("the vhost-user backend {0}")]
    Unsupported(String),
    /// A guest address (RAM region or ring) that cannot be handed to the backend.
    #[error("guest memory: {0}")]
    Memory(String),
    /// An eventfd, the device's epoll set or its watchdog thread.
    #[error("cannot set up {what}: {source}")]
    Setup {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An earlier failure broke the connection; the backend cannot be used any more.
    #[error("the vhost-user connection is broken by an earlier failure")]
    Broken,
}

#[cfg(test)]
mod tests;
