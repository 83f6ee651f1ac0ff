//! The first real boot: our vmlinux and initramfs under QEMU, the agent
//! reached from the host through the hybrid-vsock convention.

use std::time::{Duration, Instant};

use carapace_e2e::{status_kib, TestVm, VmOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_answers_health_with_its_version() {
    let mut vm = TestVm::boot().await;
    let first = vm.first_health().clone();
    assert_eq!(first.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(first.api_version, carapace_agent_api::API_VERSION);
    assert_eq!(first.min_api_version, carapace_agent_api::MIN_API_VERSION);

    // A second call on the same channel, later: the agent keeps serving and
    // its uptime moves forward.
    let again = vm.agent().health().await.expect("second health call");
    assert_eq!(again.agent_version, first.agent_version);
    assert!(again.uptime_ms >= first.uptime_ms);

    // The agent logs to the console as init: one start-up line, once it has announced
    // itself (so it may still be on its way when the first call is answered).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut console = vm.console();
    while !console.contains("listening on vsock port 1024; announced to the host")
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        console = vm.console();
    }
    assert!(
        console.contains("listening on vsock port 1024; announced to the host"),
        "console: {console}"
    );
    assert!(
        !console.contains("guest base mounts ready"),
        "start-up progress is not logged at INFO on the console: {console}"
    );
    eprintln!("boot to agent ready: {:?}", vm.boot_time());
    vm.shutdown().await;
}

/// Free page reporting with the qemu driver (its balloon, `vm.free_page_reporting`): the
/// guest frees its initramfs once it has unpacked it, reports it, and QEMU gives that memory
/// back to the host. So the same guest holds less resident RAM with the balloon than
/// without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_page_reporting_gives_freed_guest_memory_back_under_qemu() {
    let with = TestVm::boot_with(VmOptions {
        free_page_reporting: true,
        ..VmOptions::default()
    })
    .await;
    let without = TestVm::boot().await;
    // QEMU's guest RAM is a memfd: its shared memory.
    let resident = |vm: &TestVm| status_kib(vm.handle().monitor.pid, "RssShmem");
    // The guest reports free pages about 2 s after they were freed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while resident(&with) + 2048 > resident(&without) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (w, wo) = (resident(&with), resident(&without));
    eprintln!("guest RAM resident: {w} KiB with free page reporting, {wo} KiB without");
    assert!(
        w > 0 && w + 2048 <= wo,
        "with the balloon the guest holds at least 2 MiB less: {w} against {wo} KiB"
    );
    assert!(
        with.console().contains("announced to the host"),
        "the guest runs normally with the balloon"
    );
    with.shutdown().await;
    without.shutdown().await;
}
