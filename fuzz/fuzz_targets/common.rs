//! Shared by the targets: a small guest memory filled with the fuzz input, holding one split
//! queue whose descriptor table (at 0), available ring (at 0x100) and buffers are all guest
//! (fuzzer) bytes; the used ring sits past the input, at 0xf000.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM size: large enough for the rings and some buffers, small enough that random
/// addresses often fall outside it.
pub const MEM_SIZE: usize = 0x1_0000;
/// Queue size (the device's maximum for vsock is 256; 16 keeps runs fast).
pub const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0xf000;

/// Guest memory holding `data` from address 0, and a ready queue over it.
pub fn guest(data: &[u8]) -> Option<(GuestMemoryMmap, Queue)> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).ok()?;
    let mut q = Queue::new(QUEUE_SIZE).ok()?;
    q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .ok()?;
    q.try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .ok()?;
    q.try_set_used_ring_address(GuestAddress(USED_RING)).ok()?;
    q.set_ready(true);
    Some((mem, q))
}

/// Runs `f` on every chain (at most a queue's worth) the queue over `data` offers.
pub fn for_each_chain(
    data: &[u8],
    mut f: impl FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>),
) {
    let Some((mem, mut queue)) = guest(data) else {
        return;
    };
    let Ok(chains) = queue.iter(&mem) else {
        return;
    };
    for chain in chains.take(usize::from(QUEUE_SIZE)) {
        f(&mem, chain);
    }
}
