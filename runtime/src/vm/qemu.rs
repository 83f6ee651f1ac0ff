//! The `qemu` driver: `qemu-system-x86_64 -M microvm`, with KVM where the host
//! has hardware virtualization and TCG otherwise, and `vhost-device-vsock` as
//! the vsock backend, whose `--uds-path` socket is the hybrid-vsock host side.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use carapace_agent_api::v1::HealthResponse;

use super::process::VmProcess;
use super::{find_in_path, VmSpec};
use crate::agent_client::{AgentClient, AgentError};
use crate::agent_ready::ReadyListener;
use crate::host::KvmKind;

/// Kernel command-line words that shorten a boot under TCG: skip the
/// delay-loop calibration (`lpj`, close to what TCG calibrates anyway; only
/// udelay() uses it and our guest's drivers do not depend on exact delays)
/// and the rewriting of SMP lock prefixes, which is slow under emulation.
/// Under KVM neither costs anything noticeable, so they are not used there.
const TCG_CMDLINE: &str = "noreplace-smp lpj=1000000";

/// How long the vsock backend may take to create its vhost-user socket.
const BACKEND_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a VM may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Errors of the qemu driver.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{0} not found in PATH (run the setup script)")]
    MissingTool(&'static str),
    #[error("VM spec: {0}")]
    InvalidSpec(String),
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("vsock backend did not come up: {0}")]
    BackendNotReady(String),
    #[error(transparent)]
    Ready(crate::agent_ready::ReadyError),
}

/// Which accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM when the host offers hardware KVM, TCG otherwise (PVM cannot boot
    /// Linux guests).
    pub fn for_host(kind: KvmKind) -> Self {
        match kind {
            KvmKind::Hardware => Accel::Kvm,
            KvmKind::Pvm | KvmKind::None => Accel::Tcg,
        }
    }
}

/// Starts VMs with QEMU.
#[derive(Debug, Clone)]
pub struct QemuDriver {
    qemu: PathBuf,
    vsock_backend: PathBuf,
    accel: Accel,
}

