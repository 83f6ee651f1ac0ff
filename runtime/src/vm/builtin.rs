//! The `builtin` driver: our own VMM, `carapace-vmm` (`vmm/`, docs/vmm.md),
//! one process per pod VM, configured with a JSON file in the VM's run
//! directory. Its virtio-vsock device is built in (the hybrid-vsock socket is
//! the VMM's own); virtiofsd serves the pod's shared directory through the
//! VMM's vhost-user frontend; the pod network's tap is opened by name inside
//! the pod's network namespace, where the VMM runs. Needs hardware KVM.
//!
//! With `vm.jail` (the default) each VMM runs in its jail (docs/vmm.md, "The
//! jail"): the VM's run directory becomes its root, and it runs as a uid and
//! gid of its own, one that no running process has.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use serde_json::json;
use tokio::process::Command;

use super::backends::{
    self, ready_socket, wait_for_socket, Started, VIRTIOFSD_LOG, VIRTIOFS_SOCKET,
};
use super::handle::{StartedVm, VmHandle};
use super::{find_in_path, VmError, VmSpec, SHARED_FS_TAG};
use crate::agent_ready::ReadyListener;
use crate::config::JAIL_IDS;

/// The VMM's binary name.
pub const VMM_BINARY: &str = "carapace-vmm";
/// File names in the VM's run directory.
const CONFIG_FILE: &str = "vmm.json";
const API_SOCKET: &str = "api.sock";
const VMM_LOG: &str = "vmm.log";
/// The guest's vsock context id (each VM has its own device: any valid one).
const GUEST_CID: u32 = 3;
/// virtio-fs queues: one request queue (the guest's agent and containers
/// share it) of the size virtiofsd handles by default.
const FS_REQUEST_QUEUES: u32 = 1;
const FS_QUEUE_SIZE: u16 = 1024;

/// Starts VMs with `carapace-vmm`.
#[derive(Debug, Clone)]
pub struct BuiltinDriver {
    vmm: PathBuf,
    fs_backend: PathBuf,
    /// `Some(base)`: every VMM is jailed with a uid/gid from `base` on.
    jail_id_base: Option<u32>,
    /// A virtio-balloon device with free page reporting.
    free_page_reporting: bool,
}

