//! Queue processing: every available chain is one request, served in order.

use std::sync::atomic::Ordering;

use virtio_queue::QueueT;

use super::device::Block;
use super::request;

impl Block {
    pub(super) fn handle_queue_event(&mut self, index: usize) {
        self.metrics.queue_events.fetch_add(1, Ordering::Relaxed);
        if index != 0 {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let queue = &mut active.queues[0];
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let len = request::process(&mem, chain, &self.disk, &self.metrics).unwrap_or(0);
            if queue.add_used(&mem, head, len).is_err() {
                self.metrics
                    .invalid_descriptors
                    .fetch_add(1, Ordering::Relaxed);
            }
            used_any = true;
        }
        if used_any && active.signal_used(0).is_err() {
            self.metrics
                .interrupt_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}
