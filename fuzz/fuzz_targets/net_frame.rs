//! Every chain the guest offers, as a virtio-net transmit chain (gathered into the device's
//! 64 KiB buffer) and as a receive chain (a frame written into it): the device uses a chain
//! or refuses it, and never panics or reports more than the buffer or the chain holds.
#![no_main]

mod common;

use carapace_vmm::devices::virtio::net::{read_tx_frame, write_rx_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = vec![0u8; 64 << 10];
    // A frame of the length the input's last byte asks for (vnet header + Ethernet + data).
    let frame = vec![0x5au8; 26 + usize::from(data.last().copied().unwrap_or(0)) * 64];
    common::for_each_chain(data, |mem, chain| {
        if let Ok(n) = read_tx_frame(mem, chain.clone(), &mut buf) {
            assert!((26..=buf.len()).contains(&n));
        }
        if let Ok(Some(n)) = write_rx_frame(mem, chain, &frame) {
            assert_eq!(n as usize, frame.len());
        }
    });
});
