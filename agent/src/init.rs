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

/// Prepares the guest as init: a root that pivot_root can leave, base
/// mounts, then a sane umask.
pub fn setup() {
    if let Err(e) = leave_initramfs_root() {
        tracing::error!("cannot move off the initramfs root (containers will fail): {e}");
    }
    for m in BASE_MOUNTS {
        if let Err(e) = mount_one(m) {
            tracing::error!("mounting {} on {} failed: {e}", m.fstype, m.target);
        }
    }
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    tracing::debug!("guest base mounts ready");
}

/// pivot_root(2) fails for a process whose root is the initramfs itself
/// (the rootfs mount has no parent). So init binds the initramfs root onto
/// a directory, moves that mount over `/` and chroots into it, as
/// switch_root does with a real root: the files stay where they are, but
/// the root is now an ordinary mount, and every container's pivot_root
/// works.
fn leave_initramfs_root() -> nix::Result<()> {
    const STAGE: &str = "/.carapace-root";
    match nix::unistd::mkdir(STAGE, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(e),
    }
    mount(
        Some("/"),
        STAGE,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    nix::unistd::chdir(STAGE)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    nix::unistd::chdir("/")?;
    // The staging directory shows in the new root too (same files).
    let _ = std::fs::remove_dir(STAGE);
    Ok(())
}

fn mount_one(m: &BaseMount) -> nix::Result<()> {
    let target = Path::new(m.target);
    match nix::unistd::mkdir(target, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(e),
    }
    mount(Some(m.source), target, Some(m.fstype), m.flags, m.data)
}
