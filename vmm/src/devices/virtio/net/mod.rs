//! virtio-net (device id 1) backed by a Linux tap device, as in Firecracker: one receive and
//! one transmit queue, the 12-byte virtio 1.x header passed through to the tap
//! (`IFF_VNET_HDR`), checksum and segmentation offloads handed to the tap with
//! `TUNSETOFFLOAD` according to what the guest acked, and mergeable receive buffers (a
//! frame spread over as many of the guest's buffers as it needs).

mod device;
mod event_handler;
pub mod metrics;
pub mod tap;

pub use device::Net;
// The frame paths over guest chains, public for the fuzz targets (`fuzz/`).
pub use event_handler::{
    deliver_rx_frame, tx_iovecs, FrameError, RxDelivery, RxOutcome, RxScratch, TxIovecs,
};
pub use metrics::NetMetrics;
pub use tap::{Tap, TapError};

/// Virtio device id of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Receive and transmit queues (one pair, no control queue).
pub const NUM_QUEUES: usize = 2;
/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RXQ: usize = 0;
/// Transmit queue index.
pub const TXQ: usize = 1;

/// Size of `struct virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers): what every frame carries in front with `VERSION_1`.
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame we move: 64 KiB of IP packet (the most a TSO/GSO frame can be)
/// plus an Ethernet header with a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65535 + 18;
/// Largest transmit chain (header + frame) we accept; longer ones are dropped and counted.
pub const MAX_TX_CHAIN_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Largest receive chain we accept (a guest without mergeable buffers posts "big packets"
/// buffers of about 68 KiB); nothing is allocated from it, it only rejects absurd chains.
pub const MAX_RX_CHAIN_LEN: u64 = 1 << 20;

/// Feature bits (virtio 1.2 §5.1.3).
pub mod features {
    /// The device handles packets with a partial checksum (the guest may skip it).
    pub const CSUM: u32 = 0;
    /// The guest handles packets with a partial checksum.
    pub const GUEST_CSUM: u32 = 1;
    /// The config space's `mtu` is valid.
    pub const MTU: u32 = 3;
    /// The config space's `mac` is valid.
    pub const MAC: u32 = 5;
    /// The guest takes TSOv4 frames.
    pub const GUEST_TSO4: u32 = 7;
    /// The guest takes TSOv6 frames.
    pub const GUEST_TSO6: u32 = 8;
    /// The guest takes UFO frames.
    pub const GUEST_UFO: u32 = 10;
    /// The device takes TSOv4 frames.
    pub const HOST_TSO4: u32 = 11;
    /// The device takes TSOv6 frames.
    pub const HOST_TSO6: u32 = 12;
    /// The device takes UFO frames.
    pub const HOST_UFO: u32 = 14;
    /// The guest takes a frame spread over several receive buffers (`num_buffers`).
    pub const MRG_RXBUF: u32 = 15;
    /// The config space's `status` is valid.
    pub const STATUS: u32 = 16;
}

/// `VIRTIO_NET_S_LINK_UP` in the config space's `status`.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap device cannot be opened or configured.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The device's epoll set cannot be created.
    #[error("cannot create the net device's epoll set: {0}")]
    Epoll(#[source] std::io::Error),
}

#[cfg(test)]
mod tests;
