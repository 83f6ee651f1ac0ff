//! The process's own settings, applied by the container init just before
//! exec: rlimits, oom_score_adj, user and groups, capabilities, umask,
//! working directory, environment, the executable's path, no_new_privs.

use std::collections::HashSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{PosixRlimitType, Process};

use crate::container::user;

/// The PATH used to find the executable when the environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors preparing or executing the process; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("the process has no arguments")]
    NoArgs,
    #[error("setting rlimit {0}: {1}")]
    Rlimit(String, nix::Error),
    #[error("setting oom_score_adj: {0}")]
    OomScoreAdj(std::io::Error),
    #[error("{0}")]
    User(#[from] user::UserError),
    #[error("setting {what} to {id}: {source}")]
    Identity {
        what: &'static str,
        id: String,
        source: nix::Error,
    },
    #[error("unknown capability {0}")]
    UnknownCapability(String),
    #[error("setting capabilities ({set}): {source}")]
    Caps {
        set: &'static str,
        source: caps::errors::CapsError,
    },
    #[error("chdir to working directory {path}: {source}")]
    Cwd { path: PathBuf, source: nix::Error },
    #[error("executable file {0:?} not found in $PATH")]
    NotFound(String),
    #[error("exec {path}: {source}")]
    Exec { path: String, source: nix::Error },
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(nix::Error),
    #[error("{0}")]
    Seccomp(#[from] super::seccomp::SeccompError),
}

/// A process ready to exec.
#[derive(Debug)]
pub struct Prepared {
    pub path: CString,
    pub args: Vec<CString>,
    pub env: Vec<CString>,
    pub no_new_privs: bool,
    /// Seccomp filters still to install (right before exec).
    pub seccomp: Vec<seccompiler::BpfProgram>,
}

fn cstring(s: &str) -> Result<CString, ProcessError> {
    CString::new(s).map_err(|_| ProcessError::Nul(s.to_owned()))
}

fn rlimit_resource(t: PosixRlimitType) -> Option<Resource> {
    use PosixRlimitType as T;
    Some(match t {
        T::RlimitCpu => Resource::RLIMIT_CPU,
        T::RlimitFsize => Resource::RLIMIT_FSIZE,
        T::RlimitData => Resource::RLIMIT_DATA,
        T::RlimitStack => Resource::RLIMIT_STACK,
        T::RlimitCore => Resource::RLIMIT_CORE,
        T::RlimitRss => Resource::RLIMIT_RSS,
        T::RlimitNproc => Resource::RLIMIT_NPROC,
        T::RlimitNofile => Resource::RLIMIT_NOFILE,
        T::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        T::RlimitAs => Resource::RLIMIT_AS,
        T::RlimitLocks => Resource::RLIMIT_LOCKS,
        T::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        T::RlimitNice => Resource::RLIMIT_NICE,
        T::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        T::RlimitRttime => Resource::RLIMIT_RTTIME,
    })
}

/// Writes oom_score_adj; a value below the current one that the kernel
/// refuses (no CAP_SYS_RESOURCE in the bounding set) is clamped to the
/// current value, with a warning, as containerd's restrict_oom_score_adj.
fn set_oom_score_adj(value: i32, warnings: &mut Vec<String>) -> Result<(), ProcessError> {
    const PATH: &str = "/proc/self/oom_score_adj";
    match std::fs::write(PATH, value.to_string()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let current: i32 = std::fs::read_to_string(PATH)
                .map_err(ProcessError::OomScoreAdj)?
                .trim()
                .parse()
                .unwrap_or(0);
            if value < current {
                warnings.push(format!(
                    "oom_score_adj {value} refused by the kernel; clamped to {current}"
                ));
                Ok(())
            } else {
                Err(ProcessError::OomScoreAdj(e))
            }
        }
        Err(e) => Err(ProcessError::OomScoreAdj(e)),
    }
}

fn to_caps(set: Option<&oci_spec::runtime::Capabilities>) -> Result<CapsHashSet, ProcessError> {
    let mut out = HashSet::new();
    for cap in set.into_iter().flatten() {
        let name = serde_json::to_value(cap)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let parsed: Capability = name
            .parse()
            .map_err(|_| ProcessError::UnknownCapability(name.clone()))?;
        out.insert(parsed);
    }
    Ok(out)
}

