//! KVM tests on this host's /dev/kvm: synthetic guest payloads go through our whole boot
//! path (config, ELF loader, zero page, e820, command line, GDT, page tables, registers,
//! buses, devices) and report what they see over port I/O and MMIO. They fail, never skip,
//! when /dev/kvm is missing.

mod common;

use std::time::{Duration, Instant};

use carapace_vmm::builder::build_vm;
use carapace_vmm::config::VmConfig;
use carapace_vmm::vmm::Vmm;
use carapace_vmm::vstate::vcpu::ExitReason;
use common::*;
use serde_json::Value;

fn build(dir: &std::path::Path, code: &[u8], extra: &str) -> Vmm {
    require_kvm();
    let kernel = write_kernel(dir, code);
    let cfg = VmConfig::from_json(&config_json(dir, &kernel, extra))
        .unwrap()
        .validate()
        .unwrap();
    build_vm(&cfg).expect("build the VM")
}

/// Runs `vmm` on a thread of its own, as the binary's main thread does: `run` confines the
/// calling thread with the event-loop seccomp filter (and each vCPU thread with its own), and
/// the teardown (`drop`) happens under that filter too, so these tests prove the allow-lists
/// complete for their paths. A watchdog on the test thread stops the VM after `limit`, so a
/// broken payload fails instead of hanging. Returns why it stopped, how long `run` took, and
/// the metrics taken just before the teardown.
fn run_confined(mut vmm: Vmm, limit: Duration) -> (ExitReason, Duration, Value) {
    let stop = vmm.stop_handle().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(limit).is_err() {
            stop.stop();
        }
    });
    let result = std::thread::spawn(move || {
        let start = Instant::now();
        let reason = vmm.run().unwrap();
        let took = start.elapsed();
        let metrics = vmm.metrics();
        drop(vmm);
        (reason, took, metrics)
    })
    .join()
    .expect("the event-loop thread panicked");
    let _ = tx.send(());
    watchdog.join().unwrap();
    result
}

fn console(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("console.log")).unwrap_or_default()
}

#[test]
fn payload_reads_e820_cmdline_and_mmio_where_linux_looks() {
    let dir = tempfile::tempdir().unwrap();
    let vsock = format!(
        r#", "vsock": {{"guest_cid": 3, "uds_path": "{}"}}"#,
        dir.path().join("v.sock").display()
    );
    let vmm = build(dir.path(), ZERO_PAGE_REPORTER, &vsock);
    let expected_cmdline = vmm.cmdline().to_string();
    assert_eq!(
        expected_cmdline,
        "console=ttyS0 carapace.test=1 virtio_mmio.device=4K@0xd0000000:5"
    );
    let (reason, _, _) = run_confined(vmm, Duration::from_secs(10));
    assert_eq!(reason, ExitReason::Reset);

    let out = console(dir.path());
    let mut at = 0;
    let mut take = |n: usize| {
        let s = out
            .get(at..at + n)
            .unwrap_or_else(|| panic!("short output: {out:?}"));
        at += n;
        s.to_vec()
    };
    let entries = take(1)[0] as usize;
    let mut e820 = Vec::new();
    for _ in 0..entries {
        let e = take(20);
        let addr = u64::from_le_bytes(e[0..8].try_into().unwrap());
        let size = u64::from_le_bytes(e[8..16].try_into().unwrap());
        let ty = u32::from_le_bytes(e[16..20].try_into().unwrap());
        e820.push((addr, size, ty));
    }
    assert_eq!(
        e820,
        vec![(0, 0x9fc00, 1), (0x10_0000, (64 << 20) - 0x10_0000, 1)]
    );
    let ptr = u32::from_le_bytes(take(4).try_into().unwrap());
    assert_eq!(ptr, 0x20000);
    let rest = &out[at..];
    let nul = rest
        .iter()
        .position(|b| *b == 0)
        .expect("NUL-terminated cmdline");
    assert_eq!(std::str::from_utf8(&rest[..nul]).unwrap(), expected_cmdline);
    let magic = &rest[nul + 1..];
    assert_eq!(
        magic, b"virt",
        "virtio-mmio magic read through our MMIO bus"
    );
    // The socket is gone with the VM.
    assert!(!dir.path().join("v.sock").exists());
}

#[test]
fn serial_output_reaches_the_console_file() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = build(dir.path(), HELLO, "");
    let (reason, _, metrics) = run_confined(vmm, Duration::from_secs(10));
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(console(dir.path()), b"Hello from the guest\n");
    assert_eq!(metrics["serial"]["tx_bytes"], 21);
    assert!(metrics["vcpus"][0]["io_out"].as_u64().unwrap() >= 22);
}

#[test]
fn halted_guest_is_stopped_cleanly_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = build(dir.path(), HALT_FOREVER, "");
    let (reason, took, _) = run_confined(vmm, Duration::from_millis(300));
    // With the in-kernel irqchip a halted vCPU sleeps in KVM; the stop request kicks it.
    assert_eq!(reason, ExitReason::Stopped);
    assert!(took < Duration::from_secs(5));
    assert_eq!(console(dir.path()), b"H");
}

#[test]
fn triple_fault_ends_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = build(dir.path(), TRIPLE_FAULT, "");
    let (reason, _, _) = run_confined(vmm, Duration::from_secs(10));
    assert_eq!(console(dir.path()), b"T");
    assert_eq!(reason, ExitReason::Shutdown);
}

#[test]
fn several_vcpus_start_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    require_kvm();
    let kernel = write_kernel(dir.path(), HALT_FOREVER);
    let json = config_json(dir.path(), &kernel, "").replace("\"vcpus\": 1", "\"vcpus\": 4");
    let cfg = VmConfig::from_json(&json).unwrap().validate().unwrap();
    let vmm = build_vm(&cfg).unwrap();
    let (reason, _, metrics) = run_confined(vmm, Duration::from_millis(300));
    assert_eq!(reason, ExitReason::Stopped);
    assert_eq!(metrics["vcpus"].as_array().unwrap().len(), 4);
    // Only the boot processor runs: with the in-kernel LAPIC the others wait for
    // INIT/SIPI exactly as on real hardware (Linux starts them that way), and being parked
    // in KVM does not keep them from stopping.
    assert_eq!(console(dir.path()), b"H");
}
