//! A started VM as the daemon holds it: its host processes and sockets
//! ([`VmHandle`], recorded with the pod so that a restarted daemon finds the
//! VM again), and, right after the start, the listener for the agent's
//! readiness announcement ([`StartedVm`]). The same for every driver.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use carapace_agent_api::v1::HealthResponse;

use super::process::VmProcess;
use crate::agent_client::{AgentClient, AgentError};
use crate::agent_ready::ReadyListener;

/// How long a VM may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// What identifies a VM's processes and sockets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHandle {
    /// The virtual machine monitor: `qemu-system-x86_64` or `carapace-vmm`.
    /// (Records written before the builtin driver call it `qemu`.)
    #[serde(alias = "qemu")]
    pub monitor: VmProcess,
    /// The qemu driver's vsock backend (`vhost-device-vsock`); our VMM has
    /// its own vsock device.
    #[serde(default)]
    pub backend: Option<VmProcess>,
    /// virtiofsd, when the VM has a shared directory. Records written before
    /// virtio-fs have none.
    #[serde(default)]
    pub fs: Option<VmProcess>,
    /// The hybrid-vsock socket: the host side of the guest's vsock.
    pub vsock_socket: PathBuf,
    /// The vhost-user socket between QEMU and `backend`.
    #[serde(default)]
    pub vhost_socket: Option<PathBuf>,
    /// virtiofsd's vhost-user socket, with `fs`.
    #[serde(default)]
    pub fs_socket: Option<PathBuf>,
    /// `carapace-vmm`'s control socket.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    pub console_log: PathBuf,
}

impl VmHandle {
    /// The pids of the VM's processes.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.monitor.pid];
        pids.extend(self.backend.as_ref().map(|b| b.pid));
        pids.extend(self.fs.as_ref().map(|fs| fs.pid));
        pids
    }

    /// Whether the VM (the monitor and its backends) still runs. A VM whose
    /// virtiofsd died is not running: its guest cannot reach its root
    /// filesystems any more.
    pub fn is_running(&self) -> bool {
        self.monitor.is_running()
            && self.backend.as_ref().is_none_or(VmProcess::is_running)
            && self.fs.as_ref().is_none_or(VmProcess::is_running)
    }

    /// Stops the VM: SIGTERM to the monitor, SIGKILL after a grace period,
    /// then the backends; removes the sockets. Stopping a stopped VM is a
    /// no-op.
    pub async fn stop(&self) {
        self.monitor.stop(STOP_GRACE).await;
        for backend in [&self.backend, &self.fs].into_iter().flatten() {
            backend.stop(STOP_GRACE).await;
        }
        self.remove_sockets();
    }

    /// Kills every process at once (synchronous, for `Drop` paths).
    pub fn kill_now(&self) {
        self.monitor.kill_now();
        for backend in [&self.backend, &self.fs].into_iter().flatten() {
            backend.kill_now();
        }
    }

    fn remove_sockets(&self) {
        let _ = std::fs::remove_file(&self.vsock_socket);
        for socket in [&self.vhost_socket, &self.api_socket].into_iter().flatten() {
            let _ = std::fs::remove_file(socket);
        }
        if let Some(socket) = &self.fs_socket {
            let _ = std::fs::remove_file(socket);
            // virtiofsd's lock file next to its socket.
            let mut pid_file = socket.clone().into_os_string();
            pid_file.push(".pid");
            let _ = std::fs::remove_file(pid_file);
        }
    }
}

/// A VM just started by this daemon.
#[derive(Debug)]
pub struct StartedVm {
    pub handle: VmHandle,
    pub(super) ready: ReadyListener,
    pub(super) started_at: Instant,
}

impl StartedVm {
    /// The hybrid-vsock socket to reach the guest.
    pub fn vsock_socket(&self) -> &Path {
        &self.handle.vsock_socket
    }

    pub fn console_log(&self) -> &Path {
        &self.handle.console_log
    }

    /// When the monitor was spawned.
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
        tracing::debug!(
            since_start_ms = self.started_at.elapsed().as_millis() as u64,
            "agent announced itself"
        );
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        AgentClient::wait_ready(&self.handle.vsock_socket, left).await
    }

    /// Stops the VM (see [`VmHandle::stop`]).
    pub async fn stop(self) {
        self.handle.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::process::Command;

    #[test]
    fn qemu_records_from_before_the_builtin_driver_still_load() {
        let old = r#"{
            "qemu": {"name": "qemu", "pid": 10, "start_ticks": 5},
            "backend": {"name": "vhost-device-vsock", "pid": 9, "start_ticks": 4},
            "vsock_socket": "/run/vm1/vsock.sock",
            "vhost_socket": "/run/vm1/vhost-vsock.sock",
            "console_log": "/run/vm1/console.log"
        }"#;
        let handle: VmHandle = serde_json::from_str(old).unwrap();
        assert_eq!(handle.monitor.pid, 10);
        assert_eq!(handle.backend.as_ref().map(|b| b.pid), Some(9));
        assert_eq!(
            handle.vhost_socket.as_deref(),
            Some(Path::new("/run/vm1/vhost-vsock.sock"))
        );
        assert_eq!((handle.fs, handle.fs_socket), (None, None));
        assert_eq!(handle.api_socket, None);
        let new = VmHandle {
            fs: Some(VmProcess {
                name: "virtiofsd".into(),
                pid: 11,
                start_ticks: 6,
            }),
            fs_socket: Some("/run/vm1/virtiofs.sock".into()),
            api_socket: Some("/run/vm1/api.sock".into()),
            ..serde_json::from_str(old).unwrap()
        };
        let again: VmHandle = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
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
        let fs_socket = dir.path().join("virtiofs.sock");
        let api_socket = dir.path().join("api.sock");
        std::fs::write(&fs_socket, b"").unwrap();
        std::fs::write(&api_socket, b"").unwrap();
        let handle = VmHandle {
            monitor: sleeper("qemu"),
            backend: Some(sleeper("backend")),
            fs: Some(sleeper("virtiofsd")),
            vsock_socket: dir.path().join("vsock.sock"),
            vhost_socket: Some(dir.path().join("vhost-vsock.sock")),
            fs_socket: Some(fs_socket.clone()),
            api_socket: Some(api_socket.clone()),
            console_log: dir.path().join("console.log"),
        };
        assert!(handle.is_running());
        assert_eq!(handle.pids().len(), 3);
        let fs = handle.fs.clone().unwrap();
        fs.kill_now();
        assert!(fs.wait_exit(Duration::from_secs(5)).await);
        assert!(!handle.is_running());
        handle.stop().await;
        assert!(!handle.monitor.is_running());
        assert!(!handle.backend.as_ref().unwrap().is_running());
        assert!(!fs_socket.exists() && !api_socket.exists());
    }
}