fn caps_err(set: &'static str) -> impl FnOnce(caps::errors::CapsError) -> ProcessError {
    move |source| ProcessError::Caps { set, source }
}

/// Applies everything but the exec itself. Runs in the container init,
/// after pivot_root (so `/etc/passwd` is the container's).
pub fn prepare(
    p: &Process,
    user_source: &user::UserSource,
    seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
    warnings: &mut Vec<String>,
) -> Result<Prepared, ProcessError> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(ProcessError::NoArgs);
    }
    let no_new_privs = p.no_new_privileges().unwrap_or(false);
    let mut filters = match seccomp {
        Some(profile) => super::seccomp::compile(profile)?,
        None => Vec::new(),
    };
    for rl in p.rlimits().iter().flatten() {
        let Some(resource) = rlimit_resource(rl.typ()) else {
            continue;
        };
        setrlimit(resource, rl.soft(), rl.hard())
            .map_err(|e| ProcessError::Rlimit(rl.typ().to_string(), e))?;
    }
    if let Some(adj) = p.oom_score_adj() {
        set_oom_score_adj(adj, warnings)?;
    }

    let u = p.user();
    let resolved = user::resolve(
        Path::new("/"),
        user_source,
        u.uid(),
        u.gid(),
        u.additional_gids().as_deref().unwrap_or(&[]),
    )?;

    // Without no_new_privs, installing a filter needs CAP_SYS_ADMIN: do it
    // now, before the identity and capability changes (as runc does); the
    // profile must then allow the few calls left before exec.
    if !no_new_privs {
        super::seccomp::install(&filters)?;
        filters.clear();
    }

    // Capabilities: the bounding set is cut while we are still root with
    // every capability; the other sets after the identity change.
    let caps = p.capabilities().as_ref();
    if let Some(c) = caps {
        let bounding = to_caps(c.bounding().as_ref())?;
        for cap in caps::runtime::thread_all_supported() {
            if !bounding.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(caps_err("bounding"))?;
            }
        }
    }
    let gids: Vec<Gid> = resolved.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let id_err = |what, id: u32| {
        move |source| ProcessError::Identity {
            what,
            id: id.to_string(),
            source,
        }
    };
    nix::unistd::setgroups(&gids).map_err(|source| ProcessError::Identity {
        what: "groups",
        id: format!("{:?}", resolved.groups),
        source,
    })?;
    // Keep the permitted set across the uid change; trimmed below.
    nix::sys::prctl::set_keepcaps(true).map_err(id_err("keepcaps", 1))?;
    let gid = Gid::from_raw(resolved.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(id_err("gid", resolved.gid))?;
    let uid = Uid::from_raw(resolved.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(id_err("uid", resolved.uid))?;
    nix::sys::prctl::set_keepcaps(false).map_err(id_err("keepcaps", 0))?;
    if let Some(c) = caps {
        // Inheritable while CAP_SETPCAP is still effective; the effective
        // set must shrink before the permitted set can.
        caps::set(
            None,
            CapSet::Inheritable,
            &to_caps(c.inheritable().as_ref())?,
        )
        .map_err(caps_err("inheritable"))?;
        caps::clear(None, CapSet::Effective).map_err(caps_err("effective"))?;
        caps::set(None, CapSet::Permitted, &to_caps(c.permitted().as_ref())?)
            .map_err(caps_err("permitted"))?;
        caps::set(None, CapSet::Effective, &to_caps(c.effective().as_ref())?)
            .map_err(caps_err("effective"))?;
        for cap in to_caps(c.ambient().as_ref())? {
            caps::raise(None, CapSet::Ambient, cap).map_err(caps_err("ambient"))?;
        }
    }
    if let Some(mask) = u.umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }

    let cwd = p.cwd();
    let cwd = if cwd.as_os_str().is_empty() {
        Path::new("/")
    } else {
        cwd.as_path()
    };
    nix::unistd::chdir(cwd).map_err(|source| ProcessError::Cwd {
        path: cwd.to_owned(),
        source,
    })?;

    let mut env: Vec<String> = p.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", resolved.home.as_deref().unwrap_or("/")));
    }
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_owned();
    let exe = find_executable(&args[0], &path_var)?;

    Ok(Prepared {
        path: cstring(&exe)?,
        args: args.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?,
        env: env.iter().map(|e| cstring(e)).collect::<Result<_, _>>()?,
        no_new_privs,
        seccomp: filters,
    })
}

