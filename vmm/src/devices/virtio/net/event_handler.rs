//! Queue and backend processing. Every chain is validated before use; a malformed chain is
//! returned to the guest as used with length 0 and counted, never trusted.

use std::io::ErrorKind;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EpollEvent;

use super::device::Net;
use super::features::{GUEST_CSUM, MRG_RXBUF};
use super::{MAX_RX_CHAIN_LEN, MAX_TX_CHAIN_LEN, RXQ, TXQ, VNET_HDR_LEN};
use crate::devices::virtio::queue::{validate_chain, ChainError, Direction};

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

/// The host addresses and lengths of a transmit chain's buffers, for one `writev` to the
/// tap: the frame goes from guest memory to the kernel without a copy of ours. Kept in the
/// device so that the transmit path does not allocate.
#[derive(Debug, Default)]
pub struct TxIovecs(Vec<libc::iovec>);

// SAFETY: the pointers are only handed to the kernel (`writev`), never dereferenced by us;
// they are filled and used on one thread, between two calls on the event loop.
unsafe impl Send for TxIovecs {}

impl TxIovecs {
    /// The buffers, in frame order.
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.0
    }
}

/// Validates a transmit chain (vnet header + frame, any split) and lists its buffers in
/// `iovs`; returns the frame's length (header included). Every address is resolved through
/// guest memory's own bounds checks, so each iovec lies inside guest RAM.
pub fn tx_iovecs(
    mem: &GuestMemoryMmap,
    chain: &Chain<'_>,
    iovs: &mut TxIovecs,
) -> Result<usize, FrameError> {
    iovs.0.clear();
    validate_chain(chain, Direction::DeviceReads, MAX_TX_CHAIN_LEN as u64)?;
    // Walked again to resolve the addresses: the guest may have rewritten its descriptors
    // since, so direction and length are checked again on what is used.
    let mut total = 0usize;
    for desc in chain.clone() {
        if desc.is_write_only() {
            return Err(ChainError::WrongDirection.into());
        }
        total += desc.len() as usize;
        if total > MAX_TX_CHAIN_LEN {
            return Err(ChainError::TooLong(MAX_TX_CHAIN_LEN as u64).into());
        }
        let slice = mem
            .get_slice(desc.addr(), desc.len() as usize)
            .map_err(|_| FrameError::Memory)?;
        iovs.0.push(libc::iovec {
            iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
            iov_len: slice.len(),
        });
    }
    if total < VNET_HDR_LEN + ETH_HLEN {
        return Err(FrameError::TooShort(total as u64));
    }
    Ok(total)
}

/// What became of a frame offered to the receive queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into this many chains (its header's `num_buffers`), all of them used.
    Delivered(u16),
    /// The guest's buffers ran out first: none of them is used, the frame waits.
    NoBuffers,
    /// It does not fit in as many buffers as one frame may take: dropped, and none of the
    /// buffers is used.
    TooBig,
}

/// A frame offered to the receive queue: the outcome, and how many malformed chains were
/// returned to the guest on the way (used, with length 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxDelivery {
    pub outcome: RxOutcome,
    pub invalid: u32,
}

/// Per-frame bookkeeping kept between frames, so the receive path does not allocate.
#[derive(Debug, Default)]
pub struct RxScratch {
    /// (head, bytes) of each chain the frame went into, in order.
    used: Vec<(u16, u32)>,
    /// Malformed chains met after the frame's first buffer.
    bad: Vec<u16>,
}

