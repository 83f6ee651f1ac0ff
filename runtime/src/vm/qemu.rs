//! The `qemu` driver: `qemu-system-x86_64 -M microvm`, with KVM where the host
//! has hardware virtualization and TCG otherwise, `vhost-device-vsock` as
//! the vsock backend, whose `--uds-path` socket is the hybrid-vsock host side,
//! and `virtiofsd` as the virtio-fs backend of the pod's shared directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use carapace_agent_api::v1::HealthResponse;

use super::process::VmProcess;
use super::{find_in_path, VmSpec, SHARED_FS_TAG};
use crate::agent_client::{AgentClient, AgentError};
use crate::agent_ready::ReadyListener;
use crate::host::KvmKind;

/// Kernel command-line words that shorten a boot under TCG: skip the
/// delay-loop calibration (`lpj`, close to what TCG calibrates anyway; only
/// udelay() uses it and our guest's drivers do not depend on exact delays)
/// and the rewriting of SMP lock prefixes, which is slow under emulation;
/// and skip the check that the IO-APIC timer ticks within a few
/// milliseconds of real time (`no_timer_check`): on a loaded host an
/// emulated guest can miss it and panic ("IO-APIC + timer doesn't work"),
/// which was seen with ten pods booting at once on two cores.
/// Under KVM none of this costs anything noticeable, so they are not used there.
const TCG_CMDLINE: &str = "noreplace-smp lpj=1000000 no_timer_check";

/// File names in the VM's run directory.
const VHOST_VSOCK_SOCKET: &str = "vhost-vsock.sock";
const VIRTIOFS_SOCKET: &str = "virtiofs.sock";
const VSOCK_BACKEND_LOG: &str = "vsock-backend.log";
const VIRTIOFSD_LOG: &str = "virtiofsd.log";

/// How long a backend may take to create its vhost-user socket.
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
    #[error("{what} did not come up: {reason}")]
    BackendNotReady { what: &'static str, reason: String },
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
    fs_backend: PathBuf,
    accel: Accel,
}