impl BuiltinDriver {
    /// Finds `carapace-vmm` next to this program (where the setup installs
    /// both), else in `$PATH`, and virtiofsd in `$PATH`. `jail_id_base`:
    /// jail every VMM, with ids from there (`vm.jail`, `vm.jail_id_base`).
    pub fn from_host(jail_id_base: Option<u32>) -> Result<Self, VmError> {
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join(VMM_BINARY)))
            .filter(|path| path.is_file());
        Ok(Self {
            vmm: beside
                .or_else(|| find_in_path(VMM_BINARY))
                .ok_or(VmError::MissingTool(VMM_BINARY))?,
            fs_backend: find_in_path("virtiofsd").ok_or(VmError::MissingTool("virtiofsd"))?,
            jail_id_base,
            free_page_reporting: false,
        })
    }

    /// Gives each VM a virtio-balloon device that only reports free pages
    /// (`vm.free_page_reporting`).
    pub fn with_free_page_reporting(mut self, on: bool) -> Self {
        self.free_page_reporting = on;
        self
    }

    /// The VMM binary in use.
    pub fn vmm(&self) -> &Path {
        &self.vmm
    }

    /// The VMM's configuration for `spec` (docs/vmm.md, "Configuration"),
    /// jailed in the run directory as `jail_id` if given.
    pub fn vmm_config(&self, spec: &VmSpec, jail_id: Option<u32>) -> serde_json::Value {
        let mut config = json!({
            "vcpus": spec.vcpus,
            "mem_size_mib": spec.mem_mib,
            "kernel": spec.kernel,
            "initrd": spec.initrd,
            "cmdline": spec.cmdline(),
            "serial": {"file": spec.console_log()},
            "vsock": {"guest_cid": GUEST_CID, "uds_path": spec.vsock_socket()},
            "api_socket": spec.run_dir.join(API_SOCKET),
            "free_page_reporting": self.free_page_reporting,
        });
        if spec.shared_dir.is_some() {
            config["fs"] = json!([{
                "tag": SHARED_FS_TAG,
                "socket": spec.run_dir.join(VIRTIOFS_SOCKET),
                "num_request_queues": FS_REQUEST_QUEUES,
                "queue_size": FS_QUEUE_SIZE,
            }]);
        }
        if let Some(net) = &spec.network {
            // MTU 0: not known yet (a warm VM, whose pod network comes
            // later): no MTU feature, the guest may take any MTU.
            let mtu = (net.mtu != 0).then_some(net.mtu);
            config["net"] = json!([{"tap": net.tap, "mac": net.mac, "mtu": mtu}]);
        }
        if let Some(id) = jail_id {
            config["jail"] = json!({"root": spec.run_dir, "uid": id, "gid": id});
        }
        config
    }

    /// Starts virtiofsd (when the VM has a shared directory), then the VMM.
    /// Returns once the VMM runs; the agent is ready when it answers (see
    /// [`StartedVm::wait_agent`]). If the start fails, what was started is
    /// killed.
    pub async fn start(&self, spec: &VmSpec) -> Result<StartedVm, VmError> {
        let vsock_socket = spec.vsock_socket();
        let fs_socket = spec.run_dir.join(VIRTIOFS_SOCKET);
        let api_socket = spec.run_dir.join(API_SOCKET);
        backends::validate(
            spec,
            &[
                vsock_socket.clone(),
                ready_socket(spec),
                fs_socket.clone(),
                api_socket.clone(),
            ],
        )?;
        for stale in [&vsock_socket, &fs_socket, &api_socket] {
            let _ = std::fs::remove_file(stale);
        }
        let mut started = Started::default();
        let fs = match &spec.shared_dir {
            Some(dir) => {
                let fs = started.virtiofsd(&self.fs_backend, spec, dir, &fs_socket)?;
                let log = spec.run_dir.join(VIRTIOFSD_LOG);
                wait_for_socket("virtiofsd", &fs, &fs_socket, &log).await?;
                Some(fs)
            }
            None => None,
        };

        // Bound before the guest runs, so its announcement cannot be missed.
        let ready = ReadyListener::bind(&vsock_socket).map_err(VmError::Ready)?;
        let jail_id = match self.jail_id_base {
            Some(base) => {
                let id = pick_jail_id(base)?;
                // The jailed VMM connects to the listener for the guest.
                std::os::unix::fs::chown(ready_socket(spec), Some(id), Some(id)).map_err(
                    |source| VmError::Spawn {
                        what: "carapace-vmm (giving its jail the readiness socket)",
                        source,
                    },
                )?;
                Some(id)
            }
            None => None,
        };

        let config_path = spec.run_dir.join(CONFIG_FILE);
        let config = serde_json::to_vec_pretty(&self.vmm_config(spec, jail_id))
            .map_err(|e| VmError::InvalidSpec(format!("VMM configuration: {e}")))?;
        std::fs::write(&config_path, config).map_err(|source| VmError::Spawn {
            what: "carapace-vmm (writing its configuration)",
            source,
        })?;
        let started_at = Instant::now();
        let mut command = Command::new(&self.vmm);
        command.arg("--config").arg(&config_path);
        if let Some(net) = &spec.network {
            backends::in_netns(&mut command, VMM_BINARY, &net.netns)?;
        }
        let monitor = started.spawn(VMM_BINARY, command, &spec.run_dir.join(VMM_LOG))?;
        started.disarm();
        Ok(StartedVm {
            handle: VmHandle {
                monitor,
                backend: None,
                fs_socket: fs.as_ref().map(|_| fs_socket),
                fs,
                vsock_socket,
                vhost_socket: None,
                api_socket: Some(api_socket),
                console_log: spec.console_log(),
            },
            ready,
            started_at,
        })
    }
}

/// Where the jail ids handed out by this daemon have got to.
static NEXT_JAIL_ID: AtomicU32 = AtomicU32::new(0);

/// A uid/gid for a new jail, from `base`: the next one this daemon has not
/// handed out lately that no running process has (VMMs started by an
/// earlier daemon keep theirs).
fn pick_jail_id(base: u32) -> Result<u32, VmError> {
    next_free_id(base, &NEXT_JAIL_ID, &ids_in_use()).ok_or_else(|| {
        VmError::InvalidSpec(format!(
            "all {JAIL_IDS} jail ids from vm.jail_id_base {base} belong to running processes"
        ))
    })
}

/// The first id from `base + next` on (wrapping within [`JAIL_IDS`]) not in
/// `in_use`; advances `next` past it.
fn next_free_id(base: u32, next: &AtomicU32, in_use: &HashSet<u32>) -> Option<u32> {
    (0..JAIL_IDS)
        .map(|_| base + next.fetch_add(1, Ordering::Relaxed) % JAIL_IDS)
        .find(|id| !in_use.contains(id))
}

/// Every uid and gid (real, effective, saved, filesystem) of the running
/// processes.
fn ids_in_use() -> HashSet<u32> {
    let mut ids = HashSet::new();
    for pid in super::process::all_pids() {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(values) = line
                .strip_prefix("Uid:")
                .or_else(|| line.strip_prefix("Gid:"))
            {
                ids.extend(
                    values
                        .split_whitespace()
                        .filter_map(|v| v.parse::<u32>().ok()),
                );
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests;
