//! What the agent does first as PID 1: the guest's base mounts.
//!
//! A failed step is logged and skipped: the agent still serves its API, and
//! the runtime learns what is wrong from the calls that need the missing mount.

use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

struct BaseMount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Mounted in order; a target's parent is mounted before the target.
const BASE_MOUNTS: &[BaseMount] = &[
    BaseMount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    BaseMount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    BaseMount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    BaseMount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    BaseMount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777"),
    },
    BaseMount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
    BaseMount {
        source: "run",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
];

/// Prepares the guest as init: base mounts, then a sane umask.
pub fn setup() {
    for m in BASE_MOUNTS {
        if let Err(e) = mount_one(m) {
            tracing::error!("mounting {} on {} failed: {e}", m.fstype, m.target);
        }
    }
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    tracing::info!("guest base mounts ready");
}

fn mount_one(m: &BaseMount) -> nix::Result<()> {
    let target = Path::new(m.target);
    match nix::unistd::mkdir(target, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(e),
    }
    mount(Some(m.source), target, Some(m.fstype), m.flags, m.data)
}