impl QemuDriver {
    /// Finds QEMU, the vsock backend and virtiofsd in `$PATH` and picks the
    /// accelerator from what the host offers.
    pub fn from_host() -> Result<Self, QemuError> {
        Ok(Self {
            qemu: find_in_path("qemu-system-x86_64")
                .ok_or(QemuError::MissingTool("qemu-system-x86_64"))?,
            vsock_backend: find_in_path("vhost-device-vsock")
                .ok_or(QemuError::MissingTool("vhost-device-vsock"))?,
            fs_backend: find_in_path("virtiofsd").ok_or(QemuError::MissingTool("virtiofsd"))?,
            accel: Accel::for_host(KvmKind::detect()),
        })
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The QEMU command line for `spec` (without the binary).
    pub fn qemu_args(&self, spec: &VmSpec) -> Vec<String> {
        let vhost_socket = spec.run_dir.join(VHOST_VSOCK_SOCKET);
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
        ]);
        if spec.shared_dir.is_some() {
            // The backend is virtiofsd (see `virtiofsd_args`); the tag is
            // QEMU's to announce (virtiofsd's own `--tag` crashes QEMU 7.2).
            args.extend([
                "-chardev".into(),
                format!(
                    "socket,id=fs,path={}",
                    spec.run_dir.join(VIRTIOFS_SOCKET).display()
                ),
                "-device".into(),
                format!("vhost-user-fs-device,chardev=fs,tag={SHARED_FS_TAG}"),
            ]);
        }
        if let Some(net) = &spec.network {
            // The tap is opened by name inside the pod namespace, where
            // QEMU runs; no helper scripts.
            args.extend([
                "-netdev".into(),
                format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap),
                "-device".into(),
                format!("virtio-net-device,netdev=net0,mac={}", net.mac),
            ]);
        }
        args.extend([
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

    /// Starts the vsock backend and, when the VM has a shared directory,
    /// virtiofsd, then QEMU. Returns once QEMU runs; the agent is ready when
    /// it answers (see `AgentClient::wait_ready`). The processes run
    /// detached from the daemon (see [`VmProcess`]); if the start fails,
    /// those already started are killed.
    pub async fn start(&self, spec: &VmSpec) -> Result<QemuVm, QemuError> {
        validate(spec)?;
        let vhost_socket = spec.run_dir.join(VHOST_VSOCK_SOCKET);
        let fs_socket = spec.run_dir.join(VIRTIOFS_SOCKET);
        let vsock_socket = spec.vsock_socket();
        for stale in [&vhost_socket, &fs_socket, &vsock_socket] {
            let _ = std::fs::remove_file(stale);
        }
        let mut started = Started::default();

        let mut backend_cmd = Command::new(&self.vsock_backend);
        backend_cmd.arg("--vm").arg(format!(
            "guest-cid=3,socket={},uds-path={}",
            vhost_socket.display(),
            vsock_socket.display()
        ));
        let backend = started.spawn(
            "vhost-device-vsock",
            backend_cmd,
            &spec.run_dir.join(VSOCK_BACKEND_LOG),
        )?;
        let fs = match &spec.shared_dir {
            Some(dir) => {
                let mut fs_cmd = Command::new(&self.fs_backend);
                fs_cmd.args(virtiofsd_args(dir, &fs_socket, max_open_files()));
                Some(started.spawn("virtiofsd", fs_cmd, &spec.run_dir.join(VIRTIOFSD_LOG))?)
            }
            None => None,
        };
        // Both backends start in parallel; QEMU needs both sockets.
        let vsock_log = spec.run_dir.join(VSOCK_BACKEND_LOG);
        wait_for_socket("vsock backend", &backend, &vhost_socket, &vsock_log).await?;
        if let Some(fs) = &fs {
            let fs_log = spec.run_dir.join(VIRTIOFSD_LOG);
            wait_for_socket("virtiofsd", fs, &fs_socket, &fs_log).await?;
        }

        // Bound before the guest runs, so its announcement cannot be missed.
        let ready = ReadyListener::bind(&vsock_socket).map_err(QemuError::Ready)?;

        let started_at = Instant::now();
        let mut qemu_cmd = Command::new(&self.qemu);
        qemu_cmd.args(self.qemu_args(spec));
        if let Some(net) = &spec.network {
            let ns = std::fs::File::open(&net.netns).map_err(|source| QemuError::Spawn {
                what: "qemu-system-x86_64 (opening the pod network namespace)",
                source,
            })?;
            // SAFETY: between fork and exec the child only calls setns(2),
            // which is async-signal-safe and touches no parent memory.
            unsafe {
                qemu_cmd.pre_exec(move || {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let qemu = started.spawn("qemu", qemu_cmd, &spec.run_dir.join("qemu.log"))?;
        started.disarm();
        Ok(QemuVm {
            handle: QemuHandle {
                qemu,
                backend,
                fs_socket: fs.as_ref().map(|_| fs_socket),
                fs,
                vsock_socket,
                vhost_socket,
                console_log: spec.console_log(),
            },
            ready,
            started_at,
        })
    }
}

/// The virtiofsd command line (without the binary) that serves `shared_dir`
/// on the vhost-user socket `socket`. Why these options: `docs/guest.md`,
/// "The pod's shared directory".
pub fn virtiofsd_args(shared_dir: &Path, socket: &Path, max_open_files: u64) -> Vec<String> {
    vec![
        format!("--shared-dir={}", shared_dir.display()),
        format!("--socket-path={}", socket.display()),
        // chroot() into the share, but stay in the host's mount namespace:
        // the root filesystems and volumes the daemon mounts under the share
        // after the VM started are seen (a private namespace would not).
        "--sandbox=chroot".into(),
        // virtiofsd's own syscall filter; a syscall outside it kills it.
        "--seccomp=kill".into(),
        // Mounts under the share are submounts in the guest, with their own
        // inode numbers (st_dev), as on the host.
        "--announce-submounts".into(),
        // O_PATH descriptors, not file handles: opening a file handle needs
        // CAP_DAC_READ_SEARCH, with which open_by_handle_at(2) reaches any
        // file of the host filesystem, chroot or not.
        "--inode-file-handles=never".into(),
        // Page cache in the guest, revalidated: metadata and directory
        // entries for 1 s, file data until the file changed on the host
        // (checked at open). Host-side updates (ConfigMaps) are seen.
        "--cache=auto".into(),
        // One O_PATH descriptor per inode the guest holds: as many as allowed.
        format!("--rlimit-nofile={max_open_files}"),
        "--log-level=warn".into(),
    ]
}

/// The open-file limit virtiofsd should raise itself to: this process's hard
/// limit (which it inherits), at most virtiofsd's own default of a million.
fn max_open_files() -> u64 {
    const VIRTIOFSD_DEFAULT: u64 = 1_000_000;
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard.min(VIRTIOFSD_DEFAULT))
        .unwrap_or(VIRTIOFSD_DEFAULT)
}

/// The processes of a VM being started: killed when the start fails (an
/// error, or the future dropped) before [`Started::disarm`].
#[derive(Default)]
struct Started(Vec<VmProcess>);

impl Started {
    fn spawn(
        &mut self,
        name: &'static str,
        command: Command,
        log: &Path,
    ) -> Result<VmProcess, QemuError> {
        let process = VmProcess::spawn(name, command, log)
            .map_err(|source| QemuError::Spawn { what: name, source })?;
        self.0.push(process.clone());
        Ok(process)
    }

    fn disarm(mut self) {
        self.0.clear();
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        for process in &self.0 {
            process.kill_now();
        }
    }
}

/// The longest path a unix socket can be bound to (`sun_path` minus NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The unix sockets the VM's processes bind in its run directory.
fn socket_paths(spec: &VmSpec) -> [PathBuf; 4] {
    let vsock = spec.vsock_socket();
    // The hybrid-vsock socket has per-port listeners `<uds>_<port>`.
    let mut ready = vsock.clone().into_os_string();
    ready.push(format!("_{}", carapace_agent_api::READY_VSOCK_PORT));
    [
        spec.run_dir.join(VHOST_VSOCK_SOCKET),
        spec.run_dir.join(VIRTIOFS_SOCKET),
        vsock,
        ready.into(),
    ]
}

fn validate(spec: &VmSpec) -> Result<(), QemuError> {
    let longest = socket_paths(spec)
        .iter()
        .map(|path| path.as_os_str().len())
        .max()
        .unwrap_or(0);
    if longest > MAX_SOCKET_PATH {
        return Err(QemuError::InvalidSpec(format!(
            "run_dir {} is too long for unix socket paths (at most {} bytes with the socket name)",
            spec.run_dir.display(),
            MAX_SOCKET_PATH
        )));
    }
    // QEMU's option syntax would split the socket paths at a comma.
    if spec.run_dir.as_os_str().as_encoded_bytes().contains(&b',') {
        return Err(QemuError::InvalidSpec(format!(
            "run_dir {} contains a comma",
            spec.run_dir.display()
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
    if let Some(dir) = &spec.shared_dir {
        if !dir.is_absolute() || !dir.is_dir() {
            return Err(QemuError::InvalidSpec(format!(
                "shared_dir {} is not an absolute path to a directory",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Waits until `backend` has created its vhost-user `socket`; on failure the
/// error carries the backend's log.
async fn wait_for_socket(
    what: &'static str,
    backend: &VmProcess,
    socket: &Path,
    log: &Path,
) -> Result<(), QemuError> {
    let deadline = Instant::now() + BACKEND_READY_TIMEOUT;
    let reason = loop {
        if socket.exists() {
            return Ok(());
        }
        if !backend.is_running() {
            break "it exited".to_owned();
        }
        if Instant::now() >= deadline {
            break format!(
                "no socket at {} after {BACKEND_READY_TIMEOUT:?}",
                socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let log = std::fs::read_to_string(log).unwrap_or_default();
    Err(QemuError::BackendNotReady {
        what,
        reason: format!("{reason}; its log: {}", log.trim()),
    })
}

/// What identifies a QEMU VM's processes and sockets; recorded with the pod
/// so that a restarted daemon finds the VM again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuHandle {
    pub qemu: VmProcess,
    pub backend: VmProcess,
    /// virtiofsd, when the VM has a shared directory. Records written before
    /// virtio-fs have none.
    #[serde(default)]
    pub fs: Option<VmProcess>,
    pub vsock_socket: PathBuf,
    pub vhost_socket: PathBuf,
    /// virtiofsd's vhost-user socket, with `fs`.
    #[serde(default)]
    pub fs_socket: Option<PathBuf>,
    pub console_log: PathBuf,
}

impl QemuHandle {
    /// The pids of the VM's processes.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.qemu.pid, self.backend.pid];
        pids.extend(self.fs.as_ref().map(|fs| fs.pid));
        pids
    }

    /// Whether the VM (QEMU and its backends) still runs. A VM whose
    /// virtiofsd died is not running: its guest cannot reach its root
    /// filesystems any more.
    pub fn is_running(&self) -> bool {
        self.qemu.is_running()
            && self.backend.is_running()
            && self.fs.as_ref().is_none_or(VmProcess::is_running)
    }

    /// Stops the VM: SIGTERM to QEMU, SIGKILL after a grace period, then the
    /// backends; removes the sockets. Stopping a stopped VM is a no-op.
    pub async fn stop(&self) {
        self.qemu.stop(STOP_GRACE).await;
        self.backend.stop(STOP_GRACE).await;
        if let Some(fs) = &self.fs {
            fs.stop(STOP_GRACE).await;
        }
        self.remove_sockets();
    }

    /// Kills every process at once (synchronous, for `Drop` paths).
    pub fn kill_now(&self) {
        self.qemu.kill_now();
        self.backend.kill_now();
        if let Some(fs) = &self.fs {
            fs.kill_now();
        }
    }

    fn remove_sockets(&self) {
        let _ = std::fs::remove_file(&self.vsock_socket);
        let _ = std::fs::remove_file(&self.vhost_socket);
        if let Some(socket) = &self.fs_socket {
            let _ = std::fs::remove_file(socket);
            // virtiofsd's lock file next to its socket.
            let mut pid_file = socket.clone().into_os_string();
            pid_file.push(".pid");
            let _ = std::fs::remove_file(pid_file);
        }
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
            network: None,
        }
    }

    fn driver() -> QemuDriver {
        QemuDriver {
            qemu: "qemu".into(),
            vsock_backend: "vdv".into(),
            fs_backend: "virtiofsd".into(),
            accel: Accel::Tcg,
        }
    }

    #[test]
    fn command_line_shares_memory_and_wires_vsock() {
        let dir = Path::new("/run/vm1");
        let args = driver().qemu_args(&spec(dir)).join(" ");
        assert!(args.contains("-accel tcg -cpu max"), "{args}");
        assert!(args.contains("memory-backend-memfd,id=mem,size=128M,share=on"));
        assert!(args.contains("socket,id=vsock,path=/run/vm1/vhost-vsock.sock"));
        assert!(args.contains("vhost-user-vsock-device,chardev=vsock"));
        assert!(args.contains("acpi=off"));
        assert!(
            !args.contains("vhost-user-fs"),
            "no share, no fs device: {args}"
        );
        assert!(args.ends_with(&format!(
            "-append {} {TCG_CMDLINE}",
            super::super::BASE_CMDLINE
        )));
    }

    #[test]
    fn command_line_wires_the_shared_directory() {
        let dir = Path::new("/run/vm1");
        let spec = VmSpec {
            shared_dir: Some("/run/pods/p1/shared".into()),
            ..spec(dir)
        };
        let args = driver().qemu_args(&spec);
        let fs = args
            .windows(4)
            .find(|w| w[0] == "-chardev" && w[1].starts_with("socket,id=fs,"))
            .expect("a chardev for virtiofsd");
        assert_eq!(fs[1], "socket,id=fs,path=/run/vm1/virtiofs.sock");
        assert_eq!(
            (fs[2].as_str(), fs[3].as_str()),
            ("-device", "vhost-user-fs-device,chardev=fs,tag=carapace")
        );
        // Before the kernel, like every device; the share's path is
        // virtiofsd's business, not QEMU's.
        let joined = args.join(" ");
        assert!(joined.find("vhost-user-fs-device") < joined.find("-kernel"));
        assert!(!joined.contains("/run/pods/p1/shared"), "{joined}");
    }

    #[test]
    fn command_line_wires_the_pod_network() {
        let spec = VmSpec {
            network: Some(crate::network::tap::VmNetwork {
                netns: "/run/carapace/netns/p1".into(),
                tap: "tap0".into(),
                mac: "0a:58:0a:00:00:05".into(),
                mtu: 1450,
            }),
            ..spec(Path::new("/run/vm1"))
        };
        let args = driver().qemu_args(&spec).join(" ");
        assert!(
            args.contains("-netdev tap,id=net0,ifname=tap0,script=no,downscript=no -device virtio-net-device,netdev=net0,mac=0a:58:0a:00:00:05"),
            "{args}"
        );
        assert!(!driver()
            .qemu_args(&spec_without_net())
            .join(" ")
            .contains("netdev"));
    }

    fn spec_without_net() -> VmSpec {
        spec(Path::new("/run/vm1"))
    }

    #[test]
    fn virtiofsd_command_line() {
        let args = virtiofsd_args(
            Path::new("/run/pods/p1/shared"),
            Path::new("/run/vm1/virtiofs.sock"),
            20000,
        );
        assert_eq!(
            args,
            [
                "--shared-dir=/run/pods/p1/shared",
                "--socket-path=/run/vm1/virtiofs.sock",
                "--sandbox=chroot",
                "--seccomp=kill",
                "--announce-submounts",
                "--inode-file-handles=never",
                "--cache=auto",
                "--rlimit-nofile=20000",
                "--log-level=warn",
            ]
        );
        // QEMU 7.2 crashes on a backend that announces its own tag.
        assert!(!args.iter().any(|a| a.starts_with("--tag")));
        assert!((1..=1_000_000).contains(&max_open_files()));
    }

    #[test]
    fn records_without_virtiofsd_still_load() {
        let old = r#"{
            "qemu": {"name": "qemu", "pid": 10, "start_ticks": 5},
            "backend": {"name": "vhost-device-vsock", "pid": 9, "start_ticks": 4},
            "vsock_socket": "/run/vm1/vsock.sock",
            "vhost_socket": "/run/vm1/vhost-vsock.sock",
            "console_log": "/run/vm1/console.log"
        }"#;
        let handle: QemuHandle = serde_json::from_str(old).unwrap();
        assert_eq!((handle.fs, handle.fs_socket), (None, None));
        let new = QemuHandle {
            fs: Some(VmProcess {
                name: "virtiofsd".into(),
                pid: 11,
                start_ticks: 6,
            }),
            fs_socket: Some("/run/vm1/virtiofs.sock".into()),
            ..serde_json::from_str(old).unwrap()
        };
        let again: QemuHandle =
            serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(again, new);
    }

    #[tokio::test]
    async fn a_vm_whose_virtiofsd_died_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let sleeper = |name: &str| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            VmProcess::spawn(name, cmd, &dir.path().join(format!("{name}.log"))).unwrap()
        };
        let fs_socket = dir.path().join(VIRTIOFS_SOCKET);
        std::fs::write(&fs_socket, b"").unwrap();
        let handle = QemuHandle {
            qemu: sleeper("qemu"),
            backend: sleeper("backend"),
            fs: Some(sleeper("virtiofsd")),
            vsock_socket: dir.path().join("vsock.sock"),
            vhost_socket: dir.path().join(VHOST_VSOCK_SOCKET),
            fs_socket: Some(fs_socket.clone()),
            console_log: dir.path().join("console.log"),
        };
        assert!(handle.is_running());
        let fs = handle.fs.clone().unwrap();
        fs.kill_now();
        assert!(fs.wait_exit(Duration::from_secs(5)).await);
        assert!(!handle.is_running());
        handle.stop().await;
        assert!(!handle.qemu.is_running() && !handle.backend.is_running());
        assert!(!fs_socket.exists());
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
        // The hybrid-vsock port listener and virtiofsd's socket count too.
        let in_root = VmSpec {
            run_dir: "/".into(),
            ..s.clone()
        };
        let name_len = socket_paths(&in_root)
            .iter()
            .map(|p| p.as_os_str().len() - 1)
            .max()
            .unwrap();
        assert!(name_len >= VIRTIOFS_SOCKET.len());
        let at_limit = |extra: usize| VmSpec {
            run_dir: PathBuf::from(format!(
                "/{}",
                "r".repeat(MAX_SOCKET_PATH - name_len - 2 + extra)
            )),
            ..s.clone()
        };
        assert!(
            !matches!(validate(&at_limit(0)), Err(QemuError::InvalidSpec(m)) if m.contains("too long"))
        );
        assert!(
            matches!(validate(&at_limit(1)), Err(QemuError::InvalidSpec(m)) if m.contains("too long"))
        );
        let comma = VmSpec {
            run_dir: dir.path().join("a,b"),
            ..s.clone()
        };
        assert!(matches!(validate(&comma), Err(QemuError::InvalidSpec(m)) if m.contains("comma")));
        std::fs::write(&s.kernel, b"k").unwrap();
        std::fs::write(&s.initrd, b"i").unwrap();
        assert!(validate(&s).is_ok());
        for bad_share in [
            dir.path().join("nope"),
            PathBuf::from("relative"),
            s.kernel.clone(),
        ] {
            let shared = VmSpec {
                shared_dir: Some(bad_share),
                ..s.clone()
            };
            assert!(
                matches!(validate(&shared), Err(QemuError::InvalidSpec(m)) if m.contains("shared_dir"))
            );
        }
        s.shared_dir = Some(dir.path().to_owned());
        assert!(validate(&s).is_ok());
        s.vcpus = 0;
        assert!(validate(&s).is_err());
        s.vcpus = 1;
        s.mem_mib = 1;
        assert!(validate(&s).is_err());
    }
}
