//! The jail: how a `carapace-vmm` with `"jail"` in its configuration confines itself, after
//! Firecracker's jailer (which does this before exec'ing Firecracker; we have no exec, so the
//! VMM does it to itself, in the same order).
//!
//! 1. [`fork_into_pid_namespace`]: `unshare(CLONE_NEWPID)` and fork. The child is PID 1 of a
//!    new pid namespace and becomes the VMM; the parent stays behind as the *supervisor*
//!    (the process the runtime started and signals).
//! 2. [`prepare_mounts`] (child): own mount namespace, every mount made a slave (nothing
//!    propagates back to the host), the jail root bind-mounted onto itself, `chdir` there,
//!    the root chowned to the jail's uid:gid.
//! 3. The child builds the VM with host paths: `/dev/kvm`, kernel, initrd, drives, console,
//!    tap, vhost-user sockets are opened or connected now; the API and vsock sockets are
//!    bound at paths relative to the root (see `ValidatedConfig::with_jail_paths`).
//! 4. [`enter`] (child): `pivot_root(".", ".")`, the old root detached (on an initramfs
//!    root, which cannot be pivoted, the jail mount is moved over `/` and chrooted instead),
//!    bounding and ambient capabilities dropped, supplementary groups cleared,
//!    `setresgid`/`setresuid` to the jail's ids (which clears every capability),
//!    no_new_privs, parent-death signal. It then tells the supervisor it is jailed.
//! 5. [`supervise`] (parent): waits for that, then chroots into the same directory, drops to
//!    the same ids, installs its own small seccomp filter, forwards SIGTERM/SIGINT to the
//!    VMM and exits with its status (128 + signal if it was killed).

use std::io::{Read, Write};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{
    chdir, chown, chroot, fork, pivot_root, setgroups, setresgid, setresuid, ForkResult, Gid, Pid,
    Uid,
};

use crate::config::JailConfig;
use crate::seccomp::{self, SeccompError, ThreadKind};

/// Errors confining the VMM.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A step of the jail failed.
    #[error("cannot {what}: {source}")]
    Sys {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The pipe between supervisor and VMM.
    #[error("cannot {what}: {source}")]
    Pipe {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The supervisor's seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> JailError {
    move |source| JailError::Sys { what, source }
}

/// What the calling process is after [`fork_into_pid_namespace`].
#[derive(Debug)]
pub enum Role {
    /// The original process: it supervises `child` (see [`supervise`]).
    Supervisor {
        /// The VMM, PID 1 of its namespace (this is its pid in ours).
        child: Pid,
        /// Readable once the child is jailed (or has exited).
        ready: std::io::PipeReader,
    },
    /// PID 1 of the new pid namespace: goes on to build and run the VM.
    Vmm {
        /// Written by [`enter`] once jailed.
        ready: std::io::PipeWriter,
    },
}

/// Unshares a pid namespace and forks. Must be called while the process has one thread
/// (nothing else survives a fork) and before any KVM fd exists (a VM belongs to the address
/// space that created it).
pub fn fork_into_pid_namespace() -> Result<Role, JailError> {
    let (reader, writer) = std::io::pipe().map_err(|source| JailError::Pipe {
        what: "create the jail pipe",
        source,
    })?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(sys("unshare the pid namespace"))?;
    // SAFETY: the caller guarantees the process is single-threaded, so the child can use
    // any function (no lock can be held by a thread that does not exist in it).
    match unsafe { fork() }.map_err(sys("fork into the new pid namespace"))? {
        ForkResult::Parent { child } => {
            drop(writer);
            Ok(Role::Supervisor {
                child,
                ready: reader,
            })
        }
        ForkResult::Child => {
            drop(reader);
            Ok(Role::Vmm { ready: writer })
        }
    }
}

/// In the VMM (step 2): a private view of the mounts, `root` bind-mounted onto itself (so it
/// can become the root), the working directory at `root`, and `root` owned by the jail's ids
/// (so the unprivileged VMM can remove its sockets at exit).
pub fn prepare_mounts(jail: &JailConfig) -> Result<(), JailError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(sys("unshare the mount namespace"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys("make the mounts slaves"))?;
    mount(
        Some(&jail.root),
        &jail.root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys("bind-mount the jail root"))?;
    chown(
        &jail.root,
        Some(Uid::from_raw(jail.uid)),
        Some(Gid::from_raw(jail.gid)),
    )
    .map_err(sys("chown the jail root"))?;
    chdir(&jail.root).map_err(sys("chdir to the jail root"))?;
    Ok(())
}

/// In the VMM, after the VM is built (step 4): `pivot_root` into the working directory set
/// by [`prepare_mounts`], drop every privilege, and tell the supervisor.
pub fn enter(jail: &JailConfig, ready: std::io::PipeWriter) -> Result<(), JailError> {
    match pivot_root(".", ".") {
        // The old root is now stacked on top of the new one: detach it.
        Ok(()) => umount2(".", MntFlags::MNT_DETACH).map_err(sys("detach the old root"))?,
        // The current root is the initramfs (rootfs), which cannot be pivoted away (a node
        // booted without switch_root, like our test node): move the jail mount over it and
        // chroot, as switch_root and runc's no-pivot mode do. Without capabilities the
        // chroot cannot be left.
        Err(nix::Error::EINVAL) => {
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(sys("move the jail root over the initramfs"))?;
            chroot(".").map_err(sys("chroot into the jail"))?;
        }
        Err(e) => return Err(sys("pivot_root into the jail")(e)),
    }
    chdir("/").map_err(sys("chdir to the new root"))?;
    drop_privileges(jail)?;
    // SAFETY: prctl with integer arguments; the parent-death signal must be set after the
    // uid change, which clears it.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(sys("set the parent-death signal")(nix::Error::last()));
    }
    let mut ready = ready;
    ready.write_all(b"j").map_err(|source| JailError::Pipe {
        what: "tell the supervisor",
        source,
    })?;
    Ok(())
}

