//! Descriptor-chain checks shared by all devices: every chain is guest input, so it is
//! walked once and rejected unless it is well formed for the direction the device expects.

use std::ops::Deref;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

/// Which way the data flows, seen from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The device only reads (a transmit queue).
    DeviceReads,
    /// The device only writes (a receive queue).
    DeviceWrites,
}

/// Why a chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// No descriptor could be read (bad head index or descriptor table).
    #[error("empty descriptor chain")]
    Empty,
    /// The chain loops, or points past the table (it does not end).
    #[error("descriptor chain does not terminate")]
    Unterminated,
    /// A descriptor has length zero.
    #[error("zero-length descriptor")]
    ZeroLength,
    /// A descriptor points outside guest memory.
    #[error("descriptor buffer outside guest memory")]
    OutOfRange,
    /// A descriptor is writable on a transmit queue or read-only on a receive queue.
    #[error("descriptor in the wrong direction")]
    WrongDirection,
    /// The chain is longer than the device accepts.
    #[error("descriptor chain longer than {0} bytes")]
    TooLong(u64),
}

/// Walks `chain` and returns its total length if every descriptor is non-empty, inside guest
/// memory and in `dir`, the chain terminates, and the total is at most `max_len`.
pub fn validate_chain<M>(
    chain: &DescriptorChain<M>,
    dir: Direction,
    max_len: u64,
) -> Result<u64, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory + GuestMemoryBackend,
{
    let mem = chain.memory();
    let mut total: u64 = 0;
    let mut last_has_next = false;
    let mut count = 0usize;
    for desc in chain.clone() {
        count += 1;
        last_has_next = desc.has_next();
        if desc.len() == 0 {
            return Err(ChainError::ZeroLength);
        }
        if desc.is_write_only() != (dir == Direction::DeviceWrites) {
            return Err(ChainError::WrongDirection);
        }
        if !GuestMemoryBackend::check_range(mem, desc.addr(), desc.len() as usize) {
            return Err(ChainError::OutOfRange);
        }
        total += u64::from(desc.len());
        if total > max_len {
            return Err(ChainError::TooLong(max_len));
        }
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Unterminated);
    }
    Ok(total)
}

/// `VRING_AVAIL_F_NO_INTERRUPT` in the available ring's flags (virtio 1.2 §2.7.7).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the driver of `queue` wants a used-buffer interrupt now. Without
/// `VIRTIO_F_EVENT_IDX` (which we do not offer) its only say is `VRING_AVAIL_F_NO_INTERRUPT`,
/// which Linux's drivers set while they poll the used ring anyway (NAPI, the block and vsock
/// completion loops); each looks at the used ring once more after clearing it, so an entry
/// added meanwhile is not missed. A ring we cannot read gets its interrupt.
pub fn driver_wants_interrupt(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    if queue.event_idx_enabled() {
        return true;
    }
    // The used index we just published must be visible before we read the flag: the driver
    // does the reverse (writes the flag, then reads the used index).
    fence(Ordering::SeqCst);
    mem.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Relaxed)
        .map(|flags| u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
        .unwrap_or(true)
}

