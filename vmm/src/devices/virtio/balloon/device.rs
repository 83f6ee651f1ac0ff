//! The balloon device model and its queues.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::metrics::BalloonMetrics;
use super::report;
use super::{
    NUM_QUEUES, QUEUE_SIZES, REPORTING_QUEUE, VIRTIO_BALLOON_F_REPORTING, VIRTIO_ID_BALLOON,
};
use crate::devices::virtio::{
    read_config_space, ActivateError, Active, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// A balloon that only takes free page reports.
#[derive(Default)]
pub struct Balloon {
    acked_features: u64,
    /// The guest's `actual` (pages it says it holds in the balloon), as it wrote it.
    actual: u32,
    active: Option<Active>,
    metrics: Arc<BalloonMetrics>,
}

impl Balloon {
    /// A new device.
    pub fn new() -> Self {
        Self::default()
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<BalloonMetrics> {
        self.metrics.clone()
    }

    /// Serves queue `index` and signals the guest if any buffer was used.
    fn handle_queue(&mut self, index: usize) {
        let m = &self.metrics;
        m.queue_events.fetch_add(1, Ordering::Relaxed);
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        let mem = active.mem.clone();
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            if index == REPORTING_QUEUE {
                report::process(&mem, chain, m);
            } else {
                m.unexpected_buffers.fetch_add(1, Ordering::Relaxed);
            }
            // Nothing is written into any buffer.
            if queue.add_used(&mem, head, 0).is_err() {
                m.invalid_descriptors.fetch_add(1, Ordering::Relaxed);
            }
            used_any = true;
        }
        if used_any && active.signal_used(index).is_err() {
            m.interrupt_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BALLOON_F_REPORTING)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_balloon_config { le32 num_pages; le32 actual; }: the target is
        // always 0 pages. The fields after these belong to features we do not offer.
        let mut cfg = [0u8; 8];
        cfg[4..].copy_from_slice(&self.actual.to_le_bytes());
        read_config_space(&cfg, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write, and only as a whole.
        if offset == 4 {
            if let Ok(v) = <[u8; 4]>::try_from(data) {
                self.actual = u32::from_le_bytes(v);
            }
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let active = Active::new(mem, queues, interrupt, NUM_QUEUES)?;
        if self.acked_features & (1 << VIRTIO_BALLOON_F_REPORTING) == 0 {
            // Without it the driver sets up only two queues; ours would never be ready.
            return Err(ActivateError::Backend(
                "the driver did not accept free page reporting".into(),
            ));
        }
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        self.actual = 0;
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        self.handle_queue(index);
    }

    fn metrics_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&*self.metrics).unwrap_or_default();
        v["actual_pages"] = self.actual.into();
        v
    }
}
