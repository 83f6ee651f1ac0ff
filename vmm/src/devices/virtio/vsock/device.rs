//! The vsock device model: features, config space (the guest CID), activation.

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::metrics::VsockMetrics;
use super::muxer::VsockMuxer;
use super::{VsockError, NUM_QUEUES, QUEUE_SIZE, VIRTIO_ID_VSOCK};
use crate::devices::virtio::{
    read_config_space, ActivateError, Active, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// The virtio-vsock device.
pub struct Vsock {
    pub(super) guest_cid: u64,
    acked_features: u64,
    pub(super) active: Option<Active>,
    pub(super) muxer: VsockMuxer,
    pub(super) metrics: Arc<VsockMetrics>,
}

impl Vsock {
    /// A device for `guest_cid` whose host side listens on `uds_path`.
    pub fn new(guest_cid: u32, uds_path: &Path) -> Result<Self, VsockError> {
        let metrics = Arc::new(VsockMetrics::default());
        let muxer =
            VsockMuxer::new(u64::from(guest_cid), uds_path, metrics.clone()).map_err(|source| {
                VsockError::Listen {
                    path: uds_path.display().to_string(),
                    source,
                }
            })?;
        Ok(Self {
            guest_cid: u64::from(guest_cid),
            acked_features: 0,
            active: None,
            muxer,
            metrics,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// Live host connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.guest_cid.to_le_bytes();
        read_config_space(&cfg, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let active = Active::new(mem, queues, interrupt, NUM_QUEUES)?;
        self.active = Some(active);
        // Host clients may have connected before the driver came up.
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Connections survive nothing the guest does not know about: a reset drops the
        // queues; host connections are reset lazily when the guest answers with RST.
        self.active = None;
        self.acked_features = 0;
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        self.handle_queue_event(index);
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_backend(&mut self) {
        self.handle_backend_event();
    }

    fn metrics_json(&self) -> serde_json::Value {
        serde_json::to_value(&*self.metrics).unwrap_or_default()
    }
}