/// Walks a request chain of device-readable descriptors followed by device-writable ones
/// (virtio-blk's layout: header, data, status): every descriptor non-empty and inside guest
/// memory, no readable one after a writable one, the chain terminates, and the total is at
/// most `max_len`. Returns (readable bytes, writable bytes).
pub fn validate_request_chain<M>(
    chain: &DescriptorChain<M>,
    max_len: u64,
) -> Result<(u64, u64), ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory + GuestMemoryBackend,
{
    let mem = chain.memory();
    let (mut readable, mut writable) = (0u64, 0u64);
    let mut last_has_next = false;
    let mut count = 0usize;
    for desc in chain.clone() {
        count += 1;
        last_has_next = desc.has_next();
        if desc.len() == 0 {
            return Err(ChainError::ZeroLength);
        }
        if !GuestMemoryBackend::check_range(mem, desc.addr(), desc.len() as usize) {
            return Err(ChainError::OutOfRange);
        }
        if desc.is_write_only() {
            writable += u64::from(desc.len());
        } else if writable > 0 {
            return Err(ChainError::WrongDirection);
        } else {
            readable += u64::from(desc.len());
        }
        if readable + writable > max_len {
            return Err(ChainError::TooLong(max_len));
        }
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Unterminated);
    }
    Ok((readable, writable))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn check(descs: &[RawDescriptor], dir: Direction) -> Result<u64, ChainError> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let q = MockSplitQueue::new(&mem, 16);
        let chain = q.build_multiple_desc_chains(descs).unwrap();
        validate_chain(&chain, dir, 0x8000)
    }

    const N: u32 = VRING_DESC_F_NEXT;
    const W: u32 = VRING_DESC_F_WRITE;

    #[test]
    fn good_chains_pass() {
        assert_eq!(
            check(&[desc(0x1000, 100, 0, 0)], Direction::DeviceReads),
            Ok(100)
        );
        assert_eq!(
            check(
                &[desc(0x1000, 10, W | N, 1), desc(0x2000, 20, W, 0)],
                Direction::DeviceWrites
            ),
            Ok(30)
        );
    }

    #[test]
    fn request_chains_need_readable_before_writable() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let check = |descs: &[RawDescriptor]| {
            let q = MockSplitQueue::new(&mem, 16);
            let chain = q.build_multiple_desc_chains(descs).unwrap();
            validate_request_chain(&chain, 0x8000)
        };
        assert_eq!(
            check(&[
                desc(0x1000, 16, N, 1),
                desc(0x2000, 512, W | N, 2),
                desc(0x3000, 1, W, 0)
            ]),
            Ok((16, 513))
        );
        assert_eq!(
            check(&[desc(0x1000, 16, W | N, 1), desc(0x2000, 512, 0, 0)]),
            Err(ChainError::WrongDirection)
        );
        assert_eq!(
            check(&[desc(0x1000, 16, N, 1), desc(0x2000, 0, W, 0)]),
            Err(ChainError::ZeroLength)
        );
        assert_eq!(
            check(&[desc(0x1000, 16, N, 1), desc(0x2000, 16, N, 0)]),
            Err(ChainError::Unterminated)
        );
        assert_eq!(
            check(&[desc(0x1000, 16, N, 1), desc(0xf_f000, 0x2000, W, 0)]),
            Err(ChainError::OutOfRange)
        );
    }

    #[test]
    fn malformed_chains_are_rejected() {
        use ChainError::*;
        let r = Direction::DeviceReads;
        // A loop: 0 -> 1 -> 0.
        assert_eq!(
            check(&[desc(0x1000, 1, N, 1), desc(0x2000, 1, N, 0)], r),
            Err(Unterminated)
        );
        // Next index past the table.
        assert_eq!(check(&[desc(0x1000, 1, N, 99)], r), Err(Unterminated));
        assert_eq!(check(&[desc(0x1000, 0, 0, 0)], r), Err(ZeroLength));
        assert_eq!(check(&[desc(0xff000, 0x2000, 0, 0)], r), Err(OutOfRange));
        assert_eq!(check(&[desc(u64::MAX - 4, 16, 0, 0)], r), Err(OutOfRange));
        assert_eq!(check(&[desc(0x1000, 1, W, 0)], r), Err(WrongDirection));
        assert_eq!(
            check(
                &[desc(0x1000, 1, W | N, 1), desc(0x2000, 1, 0, 0)],
                Direction::DeviceWrites
            ),
            Err(WrongDirection)
        );
        assert_eq!(
            check(&[desc(0x1000, 0x9000, 0, 0)], r),
            Err(TooLong(0x8000))
        );
    }
}
