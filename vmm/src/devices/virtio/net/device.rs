//! The virtio-net device model: features (MAC, status, MTU, offloads), config space,
//! activation, and the tap's place in the device's own epoll set.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::event_handler::{RxScratch, TxIovecs};
use super::features::*;
use super::metrics::NetMetrics;
use super::tap::{NetBackend, Tap};
use super::{
    NetError, MAX_FRAME_LEN, NUM_QUEUES, QUEUE_SIZE, VIRTIO_ID_NET, VIRTIO_NET_S_LINK_UP,
    VNET_HDR_LEN,
};
use crate::devices::virtio::{
    read_config_space, ActivateError, Active, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// The tap's registration in the device's epoll set: it is in the set only while we want
/// frames from it (activated, and the guest has receive buffers), so a guest that posts no
/// buffers never makes the event loop spin on a readable tap.
pub(super) struct TapInterest {
    pub epoll: Epoll,
    pub fd: RawFd,
    pub armed: bool,
}

impl TapInterest {
    /// Watch the tap for frames.
    pub fn arm(&mut self) -> std::io::Result<()> {
        if !self.armed {
            self.epoll.ctl(
                ControlOperation::Add,
                self.fd,
                EpollEvent::new(EventSet::IN, 0),
            )?;
            self.armed = true;
        }
        Ok(())
    }

    /// Stop watching the tap (its frames wait in the kernel's bounded queue).
    pub fn disarm(&mut self) {
        if self.armed {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, self.fd, EpollEvent::default());
            self.armed = false;
        }
    }
}

/// A virtio-net device on a tap (or any [`NetBackend`]).
pub struct Net {
    pub(super) backend: Box<dyn NetBackend>,
    mac: [u8; 6],
    mtu: Option<u16>,
    pub(super) acked_features: u64,
    pub(super) active: Option<Active>,
    pub(super) tap: TapInterest,
    /// One frame read from the backend (vnet header first), waiting for a receive buffer.
    pub(super) rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` that is not delivered yet.
    pub(super) rx_pending: Option<usize>,
    /// The receive path's per-frame lists, kept to avoid allocating per frame.
    pub(super) rx_scratch: RxScratch,
    /// Whether the driver notifies us of new receive buffers (`VRING_USED_F_NO_NOTIFY`
    /// clear in the receive queue's used ring, as it is when the driver sets it up).
    pub(super) rx_kicks: bool,
    /// The buffers of the transmit chain being written to the tap.
    pub(super) tx_iovs: TxIovecs,
    pub(super) metrics: Arc<NetMetrics>,
}

impl Net {
    /// Attaches to the tap `tap_name`; the guest sees `mac` (and `mtu` if given).
    pub fn new(tap_name: &str, mac: [u8; 6], mtu: Option<u16>) -> Result<Self, NetError> {
        let tap = Tap::open(tap_name)?;
        Self::with_backend(Box::new(tap), mac, mtu)
    }

    /// A device on any backend (tests use a socket pair).
    pub fn with_backend(
        backend: Box<dyn NetBackend>,
        mac: [u8; 6],
        mtu: Option<u16>,
    ) -> Result<Self, NetError> {
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        let fd = backend.raw_fd();
        Ok(Self {
            backend,
            mac,
            mtu,
            acked_features: 0,
            active: None,
            tap: TapInterest {
                epoll,
                fd,
                armed: false,
            },
            rx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            rx_pending: None,
            rx_scratch: RxScratch::default(),
            rx_kicks: true,
            tx_iovs: TxIovecs::default(),
            metrics: Arc::default(),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    pub(super) fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// The `TUN_F_*` offloads matching what the guest acked: the tap may only hand us
    /// partially checksummed or segmentation-offloaded frames the guest can take.
    pub(super) fn tap_offloads(&self) -> u32 {
        if !self.acked(GUEST_CSUM) {
            // Without checksum offload the tap refuses TSO/UFO flags anyway.
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        if self.acked(GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if self.acked(GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if self.acked(GUEST_UFO) {
            flags |= libc::TUN_F_UFO;
        }
        flags
    }

    /// `struct virtio_net_config`: mac, status, max_virtqueue_pairs, mtu.
    fn config_bytes(&self) -> [u8; 12] {
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        cfg
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        let mut f = 0u64;
        for bit in [
            VIRTIO_F_VERSION_1,
            MAC,
            STATUS,
            CSUM,
            GUEST_CSUM,
            GUEST_TSO4,
            GUEST_TSO6,
            GUEST_UFO,
            HOST_TSO4,
            HOST_TSO6,
            HOST_UFO,
            MRG_RXBUF,
        ] {
            f |= 1 << bit;
        }
        if self.mtu.is_some() {
            f |= 1 << MTU;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_bytes();
        read_config_space(&cfg, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is only writable with VIRTIO_NET_F_CTRL_MAC_ADDR, which we do not offer.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let active = Active::new(mem, queues, interrupt, NUM_QUEUES)?;
        // Offloads must match this negotiation (a previous driver may have set more).
        let offloads = self.tap_offloads();
        if let Err(e) = self.backend.set_offload(offloads) {
            self.metrics
                .tap_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ActivateError::Backend(format!(
                "cannot set tap offloads {offloads:#x}: {e}"
            )));
        }
        self.tap
            .arm()
            .map_err(|e| ActivateError::Backend(format!("cannot watch the tap: {e}")))?;
        self.active = Some(active);
        self.rx_kicks = true;
        // Frames may have arrived before the driver came up.
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        self.rx_pending = None;
        self.tap.disarm();
        if self.backend.set_offload(0).is_err() {
            self.metrics
                .tap_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        self.handle_queue_event(index);
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.epoll.as_raw_fd())
    }

    fn process_backend(&mut self) {
        self.handle_backend_event();
    }

    fn metrics_json(&self) -> serde_json::Value {
        serde_json::to_value(&*self.metrics).unwrap_or_default()
    }
}
