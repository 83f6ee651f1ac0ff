//! Boot-to-agent-ready time: from spawning QEMU to the agent's first Health
//! answer over vsock, for our kernel and initramfs. Prints every run and the
//! median. `cargo bench -p carapace-e2e --bench boot` (runs: BOOT_RUNS, 5).

use std::time::Duration;

use carapace_e2e::TestVm;

fn main() {
    let runs: usize = std::env::var("BOOT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut times = Vec::with_capacity(runs);
    let mut guest_uptimes = Vec::with_capacity(runs);
    for run in 1..=runs {
        let (boot, uptime) = runtime.block_on(async {
            let vm = TestVm::boot().await;
            let boot = vm.boot_time();
            let uptime = Duration::from_millis(vm.first_health().uptime_ms);
            vm.shutdown().await;
            (boot, uptime)
        });
        println!(
            "run {run}: QEMU start -> agent health answered: {:>4} ms",
            boot.as_millis()
        );
        times.push(boot);
        guest_uptimes.push(uptime);
    }
    times.sort();
    println!(
        "boot-to-agent-ready: median {} ms, min {} ms, max {} ms over {runs} boots",
        times[runs / 2].as_millis(),
        times[0].as_millis(),
        times[runs - 1].as_millis()
    );
}
