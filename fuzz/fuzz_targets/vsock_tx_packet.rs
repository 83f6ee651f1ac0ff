//! Every chain the guest offers, parsed as a vsock transmit packet and as a receive buffer:
//! the parsers must return an error, never panic, loop or read outside guest memory.
#![no_main]

mod common;

use carapace_vmm::devices::virtio::vsock::packet::{read_tx_packet, rx_payload_capacity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::for_each_chain(data, |mem, chain| {
        if let Ok(pkt) = read_tx_packet(mem, chain.clone()) {
            assert_eq!(pkt.data.len(), pkt.hdr.len as usize);
        }
        if let Ok(cap) = rx_payload_capacity(&chain) {
            assert!(cap <= carapace_vmm::devices::virtio::vsock::packet::MAX_PKT_PAYLOAD);
        }
    });
});
