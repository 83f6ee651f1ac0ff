//! The first real boot: our vmlinux and initramfs under QEMU, the agent
//! reached from the host through the hybrid-vsock convention.

use carapace_e2e::TestVm;

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