/// Drops the bounding and ambient capability sets, supplementary groups, then switches to
/// the jail's gid and uid (all of real, effective, saved), and sets no_new_privs.
pub fn drop_privileges(jail: &JailConfig) -> Result<(), JailError> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments; EINVAL marks the first unknown capability.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            if nix::Error::last() == nix::Error::EINVAL {
                break;
            }
            return Err(sys("drop the capability bounding set")(nix::Error::last()));
        }
    }
    // SAFETY: prctl with integer arguments.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(sys("clear the ambient capabilities")(nix::Error::last()));
    }
    setgroups(&[]).map_err(sys("drop supplementary groups"))?;
    let gid = Gid::from_raw(jail.gid);
    setresgid(gid, gid, gid).map_err(sys("set the jail gid"))?;
    let uid = Uid::from_raw(jail.uid);
    setresuid(uid, uid, uid).map_err(sys("set the jail uid"))?;
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(sys("set no_new_privs")(nix::Error::last()));
    }
    Ok(())
}

/// The supervisor (step 5): waits until the VMM is jailed (or gone), confines itself the
/// same way (chroot instead of namespaces), then forwards SIGTERM/SIGINT to the VMM until
/// it exits. Returns the exit status to exit with. `signals` must hold SIGTERM, SIGINT and
/// SIGCHLD, blocked since before the fork.
pub fn supervise(
    child: Pid,
    mut ready: std::io::PipeReader,
    jail: &JailConfig,
    seccomp_on: bool,
    signals: &libc::sigset_t,
) -> Result<i32, JailError> {
    // One byte once the VMM is jailed (from then on our uid may signal it), or EOF if it
    // exited first.
    let mut byte = [0u8; 1];
    let _ = ready.read(&mut byte);
    drop(ready);
    chroot(&jail.root).map_err(sys("chroot the supervisor"))?;
    chdir("/").map_err(sys("chdir the supervisor"))?;
    drop_privileges(jail)?;
    if seccomp_on {
        seccomp::install(ThreadKind::Supervisor)?;
    }
    loop {
        let mut sig = 0;
        // SAFETY: `signals` is an initialised set, blocked in this thread; `sig` is a valid
        // out-pointer.
        if unsafe { libc::sigwait(signals, &mut sig) } != 0 {
            continue;
        }
        match sig {
            libc::SIGTERM | libc::SIGINT => {
                let s = Signal::try_from(sig).unwrap_or(Signal::SIGTERM);
                if let Err(e) = kill(child, s) {
                    tracing::warn!(error = %e, "cannot forward the signal to the jailed VMM");
                }
            }
            _ => match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
                Ok(_) => {}
                Err(e) => return Err(sys("wait for the jailed VMM")(e)),
            },
        }
    }
}
