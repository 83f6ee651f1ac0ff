//! Process spawn → first guest output of `carapace-vmm` on this host's KVM, for one or more
//! builds side by side: the host part of `e2e/benches/node_vmm.rs` (same payload, config and
//! spawn-and-poll loop), without the nested test node, so it can be repeated cheaply.
//!
//! `cargo run --release -p carapace-vmm --example start_latency -- 50 old=/path/a new=/path/b`
//!
//! Runs alternate between the binaries (run 1 of each, then run 2 of each, ...), so a change in
//! the host's load hits all of them alike; prints the load average before and after and, per
//! binary, the median, quartiles and minimum.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A minimal ELF whose code writes '!' to COM1 and resets through the i8042 (the same bytes
/// as the e2e benchmark's payload).
fn first_output_payload() -> Vec<u8> {
    // mov dx, 0x3f8 ; mov al, '!' ; out dx, al ; mov al, 0xfe ; out 0x64, al ; hlt
    let code = [
        0x66, 0xba, 0xf8, 0x03, 0xb0, 0x21, 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
    ];
    const LOAD: u64 = 0x10_0000;
    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // entry
    f.extend_from_slice(&64u64.to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // offset
    f.extend_from_slice(&LOAD.to_le_bytes()); // vaddr
    f.extend_from_slice(&LOAD.to_le_bytes()); // paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    f.resize(0x1000, 0);
    f.extend_from_slice(&code);
    f
}

/// One run: spawn → first console byte, and spawn → exit, in milliseconds.
fn run_once(vmm: &Path, dir: &Path, kernel: &Path, tag: &str) -> (f64, f64) {
    let console = dir.join(format!("console-{tag}.log"));
    let config = dir.join(format!("vm-{tag}.json"));
    std::fs::write(
        &config,
        format!(
            r#"{{"vcpus": 1, "mem_size_mib": 128, "kernel": "{}", "serial": {{"file": "{}"}}}}"#,
            kernel.display(),
            console.display()
        ),
    )
    .expect("writing the config");
    let start = Instant::now();
    let mut child = Command::new(vmm)
        .arg("--config")
        .arg(&config)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", vmm.display()));
    let mut seen = None;
    let status = loop {
        if seen.is_none() && std::fs::metadata(&console).is_ok_and(|m| m.len() > 0) {
            seen = Some(start.elapsed());
        }
        if let Some(s) = child.try_wait().expect("waiting") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("{} did not finish", vmm.display());
        }
        std::hint::spin_loop();
    };
    assert!(status.success(), "{} failed: {status}", vmm.display());
    let end = start.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(seen.unwrap_or(end)), ms(end))
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: start_latency RUNS LABEL=PATH-TO-carapace-vmm...";
    let runs: usize = args.next().and_then(|r| r.parse().ok()).expect(usage);
    let builds: Vec<(String, PathBuf)> = args
        .map(|a| {
            let (label, path) = a.split_once('=').expect(usage);
            (label.to_string(), PathBuf::from(path))
        })
        .collect();
    assert!(runs > 0 && !builds.is_empty(), "{usage}");
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("payload.elf");
    std::fs::write(&kernel, first_output_payload()).expect("writing the payload");
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average before: {}", load().trim());
    let mut first = vec![Vec::new(); builds.len()];
    let mut exit = vec![Vec::new(); builds.len()];
    for i in 0..runs {
        for (j, (label, vmm)) in builds.iter().enumerate() {
            let (f, e) = run_once(vmm, dir.path(), &kernel, &format!("{label}-{i}"));
            first[j].push(f);
            exit[j].push(e);
        }
    }
    println!("load average after:  {}", load().trim());
    for (j, (label, _)) in builds.iter().enumerate() {
        first[j].sort_by(f64::total_cmp);
        exit[j].sort_by(f64::total_cmp);
        let f = &first[j];
        println!(
            "{label}: spawn -> first guest output median {:.2} ms (p25 {:.2}, p75 {:.2}, min {:.2}); \
             -> exit median {:.2} ms; {runs} runs",
            quantile(f, 0.5),
            quantile(f, 0.25),
            quantile(f, 0.75),
            f[0],
            quantile(&exit[j], 0.5),
        );
    }
}
