//! Every chain the guest offers, served as a free page report: the balloon gives back the
//! memory behind a well-formed report and nothing else, and never panics. Guest memory is
//! the input itself (rings included), so a report may drop the very descriptors it is made of.
#![no_main]

mod common;

use carapace_vmm::devices::virtio::balloon::metrics::BalloonMetrics;
use carapace_vmm::devices::virtio::balloon::report::process;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let metrics = BalloonMetrics::default();
    common::for_each_chain(data, |mem, chain| {
        let ranges: Vec<(u64, u64)> = chain
            .clone()
            .map(|d| (d.addr().0, u64::from(d.len())))
            .collect();
        let mut before = vec![0u8; common::MEM_SIZE];
        mem.read_slice(&mut before, GuestAddress(0))
            .expect("reading guest memory");
        let given_back = process(mem, chain, &metrics);
        let reported: u64 = ranges.iter().map(|r| r.1).sum();
        assert!(given_back <= reported);
        let mut after = vec![0u8; common::MEM_SIZE];
        mem.read_slice(&mut after, GuestAddress(0))
            .expect("reading guest memory");
        // A byte may only change (to zero) inside a range the chain named.
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            if b != a {
                let i = i as u64;
                assert_eq!(*a, 0);
                assert!(ranges
                    .iter()
                    .any(|&(addr, len)| addr <= i && i - addr < len));
            }
        }
    });
});