/// Writes `frame` (vnet header first) into the receive queue, across at most `max_buffers`
/// chains: 1, or the queue size with `VIRTIO_NET_F_MRG_RXBUF` (virtio 1.2 §5.1.6.4). The
/// header's `num_buffers` is set to the number of chains used.
///
/// Nothing is published unless the whole frame fits: a frame that runs out of buffers or
/// needs more than `max_buffers` rewinds the queue to where it started, so its buffers are
/// offered again to the next frame (their contents are scratch until used). A malformed
/// chain, or one shorter than a vnet header, is returned used with length 0: at once if no
/// buffer of this frame comes before it (it is then behind us for good), otherwise just
/// before the frame's own entries, which stay contiguous in the used ring as mergeable
/// buffers must.
pub fn deliver_rx_frame(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    frame: &[u8],
    max_buffers: u16,
    scratch: &mut RxScratch,
) -> RxDelivery {
    // Publishes one used entry; a head out of range (a malformed chain's) is counted.
    let used_entry = |queue: &mut Queue, head: u16, len: u32, invalid: &mut u32| {
        if queue.add_used(mem, head, len).is_err() {
            *invalid += 1;
        }
    };
    let mut invalid = 0u32;
    scratch.used.clear();
    scratch.bad.clear();
    if frame.len() < VNET_HDR_LEN {
        return RxDelivery {
            outcome: RxOutcome::TooBig,
            invalid,
        };
    }
    // Where to rewind to: past the malformed chains already given back.
    let mut start = queue.next_avail();
    let mut first: Option<Chain<'_>> = None;
    let mut offset = 0usize;
    while offset < frame.len() {
        if scratch.used.len() + scratch.bad.len() >= usize::from(max_buffers) {
            queue.set_next_avail(start);
            return RxDelivery {
                outcome: RxOutcome::TooBig,
                invalid,
            };
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            queue.set_next_avail(start);
            return RxDelivery {
                outcome: RxOutcome::NoBuffers,
                invalid,
            };
        };
        let head = chain.head_index();
        let written = validate_chain(&chain, Direction::DeviceWrites, MAX_RX_CHAIN_LEN)
            .ok()
            .filter(|cap| *cap >= VNET_HDR_LEN as u64)
            .and_then(|cap| {
                // `cap <= MAX_RX_CHAIN_LEN`, so the cast is lossless.
                let n = (frame.len() - offset).min(cap as usize);
                let mut writer = chain.clone().writer(mem).ok()?;
                std::io::Write::write_all(&mut writer, &frame[offset..offset + n]).ok()?;
                Some(n)
            });
        match written {
            Some(n) => {
                first.get_or_insert(chain);
                // `n <= MAX_RX_CHAIN_LEN`, which fits a u32.
                scratch.used.push((head, n as u32));
                offset += n;
            }
            None if scratch.used.is_empty() => {
                invalid += 1;
                used_entry(queue, head, 0, &mut invalid);
                start = queue.next_avail();
            }
            None => scratch.bad.push(head),
        }
    }
    // The whole frame is in; now its header can say how many buffers it took. The first
    // buffer holds the whole header (no buffer is shorter than one).
    let count = scratch.used.len() as u16;
    let mut header = [0u8; VNET_HDR_LEN];
    header.copy_from_slice(&frame[..VNET_HDR_LEN]);
    header[10..12].copy_from_slice(&count.to_le_bytes());
    let header_written = first
        .and_then(|chain| chain.writer(mem).ok())
        .is_some_and(|mut w| std::io::Write::write_all(&mut w, &header).is_ok());
    if !header_written {
        // Only a guest rewriting its descriptors under us gets here; it gets what it wrote.
        invalid += 1;
    }
    for &head in &scratch.bad {
        invalid += 1;
        used_entry(queue, head, 0, &mut invalid);
    }
    for &(head, len) in &scratch.used {
        used_entry(queue, head, len, &mut invalid);
    }
    RxDelivery {
        outcome: RxOutcome::Delivered(count),
        invalid,
    }
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

    /// Interrupts the guest for queue `index`'s new used entries, if its driver wants that.
    fn signal_used(&self, index: usize) {
        let Some(active) = &self.active else {
            return;
        };
        let counter = match active.signal_used(index) {
            Ok(true) => return,
            Ok(false) => &self.metrics.interrupts_suppressed,
            Err(_) => &self.metrics.interrupt_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
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
            match tx_iovecs(&mem, &chain, &mut self.tx_iovs) {
                Ok(len) => match self.backend.write_frame(self.tx_iovs.as_slice()) {
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
            self.signal_used(TXQ);
        }
    }

    /// Moves frames from the tap into the guest's receive buffers until the tap is empty or
    /// the guest has no buffer left (then the tap is left unread until it posts more).
    pub(crate) fn process_rx(&mut self) {
        let guest_csum = self.acked(GUEST_CSUM);
        let mergeable = self.acked(MRG_RXBUF);
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let queue = &mut active.queues[RXQ];
        let max_buffers = if mergeable { queue.size() } else { 1 };
        let mut used_any = false;
        let mut want_kicks = true;
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
                        // Drained, with buffers to spare or not: the next frame will
                        // find out, so the driver need not tell us about new buffers.
                        want_kicks = false;
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
            let delivery = deliver_rx_frame(
                &mem,
                queue,
                &self.rx_buf[..len],
                max_buffers,
                &mut self.rx_scratch,
            );
            if delivery.invalid > 0 {
                self.metrics
                    .invalid_descriptors
                    .fetch_add(u64::from(delivery.invalid), Ordering::Relaxed);
                used_any = true;
            }
            match delivery.outcome {
                RxOutcome::Delivered(buffers) => {
                    self.metrics.rx_packets.fetch_add(1, Ordering::Relaxed);
                    if buffers > 1 {
                        self.metrics.rx_merged.fetch_add(1, Ordering::Relaxed);
                    }
                    self.metrics
                        .rx_bytes
                        .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                    self.rx_pending = None;
                    used_any = true;
                }
                RxOutcome::NoBuffers => {
                    if !self.rx_kicks {
                        // Ask the driver to notify us of new buffers, then look once
                        // more: buffers it added before it saw the request came without
                        // a notification.
                        let _ = queue.enable_notification(&mem);
                        self.rx_kicks = true;
                        continue;
                    }
                    // Backpressure: keep the frame, leave the rest in the tap's queue.
                    self.metrics.rx_no_buffers.fetch_add(1, Ordering::Relaxed);
                    self.tap.disarm();
                    break;
                }
                RxOutcome::TooBig => {
                    // Too big for the buffers: drop the frame, keep them for the next.
                    self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    self.rx_pending = None;
                }
            }
        }
        // Notifications of new receive buffers are only needed while a frame waits for them
        // (or the tap is not watched and only a notification can bring us back). Each one
        // is an exit to this process, and Linux's driver sends one per refill otherwise.
        if want_kicks != self.rx_kicks {
            let set = if want_kicks {
                queue.enable_notification(&mem).map(|_| ())
            } else {
                queue.disable_notification(&mem)
            };
            if set.is_ok() {
                self.rx_kicks = want_kicks;
            }
        }
        if used_any {
            self.signal_used(RXQ);
        }
    }
}

/// Makes the tap's vnet header right for the guest: without `GUEST_CSUM` the flags must be
/// zero (virtio 1.2 §5.1.6.4.1; the tap may set DATA_VALID). `num_buffers`, which the tap
/// leaves untouched, is set when the frame is delivered.
fn fix_rx_header(hdr: &mut [u8], guest_csum: bool) {
    if !guest_csum {
        hdr[0] = 0;
    }
}
