//! Queue and backend processing. Every chain is validated before use; a malformed chain is
//! returned to the guest as used with length 0 and counted, never trusted.

use std::io::ErrorKind;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EpollEvent;

use super::device::Net;
use super::features::GUEST_CSUM;
use super::{MAX_RX_CHAIN_LEN, MAX_TX_CHAIN_LEN, RXQ, TXQ, VNET_HDR_LEN};
use crate::devices::virtio::queue::{validate_chain, ChainError, Direction};
use crate::devices::virtio::InterruptKind;

/// An Ethernet header: the least a frame must carry after its vnet header.
const ETH_HLEN: usize = 14;

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Why a chain was not used.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The chain is malformed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Shorter than a vnet header plus an Ethernet header.
    #[error("chain of {0} bytes is shorter than a header and an Ethernet header")]
    TooShort(u64),
    /// Guest memory could not be accessed.
    #[error("cannot access guest memory")]
    Memory,
}

/// Gathers a transmit chain (vnet header + frame, any split) into `buf`; returns its length.
pub fn read_tx_frame(
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    buf: &mut [u8],
) -> Result<usize, FrameError> {
    let max = buf.len().min(MAX_TX_CHAIN_LEN) as u64;
    let total = validate_chain(&chain, Direction::DeviceReads, max)?;
    if total < (VNET_HDR_LEN + ETH_HLEN) as u64 {
        return Err(FrameError::TooShort(total));
    }
    // `total <= max <= buf.len()`, so this slice exists.
    let frame = &mut buf[..total as usize];
    let mut reader = chain.reader(mem).map_err(|_| FrameError::Memory)?;
    std::io::Read::read_exact(&mut reader, frame).map_err(|_| FrameError::Memory)?;
    Ok(frame.len())
}

/// Writes `frame` (vnet header first) into a receive chain; `Ok(None)` if it does not fit.
pub fn write_rx_frame(
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    frame: &[u8],
) -> Result<Option<u32>, FrameError> {
    let cap = validate_chain(&chain, Direction::DeviceWrites, MAX_RX_CHAIN_LEN)?;
    if (frame.len() as u64) > cap {
        return Ok(None);
    }
    let mut writer = chain.writer(mem).map_err(|_| FrameError::Memory)?;
    std::io::Write::write_all(&mut writer, frame).map_err(|_| FrameError::Memory)?;
    // `frame.len() <= cap <= MAX_RX_CHAIN_LEN`, which fits a u32.
    Ok(Some(frame.len() as u32))
}

impl Net {
    pub(super) fn handle_queue_event(&mut self, index: usize) {
        self.metrics.queue_events.fetch_add(1, Ordering::Relaxed);
        match index {
            // New receive buffers: deliver what waits and read the tap again.
            RXQ => self.process_rx(),
            TXQ => self.process_tx(),
            _ => {}
        }
    }

    pub(super) fn handle_backend_event(&mut self) {
        self.metrics.backend_events.fetch_add(1, Ordering::Relaxed);
        // Consume the readiness of our own epoll set (level-triggered: it is reported
        // again while the tap stays readable and armed).
        let mut events = [EpollEvent::default(); 2];
        let _ = self.tap.epoll.wait(0, &mut events);
        self.process_rx();
    }

    fn signal_used(&self) {
        if let Some(active) = &self.active {
            if active.interrupt.trigger(InterruptKind::UsedBuffer).is_err() {
                self.metrics
                    .interrupt_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends every transmit chain to the tap, one write per frame.
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let queue = &mut active.queues[TXQ];
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match read_tx_frame(&mem, chain, &mut self.tx_buf) {
                Ok(len) => match self.backend.write_frame(&self.tx_buf[..len]) {
                    Ok(_) => {
                        self.metrics.tx_packets.fetch_add(1, Ordering::Relaxed);
                        self.metrics
                            .tx_bytes
                            .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::debug!("net: tap refused a frame: {e}");
                        self.metrics.tap_errors.fetch_add(1, Ordering::Relaxed);
                        self.metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                },
                Err(e) => {
                    tracing::debug!("net: dropping transmit chain: {e}");
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
        if used_any {
            self.signal_used();
        }
    }

    /// Moves frames from the tap into the guest's receive buffers until the tap is empty or
    /// the guest has no buffer left (then the tap is left unread until it posts more).
    pub(crate) fn process_rx(&mut self) {
        let guest_csum = self.acked(GUEST_CSUM);
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let queue = &mut active.queues[RXQ];
        let mut used_any = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(len) if len >= VNET_HDR_LEN + ETH_HLEN => {
                        fix_rx_header(&mut self.rx_buf[..VNET_HDR_LEN], guest_csum);
                        self.rx_pending = Some(len);
                        len
                    }
                    Ok(0) => {
                        // End of file: the backend is gone; stop watching it.
                        self.metrics.tap_errors.fetch_add(1, Ordering::Relaxed);
                        self.tap.disarm();
                        break;
                    }
                    Ok(_) => {
                        self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if self.tap.arm().is_err() {
                            self.metrics.tap_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Do not spin on a broken tap: wait for the guest's next buffers.
                        tracing::debug!("net: tap read failed: {e}");
                        self.metrics.tap_errors.fetch_add(1, Ordering::Relaxed);
                        self.tap.disarm();
                        break;
                    }
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                // Backpressure: keep the frame, leave the rest in the tap's queue.
                self.metrics.rx_no_buffers.fetch_add(1, Ordering::Relaxed);
                self.tap.disarm();
                break;
            };
            let head = chain.head_index();
            let used = match write_rx_frame(&mem, chain, &self.rx_buf[..len]) {
                Ok(Some(n)) => {
                    self.metrics.rx_packets.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .rx_bytes
                        .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                    self.rx_pending = None;
                    n
                }
                Ok(None) => {
                    // Too big for the buffer: drop the frame, keep the buffer for the next.
                    self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    self.rx_pending = None;
                    queue.go_to_previous_position();
                    continue;
                }
                Err(e) => {
                    // A bad buffer is returned empty; the frame waits for the next one.
                    tracing::debug!("net: dropping receive chain: {e}");
                    self.metrics
                        .invalid_descriptors
                        .fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            if queue.add_used(&mem, head, used).is_err() {
                self.metrics
                    .invalid_descriptors
                    .fetch_add(1, Ordering::Relaxed);
            }
            used_any = true;
        }
        if used_any {
            self.signal_used();
        }
    }
}

/// Makes the tap's vnet header right for the guest: `num_buffers` is 1 (no mergeable
/// buffers; the tap leaves those two bytes untouched), and without `GUEST_CSUM` the flags
/// must be zero (virtio 1.2 §5.1.6.4.1; the tap may set DATA_VALID).
fn fix_rx_header(hdr: &mut [u8], guest_csum: bool) {
    if !guest_csum {
        hdr[0] = 0;
    }
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
}