/// Finds `name` as execvp would: as given when it contains a `/`, else in
/// each directory of `path_var`. A file that exists but is not executable
/// is returned so that exec reports EACCES.
pub fn find_executable(name: &str, path_var: &str) -> Result<String, ProcessError> {
    if name.contains('/') {
        return Ok(name.to_owned());
    }
    let mut found_not_executable = None;
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let candidate = candidate.to_string_lossy().into_owned();
        if nix::unistd::access(candidate.as_str(), nix::unistd::AccessFlags::X_OK).is_ok() {
            return Ok(candidate);
        }
        found_not_executable.get_or_insert(candidate);
    }
    found_not_executable.ok_or_else(|| ProcessError::NotFound(name.to_owned()))
}

/// Sets every signal back to its default action. Handlers are reset by
/// exec anyway, but an *ignored* signal stays ignored across exec: the
/// helper's Rust runtime ignores SIGPIPE, and the agent inherits whatever
/// its own parent ignored. The raw syscall is used because glibc refuses its
/// internal real-time signals.
fn reset_signal_dispositions() {
    // The kernel's struct sigaction, all zero: handler SIG_DFL (0), no
    // flags, no restorer, an empty mask.
    let default_action = [0u64; 4];
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads a kernel sigaction (32 bytes, valid for
        // the call) and writes nothing (null old action); the sigset size
        // is the kernel's, 8 bytes.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                default_action.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            )
        };
    }
}

/// Execs the prepared process; returns only on failure.
pub fn exec(p: &Prepared) -> ProcessError {
    // Everything the agent handed down besides stdio is closed by the exec;
    // the sync fd thereby tells the agent that the exec succeeded.
    // SAFETY: close_range only sets a flag on fds of this process.
    unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
    reset_signal_dispositions();
    if p.no_new_privs {
        if let Err(e) = nix::sys::prctl::set_no_new_privs() {
            return ProcessError::NoNewPrivs(e);
        }
    }
    if let Err(e) = super::seccomp::install(&p.seccomp) {
        return e.into();
    }
    match nix::unistd::execve(&p.path, &p.args, &p.env) {
        Err(source) => ProcessError::Exec {
            path: p.path.to_string_lossy().into_owned(),
            source,
        },
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_executables_like_execvp() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(bin.join("tool"), "").unwrap();
        std::fs::set_permissions(bin.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(bin.join("data"), "").unwrap();
        std::fs::set_permissions(bin.join("data"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = format!("/nonexistent:{}", bin.display());
        assert_eq!(
            find_executable("tool", &path).unwrap(),
            bin.join("tool").to_str().unwrap()
        );
        assert_eq!(find_executable("./x", &path).unwrap(), "./x");
        assert!(matches!(
            find_executable("missing", &path),
            Err(ProcessError::NotFound(_))
        ));
        // Not executable: still returned, so that exec names EACCES (root
        // passes access(X_OK) only if some x bit is set).
        assert!(find_executable("data", &path).is_ok());
    }

    #[test]
    fn capability_names_map_to_the_kernel_ones() {
        let set: oci_spec::runtime::Capabilities = [
            oci_spec::runtime::Capability::Chown,
            oci_spec::runtime::Capability::NetBindService,
        ]
        .into_iter()
        .collect();
        let caps = to_caps(Some(&set)).unwrap();
        assert!(caps.contains(&Capability::CAP_CHOWN));
        assert!(caps.contains(&Capability::CAP_NET_BIND_SERVICE));
        assert_eq!(caps.len(), 2);
    }
}
