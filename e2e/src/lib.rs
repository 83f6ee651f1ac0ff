//! End-to-end test fixtures: the real guest kernel and agent in a real VM.
//!
//! [`TestVm::boot`] starts a VM with the runtime's qemu driver (KVM where the
//! host has hardware virtualization, TCG otherwise), waits until the agent
//! answers through the hybrid-vsock socket, and hands out an agent client.
//! If the test fails while the VM is alive, the guest's console log is kept
//! under `<target dir>/e2e-logs/` and its tail is printed.
//!
//! Guest artifacts come from `CARAPACE_GUEST_DIR` (default
//! `<target dir>/guest`, where `cargo xtask guest` puts them). A missing
//! artifact fails the test with the command that builds it: nothing here
//! skips.

use std::path::{Path, PathBuf};
use std::time::Duration;

use carapace::agent_client::AgentClient;
use carapace::vm::qemu::QemuDriver;
use carapace::vm::VmSpec;
use carapace::vm::{StartedVm, VmHandle};
use carapace_agent_api::v1::HealthResponse;

pub mod cri;
pub mod daemon;
pub mod fake_apiserver;
pub mod node;
/// The demo image builder, shared with `cargo xtask busybox-image`.
#[path = "../../xtask/src/oci_image.rs"]
pub mod oci_image;
/// A local registry (Debian's docker-registry), shared with the runtime's
/// image tests.
#[path = "../../runtime/tests/support/registry.rs"]
pub mod registry;
pub mod streaming_client;

/// How long a boot may take before the test fails. TCG on a loaded 2-core
/// machine is slow; a healthy boot takes about a second.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The guest kernel and initramfs to boot.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestArtifacts {
    /// Finds the artifacts; panics with the command that builds them.
    pub fn locate() -> Self {
        let dir = std::env::var_os("CARAPACE_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| target_dir().join("guest"));
        let artifacts = GuestArtifacts {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initramfs.cpio"),
        };
        for path in [&artifacts.kernel, &artifacts.initrd] {
            assert!(
                path.is_file(),
                "guest artifact {} is missing: build it with `cargo xtask guest`",
                path.display()
            );
        }
        artifacts
    }
}

/// A `VmRSS`-style field of `/proc/<pid>/status`, in KiB (0 if the process or field is
/// gone).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The busybox demo image (an OCI layout directory, one uncompressed
/// layer) from `CARAPACE_BUSYBOX_IMAGE` (default `<target dir>/images/busybox`);
/// panics with the command that builds it.
pub fn busybox_image() -> PathBuf {
    let layout = std::env::var_os("CARAPACE_BUSYBOX_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("images/busybox"));
    assert!(
        layout.join("index.json").is_file(),
        "the busybox image {} is missing: build it with `cargo xtask busybox-image`",
        layout.display()
    );
    layout
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Options for [`TestVm::boot_with`].
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub vcpus: u8,
    pub mem_mib: u32,
    pub extra_cmdline: String,
    /// A host directory shared with the guest over virtio-fs (virtiofsd),
    /// under the tag [`carapace::vm::SHARED_FS_TAG`]; the guest mounts it
    /// when asked to (SetupSandbox).
    pub shared_dir: Option<PathBuf>,
    /// A virtio-balloon device with free page reporting (`vm.free_page_reporting`).
    pub free_page_reporting: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            vcpus: 1,
            mem_mib: 256,
            extra_cmdline: String::new(),
            shared_dir: None,
            free_page_reporting: false,
        }
    }
}

/// A booted guest whose agent answered.
pub struct TestVm {
    vm: Option<StartedVm>,
    run_dir: tempfile::TempDir,
    agent: AgentClient,
    first_health: HealthResponse,
    boot_time: Duration,
    start_time: Duration,
}

impl TestVm {
    /// Boots the guest with default options.
    pub async fn boot() -> TestVm {
        Self::boot_with(VmOptions::default()).await
    }

    /// Boots the guest; panics (with the console log) if the agent does not
    /// answer within [`BOOT_TIMEOUT`].
    pub async fn boot_with(options: VmOptions) -> TestVm {
        let artifacts = GuestArtifacts::locate();
        let driver = QemuDriver::from_host()
            .expect("the qemu driver needs its tools")
            .with_free_page_reporting(options.free_page_reporting);
        let run_dir = tempfile::Builder::new()
            .prefix("carapace-e2e-")
            .tempdir()
            .expect("creating the VM run directory");
        let spec = VmSpec {
            kernel: artifacts.kernel,
            initrd: artifacts.initrd,
            vcpus: options.vcpus,
            mem_mib: options.mem_mib,
            extra_cmdline: options.extra_cmdline,
            run_dir: run_dir.path().to_owned(),
            shared_dir: options.shared_dir,
            network: None,
        };
        let start_called = std::time::Instant::now();
        let vm = driver.start(&spec).await.expect("starting the VM");
        let started = vm.started_at();
        match vm.wait_agent(BOOT_TIMEOUT).await {
            Ok((agent, first_health)) => TestVm {
                boot_time: started.elapsed(),
                start_time: start_called.elapsed(),
                vm: Some(vm),
                run_dir,
                agent,
                first_health,
            },
            Err(e) => {
                let console = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
                let kept = keep_logs(run_dir.path());
                vm.stop().await;
                panic!(
                    "the guest agent did not answer: {e}\nlogs kept in {}\n--- guest console ---\n{console}",
                    kept.display()
                );
            }
        }
    }

    /// The agent client.
    pub fn agent(&mut self) -> &mut AgentClient {
        &mut self.agent
    }

    /// The first Health answer, received when the VM became ready.
    pub fn first_health(&self) -> &HealthResponse {
        &self.first_health
    }

    /// From QEMU's start to the agent's first Health answer.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// From the driver's `start()` (device backends included) to the
    /// agent's first Health answer.
    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    /// The guest's console output so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.run_dir.path().join("console.log")).unwrap_or_default()
    }

    /// The VM's processes, to observe or kill them from a test.
    pub fn handle(&self) -> &VmHandle {
        &self.vm.as_ref().expect("the VM is running").handle
    }

    /// Stops the VM and removes its run directory.
    pub async fn shutdown(mut self) {
        if let Some(vm) = self.vm.take() {
            vm.stop().await;
        }
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = keep_logs(self.run_dir.path());
            let console = self.console();
            let tail: String = {
                let lines: Vec<&str> = console.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            };
            eprintln!(
                "test failed with the VM running; logs kept in {}\n--- guest console (tail) ---\n{tail}",
                kept.display()
            );
        }
        // VM processes outlive their handles by design (they must survive
        // a daemon restart); a test VM must not outlive its test.
        if let Some(vm) = self.vm.take() {
            vm.handle.kill_now();
        }
    }
}

/// Copies the VM's log files out of its run directory (which is removed
/// with the fixture) into `<target dir>/e2e-logs/<unique>/`.
fn keep_logs(run_dir: &Path) -> PathBuf {
    let unique = format!("{}-{}", std::process::id(), unix_nanos());
    let dest = target_dir().join("e2e-logs").join(unique);
    if std::fs::create_dir_all(&dest).is_ok() {
        if let Ok(entries) = std::fs::read_dir(run_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let _ = std::fs::copy(&path, dest.join(entry.file_name()));
                }
            }
        }
    }
    dest
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
