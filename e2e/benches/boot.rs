//! Boot-to-agent-ready time: from spawning QEMU to the agent's first Health
//! answer over vsock, for our kernel and initramfs. Prints every run and the
//! median. `cargo bench -p carapace-e2e --bench boot` (runs: BOOT_RUNS, 5).
//!
//! With `BOOT_VIRTIOFS=1` every run boots twice, interleaved: without and
//! with a virtio-fs shared directory (virtiofsd), and both the time from
//! QEMU's start and from the driver's `start()` (backends included) are
//! printed, so that what virtio-fs adds is measured side by side.

use std::time::Duration;

use carapace_e2e::{TestVm, VmOptions};

fn main() {
    let runs: usize = std::env::var("BOOT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let compare_virtiofs = std::env::var_os("BOOT_VIRTIOFS").is_some_and(|v| v == "1");
    let extra_cmdline = std::env::var("BOOT_CMDLINE").unwrap_or_default();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let share = tempfile::tempdir().expect("a shared directory");
    let variants: Vec<(&str, Option<std::path::PathBuf>)> = if compare_virtiofs {
        vec![
            ("without virtio-fs", None),
            ("with virtio-fs", Some(share.path().to_owned())),
        ]
    } else {
        vec![("", None)]
    };
    let mut times = vec![Vec::with_capacity(runs); variants.len()];
    let mut start_times = vec![Vec::with_capacity(runs); variants.len()];
    for run in 1..=runs {
        for (i, (label, shared_dir)) in variants.iter().enumerate() {
            let (boot, start) = runtime.block_on(async {
                let vm = TestVm::boot_with(VmOptions {
                    shared_dir: shared_dir.clone(),
                    extra_cmdline: extra_cmdline.clone(),
                    ..VmOptions::default()
                })
                .await;
                let times = (vm.boot_time(), vm.start_time());
                vm.shutdown().await;
                times
            });
            if compare_virtiofs {
                println!(
                    "run {run} {label:>17}: QEMU start -> agent health answered: {:>4} ms, start() -> answered: {:>4} ms",
                    boot.as_millis(),
                    start.as_millis()
                );
            } else {
                println!(
                    "run {run}: QEMU start -> agent health answered: {:>4} ms",
                    boot.as_millis()
                );
            }
            times[i].push(boot);
            start_times[i].push(start);
        }
    }
    for (i, (label, _)) in variants.iter().enumerate() {
        let boot = summary(&mut times[i]);
        if compare_virtiofs {
            let start = summary(&mut start_times[i]);
            println!("{label}: boot-to-agent-ready {boot}; start()-to-agent-ready {start}");
        } else {
            println!("boot-to-agent-ready: {boot} over {runs} boots");
        }
    }
}

/// "median X ms, min Y ms, max Z ms".
fn summary(times: &mut [Duration]) -> String {
    times.sort();
    format!(
        "median {} ms, min {} ms, max {} ms",
        times[times.len() / 2].as_millis(),
        times[0].as_millis(),
        times[times.len() - 1].as_millis()
    )
}