impl QemuDriver {
    /// Finds QEMU and the vsock backend in `$PATH` and picks the accelerator
    /// from what the host offers.
    pub fn from_host() -> Result<Self, QemuError> {
        Ok(Self {
            qemu: find_in_path("qemu-system-x86_64")
                .ok_or(QemuError::MissingTool("qemu-system-x86_64"))?,
            vsock_backend: find_in_path("vhost-device-vsock")
                .ok_or(QemuError::MissingTool("vhost-device-vsock"))?,
            accel: Accel::for_host(KvmKind::detect()),
        })
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The QEMU command line for `spec` (without the binary).
    pub fn qemu_args(&self, spec: &VmSpec, vhost_socket: &Path) -> Vec<String> {
        let mem = spec.mem_mib;
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        let mut args: Vec<String> = [
            "-M",
            // acpi=off: our kernel has no ACPI, and only then does QEMU put
            // the virtio-mmio devices on the kernel command line.
            "microvm,memory-backend=mem,acpi=off,x-option-roms=off,rtc=off",
            "-accel",
            accel,
            "-cpu",
            cpu,
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        args.extend([
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{mem}M"),
            // vhost-user backends need the guest RAM in a shareable memfd.
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-chardev".into(),
            format!("file,id=console,path={}", spec.console_log().display()),
            "-serial".into(),
            "chardev:console".into(),
            "-chardev".into(),
            format!("socket,id=vsock,path={}", vhost_socket.display()),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock".into(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-initrd".into(),
            spec.initrd.display().to_string(),
            "-append".into(),
            match self.accel {
                Accel::Kvm => spec.cmdline(),
                Accel::Tcg => format!("{} {TCG_CMDLINE}", spec.cmdline()),
            },
        ]);
        args
    }

    /// Starts the vsock backend, then QEMU. Returns once QEMU runs; the agent
    /// is ready when it answers (see `AgentClient::wait_ready`). The
    /// processes run detached from the daemon (see [`VmProcess`]).
    pub async fn start(&self, spec: &VmSpec) -> Result<QemuVm, QemuError> {
        validate(spec)?;
        let vhost_socket = spec.run_dir.join("vhost-vsock.sock");
        let vsock_socket = spec.vsock_socket();
        for stale in [&vhost_socket, &vsock_socket] {
            let _ = std::fs::remove_file(stale);
        }

        let mut backend_cmd = Command::new(&self.vsock_backend);
        backend_cmd.arg("--vm").arg(format!(
            "guest-cid=3,socket={},uds-path={}",
            vhost_socket.display(),
            vsock_socket.display()
        ));
        let backend = VmProcess::spawn(
            "vhost-device-vsock",
            backend_cmd,
            &spec.run_dir.join("vsock-backend.log"),
        )
        .map_err(|source| QemuError::Spawn {
            what: "vhost-device-vsock",
            source,
        })?;
        if let Err(e) = wait_for_socket(&backend, &vhost_socket).await {
            backend.kill_now();
            let log =
                std::fs::read_to_string(spec.run_dir.join("vsock-backend.log")).unwrap_or_default();
            return Err(QemuError::BackendNotReady(format!(
                "{e}; its log: {}",
                log.trim()
            )));
        }

        // Bound before the guest runs, so its announcement cannot be missed.
        let ready = match ReadyListener::bind(&vsock_socket) {
            Ok(ready) => ready,
            Err(e) => {
                backend.kill_now();
                return Err(QemuError::Ready(e));
            }
        };

        let started_at = Instant::now();
        let mut qemu_cmd = Command::new(&self.qemu);
        qemu_cmd.args(self.qemu_args(spec, &vhost_socket));
        let qemu = match VmProcess::spawn("qemu", qemu_cmd, &spec.run_dir.join("qemu.log")) {
            Ok(qemu) => qemu,
            Err(source) => {
                backend.kill_now();
                return Err(QemuError::Spawn {
                    what: "qemu-system-x86_64",
                    source,
                });
            }
        };
        Ok(QemuVm {
            handle: QemuHandle {
                qemu,
                backend,
                vsock_socket,
                vhost_socket,
                console_log: spec.console_log(),
            },
            ready,
            started_at,
        })
    }
}

/// The longest path a unix socket can be bound to (`sun_path` minus NUL).
const MAX_SOCKET_PATH: usize = 107;

fn validate(spec: &VmSpec) -> Result<(), QemuError> {
    let longest = spec.run_dir.join("vhost-vsock.sock");
    if longest.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(QemuError::InvalidSpec(format!(
            "run_dir {} is too long for unix socket paths (at most {} bytes with the socket name)",
            spec.run_dir.display(),
            MAX_SOCKET_PATH
        )));
    }
    for (what, path) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
        if !path.is_file() {
            return Err(QemuError::InvalidSpec(format!(
                "{what} {} is not a file",
                path.display()
            )));
        }
    }
    if spec.vcpus == 0 {
        return Err(QemuError::InvalidSpec("vcpus must be at least 1".into()));
    }
    if spec.mem_mib < 64 {
        return Err(QemuError::InvalidSpec("mem_mib must be at least 64".into()));
    }
    if !spec.run_dir.is_dir() {
        return Err(QemuError::InvalidSpec(format!(
            "run_dir {} is not a directory",
            spec.run_dir.display()
        )));
    }
    Ok(())
}

