//! What every driver does the same way: checking a [`VmSpec`], starting
//! virtiofsd for the pod's shared directory, waiting for a backend's socket,
//! running the monitor in the pod's network namespace, and killing what was
//! started when a start fails.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::process::VmProcess;
use super::{VmError, VmSpec};

/// How long a backend may take to create its vhost-user socket.
const BACKEND_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest path a unix socket can be bound to (`sun_path` minus NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// File names in the VM's run directory.
pub const VIRTIOFS_SOCKET: &str = "virtiofs.sock";
pub const VIRTIOFSD_LOG: &str = "virtiofsd.log";

/// Checks what every driver needs of a spec; `sockets` are the unix socket
/// paths the driver's processes will bind (their length is limited).
pub fn validate(spec: &VmSpec, sockets: &[PathBuf]) -> Result<(), VmError> {
    let longest = sockets
        .iter()
        .map(|path| path.as_os_str().len())
        .max()
        .unwrap_or(0);
    if longest > MAX_SOCKET_PATH {
        return Err(VmError::InvalidSpec(format!(
            "run_dir {} is too long for unix socket paths (at most {} bytes with the socket name)",
            spec.run_dir.display(),
            MAX_SOCKET_PATH
        )));
    }
    for (what, path) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
        if !path.is_file() {
            return Err(VmError::InvalidSpec(format!(
                "{what} {} is not a file",
                path.display()
            )));
        }
    }
    if spec.vcpus == 0 {
        return Err(VmError::InvalidSpec("vcpus must be at least 1".into()));
    }
    if spec.mem_mib < 64 {
        return Err(VmError::InvalidSpec("mem_mib must be at least 64".into()));
    }
    if !spec.run_dir.is_dir() {
        return Err(VmError::InvalidSpec(format!(
            "run_dir {} is not a directory",
            spec.run_dir.display()
        )));
    }
    if let Some(dir) = &spec.shared_dir {
        if !dir.is_absolute() || !dir.is_dir() {
            return Err(VmError::InvalidSpec(format!(
                "shared_dir {} is not an absolute path to a directory",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// The hybrid-vsock socket's listener for the agent's readiness
/// announcement: `<uds>_<port>`.
pub fn ready_socket(spec: &VmSpec) -> PathBuf {
    let mut ready = spec.vsock_socket().into_os_string();
    ready.push(format!("_{}", carapace_agent_api::READY_VSOCK_PORT));
    ready.into()
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
pub fn max_open_files() -> u64 {
    const VIRTIOFSD_DEFAULT: u64 = 1_000_000;
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard.min(VIRTIOFSD_DEFAULT))
        .unwrap_or(VIRTIOFSD_DEFAULT)
}

/// Makes `command` run in the pod's network namespace `netns`.
pub fn in_netns(command: &mut Command, what: &'static str, netns: &Path) -> Result<(), VmError> {
    let ns = std::fs::File::open(netns).map_err(|source| VmError::Spawn { what, source })?;
    // SAFETY: between fork and exec the child only calls setns(2), which is
    // async-signal-safe and touches no parent memory.
    unsafe {
        command.pre_exec(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    Ok(())
}

/// The processes of a VM being started: killed when the start fails (an
/// error, or the future dropped) before [`Started::disarm`].
#[derive(Default)]
pub struct Started(Vec<VmProcess>);

impl Started {
    pub fn spawn(
        &mut self,
        name: &'static str,
        command: Command,
        log: &Path,
    ) -> Result<VmProcess, VmError> {
        let process = VmProcess::spawn(name, command, log)
            .map_err(|source| VmError::Spawn { what: name, source })?;
        self.0.push(process.clone());
        Ok(process)
    }

    /// Starts virtiofsd serving `shared_dir` on `socket`; its log goes to
    /// the run directory.
    pub fn virtiofsd(
        &mut self,
        binary: &Path,
        spec: &VmSpec,
        shared_dir: &Path,
        socket: &Path,
    ) -> Result<VmProcess, VmError> {
        let mut command = Command::new(binary);
        command.args(virtiofsd_args(shared_dir, socket, max_open_files()));
        self.spawn("virtiofsd", command, &spec.run_dir.join(VIRTIOFSD_LOG))
    }

    /// The start succeeded: the processes now belong to the VM's handle.
    pub fn disarm(mut self) {
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

/// Waits until `backend` has created its vhost-user `socket`; on failure the
/// error carries the backend's log.
pub async fn wait_for_socket(
    what: &'static str,
    backend: &VmProcess,
    socket: &Path,
    log: &Path,
) -> Result<(), VmError> {
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
    Err(VmError::BackendNotReady {
        what,
        reason: format!("{reason}; its log: {}", log.trim()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(dir: &Path) -> VmSpec {
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
    fn rejects_invalid_specs() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        let ok: [PathBuf; 0] = [];
        assert!(matches!(validate(&s, &ok), Err(VmError::InvalidSpec(m)) if m.contains("kernel")));
        let long = [PathBuf::from(format!("/{}", "x".repeat(MAX_SOCKET_PATH)))];
        let at_limit = [PathBuf::from(format!(
            "/{}",
            "x".repeat(MAX_SOCKET_PATH - 1)
        ))];
        assert!(
            matches!(validate(&s, &long), Err(VmError::InvalidSpec(m)) if m.contains("too long"))
        );
        assert!(
            !matches!(validate(&s, &at_limit), Err(VmError::InvalidSpec(m)) if m.contains("too long"))
        );
        std::fs::write(&s.kernel, b"k").unwrap();
        std::fs::write(&s.initrd, b"i").unwrap();
        assert!(validate(&s, &ok).is_ok());
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
                matches!(validate(&shared, &ok), Err(VmError::InvalidSpec(m)) if m.contains("shared_dir"))
            );
        }
        s.shared_dir = Some(dir.path().to_owned());
        assert!(validate(&s, &ok).is_ok());
        s.vcpus = 0;
        assert!(validate(&s, &ok).is_err());
        s.vcpus = 1;
        s.mem_mib = 1;
        assert!(validate(&s, &ok).is_err());
        s.mem_mib = 128;
        s.run_dir = dir.path().join("absent");
        assert!(matches!(validate(&s, &ok), Err(VmError::InvalidSpec(m)) if m.contains("run_dir")));
    }

    #[test]
    fn ready_listener_is_the_hybrid_vsock_port_socket() {
        let s = spec(Path::new("/run/vm1"));
        assert_eq!(
            ready_socket(&s),
            Path::new(&format!(
                "/run/vm1/vsock.sock_{}",
                carapace_agent_api::READY_VSOCK_PORT
            ))
        );
    }
}
