//! Queue and backend processing. Every chain is validated before use; a malformed chain is
//! returned to the guest as used with length 0 and counted, never trusted.

use std::sync::atomic::Ordering;

use virtio_queue::{QueueOwnedT, QueueT};

use super::device::Vsock;
use super::packet::{read_tx_packet, rx_payload_capacity, write_rx_packet};
use super::{EVQ, RXQ, TXQ};

impl Vsock {
    pub(super) fn handle_queue_event(&mut self, index: usize) {
        self.metrics.queue_events.fetch_add(1, Ordering::Relaxed);
        match index {
            RXQ => self.process_rx(),
            TXQ => {
                self.process_tx();
                // Transmitted packets often need an answer (RESPONSE, RST, credit).
                self.process_rx();
            }
            // We never send events; the guest's buffers just stay in the queue.
            EVQ => {}
            _ => {}
        }
    }

    pub(super) fn handle_backend_event(&mut self) {
        self.metrics.backend_events.fetch_add(1, Ordering::Relaxed);
        self.muxer.process_events();
        self.process_rx();
    }

    /// Interrupts the guest for queue `index`'s new used entries, if its driver wants that.
    fn signal_used(&self, index: usize) {
        if let Some(active) = &self.active {
            if active.signal_used(index).is_err() {
                self.metrics
                    .interrupt_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Drains the transmit queue into the muxer.
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used_any = false;
        let mut packets = Vec::new();
        let queue = &mut active.queues[TXQ];
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match read_tx_packet(&mem, chain) {
                Ok(pkt) => {
                    self.metrics.tx_packets.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .tx_bytes
                        .fetch_add(pkt.data.len() as u64, Ordering::Relaxed);
                    packets.push(pkt);
                }
                Err(e) => {
                    tracing::debug!("vsock: dropping transmit chain: {e}");
                    self.metrics
                        .invalid_descriptors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            if queue.add_used(&mem, head, 0).is_err() {
                self.metrics
                    .invalid_descriptors
                    .fetch_add(1, Ordering::Relaxed);
            }
            used_any = true;
        }
        for pkt in packets {
            self.muxer.send_to_host(pkt);
        }
        if used_any {
            self.signal_used(TXQ);
        }
    }

    /// Fills the guest's receive buffers with whatever the muxer has.
    pub(crate) fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used_any = false;
        let queue = &mut active.queues[RXQ];
        while self.muxer.has_rx() {
            let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match rx_payload_capacity(&chain) {
                Ok(cap) => match self.muxer.next_rx(cap) {
                    Some((hdr, data)) => match write_rx_packet(&mem, chain, &hdr, &data) {
                        Ok(n) => {
                            self.metrics.rx_packets.fetch_add(1, Ordering::Relaxed);
                            self.metrics
                                .rx_bytes
                                .fetch_add(data.len() as u64, Ordering::Relaxed);
                            n
                        }
                        Err(_) => {
                            self.metrics
                                .invalid_descriptors
                                .fetch_add(1, Ordering::Relaxed);
                            0
                        }
                    },
                    None => {
                        // Nothing after all (e.g. the stream would block): keep the buffer.
                        queue.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    tracing::debug!("vsock: dropping receive chain: {e}");
                    self.metrics
                        .invalid_descriptors
                        .fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            if queue.add_used(&mem, head, written).is_err() {
                self.metrics
                    .invalid_descriptors
                    .fetch_add(1, Ordering::Relaxed);
            }
            used_any = true;
        }
        if used_any {
            self.signal_used(RXQ);
        }
    }
}