async fn wait_for_socket(backend: &VmProcess, socket: &Path) -> Result<(), QemuError> {
    let deadline = Instant::now() + BACKEND_READY_TIMEOUT;
    loop {
        if socket.exists() {
            return Ok(());
        }
        if !backend.is_running() {
            return Err(QemuError::BackendNotReady("it exited".into()));
        }
        if Instant::now() >= deadline {
            return Err(QemuError::BackendNotReady(format!(
                "no socket at {} after {BACKEND_READY_TIMEOUT:?}",
                socket.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What identifies a QEMU VM's processes and sockets; recorded with the pod
/// so that a restarted daemon finds the VM again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuHandle {
    pub qemu: VmProcess,
    pub backend: VmProcess,
    pub vsock_socket: PathBuf,
    pub vhost_socket: PathBuf,
    pub console_log: PathBuf,
}

impl QemuHandle {
    /// Whether the VM (QEMU and its vsock backend) still runs.
    pub fn is_running(&self) -> bool {
        self.qemu.is_running() && self.backend.is_running()
    }

    /// Stops the VM: SIGTERM to QEMU, SIGKILL after a grace period, then the
    /// backend; removes the sockets. Stopping a stopped VM is a no-op.
    pub async fn stop(&self) {
        self.qemu.stop(STOP_GRACE).await;
        self.backend.stop(STOP_GRACE).await;
        for socket in [&self.vsock_socket, &self.vhost_socket] {
            let _ = std::fs::remove_file(socket);
        }
    }

    /// Kills both processes at once (synchronous, for `Drop` paths).
    pub fn kill_now(&self) {
        self.qemu.kill_now();
        self.backend.kill_now();
    }
}

/// A QEMU VM just started by this daemon.
#[derive(Debug)]
pub struct QemuVm {
    pub handle: QemuHandle,
    ready: ReadyListener,
    started_at: Instant,
}

impl QemuVm {
    /// The hybrid-vsock socket to reach the guest.
    pub fn vsock_socket(&self) -> &Path {
        &self.handle.vsock_socket
    }

    pub fn console_log(&self) -> &Path {
        &self.handle.console_log
    }

    /// When QEMU was spawned.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// Waits until the agent announces itself, then connects to it and
    /// returns the client and its first Health answer. Fails early if the
    /// VM exits.
    pub async fn wait_agent(
        &self,
        timeout: Duration,
    ) -> Result<(AgentClient, HealthResponse), AgentError> {
        let start = Instant::now();
        self.ready
            .wait(timeout, || self.handle.is_running())
            .await?;
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        AgentClient::wait_ready(&self.handle.vsock_socket, left).await
    }

    /// Stops the VM (see [`QemuHandle::stop`]).
    pub async fn stop(self) {
        self.handle.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> VmSpec {
        VmSpec {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initrd"),
            vcpus: 1,
            mem_mib: 128,
            extra_cmdline: String::new(),
            run_dir: dir.to_owned(),
            shared_dir: None,
        }
    }

    #[test]
    fn command_line_shares_memory_and_wires_vsock() {
        let driver = QemuDriver {
            qemu: "qemu".into(),
            vsock_backend: "vdv".into(),
            accel: Accel::Tcg,
        };
        let dir = Path::new("/run/vm1");
        let args = driver
            .qemu_args(&spec(dir), &dir.join("vhost.sock"))
            .join(" ");
        assert!(args.contains("-accel tcg -cpu max"), "{args}");
        assert!(args.contains("memory-backend-memfd,id=mem,size=128M,share=on"));
        assert!(args.contains("socket,id=vsock,path=/run/vm1/vhost.sock"));
        assert!(args.contains("vhost-user-vsock-device,chardev=vsock"));
        assert!(args.contains("acpi=off"));
        assert!(args.ends_with(&format!(
            "-append {} {TCG_CMDLINE}",
            super::super::BASE_CMDLINE
        )));
    }

    #[test]
    fn kvm_accel_on_hardware_only() {
        assert_eq!(Accel::for_host(KvmKind::Hardware), Accel::Kvm);
        assert_eq!(Accel::for_host(KvmKind::Pvm), Accel::Tcg);
        assert_eq!(Accel::for_host(KvmKind::None), Accel::Tcg);
    }

    #[test]
    fn rejects_invalid_specs() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        assert!(matches!(validate(&s), Err(QemuError::InvalidSpec(m)) if m.contains("kernel")));
        let long = VmSpec {
            run_dir: dir.path().join("x".repeat(100)),
            ..s.clone()
        };
        assert!(
            matches!(validate(&long), Err(QemuError::InvalidSpec(m)) if m.contains("too long"))
        );
        std::fs::write(&s.kernel, b"k").unwrap();
        std::fs::write(&s.initrd, b"i").unwrap();
        assert!(validate(&s).is_ok());
        s.vcpus = 0;
        assert!(validate(&s).is_err());
        s.vcpus = 1;
        s.mem_mib = 1;
        assert!(validate(&s).is_err());
    }
}
