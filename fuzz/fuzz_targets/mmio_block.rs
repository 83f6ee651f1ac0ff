//! The guest's whole side of a virtio-blk device: register reads and writes of any offset,
//! size and value through the virtio-mmio transport (bring-up, features, queue setup,
//! activation, reset, config space), queue notifications served as the event loop serves
//! them, and guest memory holding the input itself. The VMM must never panic, and the disk
//! never grows.
//!
//! Input: a count `n`, then `n` operations of 7 bytes (`kind`, offset as le16 masked to the
//! device's 512-byte window, a le32 value); the whole input is also guest memory from 0.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use carapace_vmm::devices::virtio::block::Block;
use carapace_vmm::devices::virtio::{IrqLine, MmioTransport};
use carapace_vmm::devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 0x1_0000;
const DISK_LEN: u64 = 16 * 512;

/// A disk image of 16 sectors, made once per fuzzing process (and left in the temp
/// directory: the device opens it by path on every run).
fn disk_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("carapace-fuzz-mmio-disk-{}", std::process::id()));
        let file = std::fs::File::create(&path).expect("creating the fuzz disk");
        file.set_len(DISK_LEN).expect("sizing the fuzz disk");
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, ops)) = data.split_first() else {
        return;
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let _ = mem.write_slice(&data[..data.len().min(MEM_SIZE)], GuestAddress(0));
    // The count's top bit picks a read-only disk.
    let block = Block::new(disk_path(), n & 0x80 != 0).expect("opening the fuzz disk");
    let irq = IrqLine::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let mut t = MmioTransport::new(mem, Box::new(block), irq).expect("transport");
    for op in ops.chunks_exact(7).take(usize::from(n & 0x7f)) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0x1ff);
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&op[3..7]);
        let size = [1, 2, 4, 8][usize::from((op[0] >> 2) & 3)];
        match op[0] & 3 {
            0 => t.write(offset, &value[..4]),
            1 => t.write(offset, &value[..size]),
            2 => {
                let mut buf = [0u8; 8];
                t.read(offset, &mut buf[..size]);
            }
            _ => {
                // The event loop: a notified queue is served if the device is active.
                let notified: Vec<usize> = (0..t.queue_evts().len())
                    .filter(|&i| t.queue_evts()[i].read().is_ok())
                    .collect();
                for i in notified {
                    if t.device().is_activated() {
                        t.device_mut().process_queue(i);
                    }
                }
            }
        }
    }
    let len = std::fs::metadata(disk_path()).expect("fuzz disk").len();
    assert_eq!(len, DISK_LEN);
});
