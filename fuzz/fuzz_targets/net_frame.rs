//! Every chain the guest offers, as a virtio-net transmit chain (gathered into the device's
//! 64 KiB buffer), and the whole receive queue as the guest left it, receiving frames with and
//! without mergeable buffers: the device uses a chain or refuses it, publishes a frame whole
//! or not at all, and never panics or reports more than the buffer or the chain holds.
#![no_main]

mod common;

use carapace_vmm::devices::virtio::net::{deliver_rx_frame, read_tx_frame, RxOutcome, RxScratch};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

/// Where `common` puts the used ring: flags, idx, then (id, len) entries (the device writes
/// them; the input may have filled that memory before).
const USED_RING: u64 = 0xf000;

fuzz_target!(|data: &[u8]| {
    let mut buf = vec![0u8; 64 << 10];
    common::for_each_chain(data, |mem, chain| {
        if let Ok(n) = read_tx_frame(mem, chain, &mut buf) {
            assert!((26..=buf.len()).contains(&n));
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
