//! Every chain the guest offers, served as a virtio-blk request against a small disk: the
//! device answers with a status byte or drops the chain, and never panics, reports more bytes
//! than the chain can take, or writes outside the disk.
#![no_main]

mod common;

use std::fs::File;
use std::sync::OnceLock;

use carapace_vmm::devices::virtio::block::metrics::BlockMetrics;
use carapace_vmm::devices::virtio::block::request::{process, Disk};
use libfuzzer_sys::fuzz_target;

const SECTORS: u64 = 16;
const DISK_LEN: u64 = SECTORS * 512;

/// One unlinked file, opened once: every run writes into the same 8 KiB.
fn disk_file() -> &'static File {
    static FILE: OnceLock<File> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("carapace-fuzz-disk-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("creating the fuzz disk");
        let _ = std::fs::remove_file(&path);
        file.set_len(DISK_LEN).expect("sizing the fuzz disk");
        file
    })
}

fuzz_target!(|data: &[u8]| {
    let disk = Disk {
        file: disk_file().try_clone().expect("dup of the fuzz disk"),
        sectors: SECTORS,
        // The first input byte picks the mode: both must hold.
        read_only: data.first().is_some_and(|b| b & 1 == 1),
    };
    let metrics = BlockMetrics::default();
    common::for_each_chain(data, |mem, chain| {
        let writable: u64 = chain
            .clone()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum();
        if let Some(used) = process(mem, chain, &disk, &metrics) {
            assert!(used >= 1 && u64::from(used) <= writable);
        }
    });
    assert_eq!(disk.file.metadata().expect("fuzz disk").len(), DISK_LEN);
});
