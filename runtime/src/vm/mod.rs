//! VM drivers: how a pod's VM is started and stopped.
//!
//! Every driver gives the runtime the same thing: a running guest whose vsock
//! is reachable through a hybrid-vsock unix socket (see `agent_client`), a
//! console log file, and a way to stop it.

pub mod process;
pub mod qemu;

use std::path::{Path, PathBuf};

/// Kernel command-line words every Carapace guest boots with.
/// `reboot=t panic=-1`: a guest that panics or reboots makes the VM exit
/// rather than hang; `quiet` keeps the serial console (slow under TCG) short.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet";

/// The virtio-fs tag of the pod's shared directory.
pub const SHARED_FS_TAG: &str = "carapace";

/// What to boot: the same for every driver.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Uncompressed guest kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// Guest initramfs (the agent as `/init`).
    pub initrd: PathBuf,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Appended to [`BASE_CMDLINE`].
    pub extra_cmdline: String,
    /// A directory private to this VM: sockets and the console log go here.
    pub run_dir: PathBuf,
    /// A host directory shared with the guest over virtio-fs under the tag
    /// [`SHARED_FS_TAG`] (the pod's root filesystems and volumes).
    pub shared_dir: Option<PathBuf>,
    /// The pod network: a virtio-net device on a tap in the pod's network
    /// namespace, in which the VM process then runs. `None`: no network.
    pub network: Option<crate::network::tap::VmNetwork>,
}

impl VmSpec {
    /// The full kernel command line.
    pub fn cmdline(&self) -> String {
        if self.extra_cmdline.is_empty() {
            BASE_CMDLINE.to_owned()
        } else {
            format!("{BASE_CMDLINE} {}", self.extra_cmdline)
        }
    }

    /// Where the hybrid-vsock socket of the VM is.
    pub fn vsock_socket(&self) -> PathBuf {
        self.run_dir.join("vsock.sock")
    }

    /// Where the guest's serial console is logged.
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
}

/// Finds an executable by name in `$PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
