//! VM drivers: how a pod's VM is started and stopped.
//!
//! Every driver gives the runtime the same thing ([`StartedVm`], then the
//! recorded [`VmHandle`]): a running guest whose vsock is reachable through
//! a hybrid-vsock unix socket (see `agent_client`), a console log file, and
//! a way to stop it. `qemu` runs `qemu-system-x86_64 -M microvm` with
//! vhost-user backends; `builtin` runs our own `carapace-vmm`.

pub mod backends;
pub mod builtin;
pub mod handle;
pub mod process;
pub mod qemu;

use std::path::{Path, PathBuf};

pub use handle::{StartedVm, VmHandle};

use crate::config::DriverChoice;
use crate::host::KvmKind;

/// Errors of the VM drivers.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
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

/// The driver a daemon starts its pod VMs with.
#[derive(Debug, Clone)]
pub enum VmDriver {
    Qemu(qemu::QemuDriver),
    Builtin(builtin::BuiltinDriver),
}

/// Which driver a daemon uses, from the configured choice and the host's KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    Qemu,
    Builtin,
}

impl DriverKind {
    /// The driver for `choice` on a host with `kvm`, and why; an error when
    /// the choice cannot work here. `auto` takes our own VMM wherever it can
    /// run (hardware KVM: pods through it, their network included, are
    /// proven end to end in the test node, docs/vmm.md) and QEMU elsewhere.
    pub fn pick(choice: DriverChoice, kvm: KvmKind) -> Result<(Self, String), String> {
        match (choice, kvm) {
            (DriverChoice::Qemu, _) => Ok((DriverKind::Qemu, format!("configured; host has {}", kvm.describe()))),
            (DriverChoice::Builtin, KvmKind::Hardware) => {
                Ok((DriverKind::Builtin, "configured; host has hardware KVM".into()))
            }
            (DriverChoice::Builtin, _) => Err(format!(
                "vm.driver = \"builtin\" needs hardware KVM, but this host has {}; use \"qemu\" or \"auto\"",
                kvm.describe()
            )),
            (DriverChoice::Auto, KvmKind::Hardware) => Ok((
                DriverKind::Builtin,
                format!("auto: host has {}, which the builtin VMM needs", kvm.describe()),
            )),
            (DriverChoice::Auto, _) => Ok((
                DriverKind::Qemu,
                format!("auto: host has {}, the builtin VMM needs hardware KVM", kvm.describe()),
            )),
        }
    }
}

impl VmDriver {
    /// Finds the tools of `kind` on this host.
    pub fn from_host(kind: DriverKind, config: &crate::config::VmConfig) -> Result<Self, VmError> {
        Ok(match kind {
            DriverKind::Qemu => VmDriver::Qemu(
                qemu::QemuDriver::from_host()?
                    .with_tcg_cache_mib(config.tcg_translation_cache_mib)
                    .with_free_page_reporting(config.free_page_reporting),
            ),
            DriverKind::Builtin => VmDriver::Builtin(
                builtin::BuiltinDriver::from_host(config.jail.then_some(config.jail_id_base))?
                    .with_free_page_reporting(config.free_page_reporting),
            ),
        })
    }

    /// Starts a VM for `spec`; see the drivers' `start`.
    pub async fn start(&self, spec: &VmSpec) -> Result<StartedVm, VmError> {
        match self {
            VmDriver::Qemu(driver) => driver.start(spec).await,
            VmDriver::Builtin(driver) => driver.start(spec).await,
        }
    }

    /// Says which driver this is, for logs and `carapace check`.
    pub fn describe(&self) -> String {
        match self {
            VmDriver::Qemu(driver) => format!("qemu with {:?}", driver.accel()),
            VmDriver::Builtin(driver) => format!("builtin ({})", driver.vmm().display()),
        }
    }
}

/// Kernel command-line words every Carapace guest boots with.
/// `reboot=t panic=-1`: a guest that panics or reboots makes the VM exit
/// rather than hang; `quiet` keeps the serial console (slow under TCG) short.
/// `rcupdate.rcu_expedited=1`: every RCU grace period the kernel waits for
/// is expedited (an IPI to each vCPU rather than waiting for their ticks).
/// Container creation waits for several (joining a cgroup, unshare and
/// mount-namespace teardown, mounts); with one or two vCPUs the IPIs cost
/// nothing. Under TCG it took the agent's container setup from ~240 to
/// ~130 ms (guest clock), the cgroup join from ~40 to ~12 ms.
/// `noreplace-smp`: a guest with one vCPU would otherwise rewrite the ~5,000
/// `lock` prefixes of its kernel text one `text_poke` at a time, each with
/// two address-space switches and a TLB flush; that is slow wherever the
/// guest's paging is emulated (TCG, or KVM in a TCG-emulated node: about
/// 100 ms of the guest's boot there, docs/vmm.md). The prefixes stay: an
/// uncontended locked instruction costs a few cycles more.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=t panic=-1 quiet rcupdate.rcu_expedited=1 noreplace-smp";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_from_choice_and_host() {
        use DriverChoice::*;
        let pick = |c, k| DriverKind::pick(c, k).map(|(kind, _)| kind);
        assert_eq!(pick(Qemu, KvmKind::Hardware), Ok(DriverKind::Qemu));
        assert_eq!(pick(Qemu, KvmKind::Pvm), Ok(DriverKind::Qemu));
        assert_eq!(pick(Builtin, KvmKind::Hardware), Ok(DriverKind::Builtin));
        assert_eq!(pick(Auto, KvmKind::Hardware), Ok(DriverKind::Builtin));
        assert_eq!(pick(Auto, KvmKind::Pvm), Ok(DriverKind::Qemu));
        assert_eq!(pick(Auto, KvmKind::None), Ok(DriverKind::Qemu));
        for kvm in [KvmKind::Pvm, KvmKind::None] {
            let err = pick(Builtin, kvm).unwrap_err();
            assert!(
                err.contains("needs hardware KVM") && err.contains(kvm.describe()),
                "{err}"
            );
        }
        let (_, why) = DriverKind::pick(Auto, KvmKind::Pvm).unwrap();
        assert!(why.contains("PVM") && why.starts_with("auto:"), "{why}");
        let (_, why) = DriverKind::pick(Auto, KvmKind::Hardware).unwrap();
        assert!(
            why.starts_with("auto:") && why.contains("hardware KVM"),
            "{why}"
        );
    }
}
