//! The virtio-blk device model: features (read-only, flush), config space (capacity),
//! activation.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::metrics::BlockMetrics;
use super::request::Disk;
use super::{
    BlockError, NUM_QUEUES, QUEUE_SIZE, SECTOR_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_ID_BLOCK,
};
use crate::devices::virtio::{
    read_config_space, ActivateError, Active, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// A virtio-blk device backed by a file.
pub struct Block {
    pub(super) disk: Disk,
    acked_features: u64,
    pub(super) active: Option<Active>,
    pub(super) metrics: Arc<BlockMetrics>,
}

impl Block {
    /// Opens `path` (read-only if `read_only`) as the disk.
    pub fn new(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        Ok(Self {
            disk: Disk {
                file,
                sectors: size / SECTOR_SIZE,
                read_only,
            },
            acked_features: 0,
            active: None,
            metrics: Arc::default(),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        let mut f = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH);
        if self.disk.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config { le64 capacity; ... }: only the capacity is offered
        // (no feature announces the other fields), the rest reads as zero.
        let cfg = self.disk.sectors.to_le_bytes();
        read_config_space(&cfg, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in our config space is writable.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let active = Active::new(mem, queues, interrupt, NUM_QUEUES)?;
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) -> bool {
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

    fn metrics_json(&self) -> serde_json::Value {
        serde_json::to_value(&*self.metrics).unwrap_or_default()
    }
}
