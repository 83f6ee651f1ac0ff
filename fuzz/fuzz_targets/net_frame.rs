//! Every chain the guest offers, as a virtio-net transmit chain (resolved into the buffers
//! one `writev` hands the tap), and the whole receive queue as the guest left it, receiving frames with and
//! without mergeable buffers: the device uses a chain or refuses it, publishes a frame whole
//! or not at all, and never panics or reports more than the buffer or the chain holds.
#![no_main]

mod common;

use carapace_vmm::devices::virtio::net::{
    deliver_rx_frame, tx_iovecs, RxOutcome, RxScratch, TxIovecs, MAX_TX_CHAIN_LEN,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Where `common` puts the used ring: flags, idx, then (id, len) entries (the device writes
/// them; the input may have filled that memory before).
const USED_RING: u64 = 0xf000;

fuzz_target!(|data: &[u8]| {
    let mut iovs = TxIovecs::default();
    common::for_each_chain(data, |mem, chain| {
        if let Ok(n) = tx_iovecs(mem, &chain, &mut iovs) {
            assert!((26..=MAX_TX_CHAIN_LEN).contains(&n));
            // Every buffer handed to writev lies inside guest RAM, and they add up to n.
            let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
            let mut total = 0;
            for iov in iovs.as_slice() {
                let start = iov.iov_base as usize;
                assert!(start >= base && start + iov.iov_len <= base + common::MEM_SIZE);
                total += iov.iov_len;
            }
            assert_eq!(total, n);
        }
    });

    // A frame of the length the input's last byte asks for (vnet header + Ethernet + data);
    // the byte before it picks mergeable buffers or not.
    let frame = vec![0x5au8; 26 + usize::from(data.last().copied().unwrap_or(0)) * 64];
    let mergeable = data.len() >= 2 && data[data.len() - 2] & 1 == 1;
    let Some((mem, mut queue)) = common::guest(data) else {
        return;
    };
    let max_buffers = if mergeable { queue.size() } else { 1 };
    let mut scratch = RxScratch::default();
    // At most a queue's worth of frames: each one either uses a buffer or stops the loop.
    for _ in 0..common::QUEUE_SIZE {
        let used_before = queue.next_used();
        let delivery = deliver_rx_frame(&mem, &mut queue, &frame, max_buffers, &mut scratch);
        let published = queue.next_used().wrapping_sub(used_before);
        match delivery.outcome {
            RxOutcome::Delivered(n) => {
                assert!((1..=max_buffers).contains(&n));
                // A good chain's head is in range, so each of its entries was published.
                assert!(published >= n);
                // The frame's entries, after any malformed chains returned empty.
                let total: u64 = (0..n)
                    .map(|i| used_len(&mem, used_before.wrapping_add(published - n + i)))
                    .sum();
                assert_eq!(total, frame.len() as u64);
            }
            RxOutcome::NoBuffers | RxOutcome::TooBig => {
                // Only malformed chains may have been returned, all of them empty.
                for i in 0..published {
                    assert_eq!(used_len(&mem, used_before.wrapping_add(i)), 0);
                }
                break;
            }
        }
    }
});

fn used_len(mem: &vm_memory::GuestMemoryMmap, idx: u16) -> u64 {
    let slot = u64::from(idx % common::QUEUE_SIZE);
    let len: u32 = mem
        .read_obj(GuestAddress(USED_RING + 4 + slot * 8 + 4))
        .unwrap_or(0);
    u64::from(len)
}
