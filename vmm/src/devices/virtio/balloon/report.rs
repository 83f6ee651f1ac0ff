//! A free page report: one chain of device-writable descriptors, each a range of guest RAM
//! the guest has freed, whose memory goes back to the host.

use std::sync::atomic::Ordering;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::metrics::BalloonMetrics;
use crate::devices::virtio::queue::{validate_chain, Direction};
use crate::vstate::memory::{discard, DiscardError};

/// Discards every range of the report `chain`, unless the chain is malformed (a readable or
/// empty descriptor, a loop, a range outside guest RAM): then nothing is discarded and the
/// report counts as invalid. Returns the bytes given back.
pub fn process(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    metrics: &BalloonMetrics,
) -> u64 {
    metrics.reports.fetch_add(1, Ordering::Relaxed);
    // Nobody writes into the buffers: the device only drops the memory behind them. Linux
    // marks them device-writable.
    if let Err(e) = validate_chain(&chain, Direction::DeviceWrites, u64::MAX) {
        metrics.invalid_descriptors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("balloon: report dropped: {e}");
        return 0;
    }
    let mut given_back = 0;
    for desc in chain {
        metrics.reported_ranges.fetch_add(1, Ordering::Relaxed);
        match discard(mem, desc.addr(), u64::from(desc.len())) {
            Ok(n) => given_back += n,
            // Validated above, so only a range across two regions gets here.
            Err(DiscardError::OutOfRange { .. }) => {
                metrics.invalid_descriptors.fetch_add(1, Ordering::Relaxed);
            }
            Err(e @ DiscardError::Host(_)) => {
                metrics.discard_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("balloon: {e}");
            }
        }
    }
    metrics
        .discarded_bytes
        .fetch_add(given_back, Ordering::Relaxed);
    given_back
}
