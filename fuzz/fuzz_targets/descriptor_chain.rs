//! The descriptor-chain validator every device uses: whatever the guest wrote, it terminates
//! and only accepts chains whose every buffer lies in guest memory.
#![no_main]

mod common;

use carapace_vmm::devices::virtio::queue::{validate_chain, Direction};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryBackend;

fuzz_target!(|data: &[u8]| {
    common::for_each_chain(data, |mem, chain| {
        for dir in [Direction::DeviceReads, Direction::DeviceWrites] {
            for max in [0, 44, 4096, u64::MAX] {
                if let Ok(total) = validate_chain(&chain, dir, max) {
                    assert!(total <= max && total > 0);
                    for desc in chain.clone() {
                        assert!(mem.check_range(desc.addr(), desc.len() as usize));
                    }
                }
            }
        }
    });
});
