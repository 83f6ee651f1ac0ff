//! The container-side half of process creation, run in a fresh process.
//!
//! The agent is multi-threaded (tokio), and forking a multi-threaded
//! process only to run arbitrary code in the child is unsound (locks held
//! by other threads stay locked). So the agent spawns *itself*
//! (`/proc/self/exe __carapace-init`, a plain fork+exec), and this freshly
//! exec'd, single-threaded helper does the work:
//!
//! 1. reads its [`InitConfig`] from fd 3;
//! 2. joins the container's cgroup, joins namespaces (the pod's pid/ipc,
//!    or for an exec the container's), unshares the new ones;
//! 3. forks (so that the child is inside the new pid namespace), reports
//!    the child's pid on fd 4 and exits. The child is reparented to the
//!    agent (init in the guest, a child subreaper on a host);
//! 4. the child builds the root filesystem, sets up the user, rlimits and
//!    capabilities, finds the executable, reports `Ready`, waits for the
//!    start byte on fd 5 and execs. fd 4 is close-on-exec, so the agent sees
//!    end of file on success and an `Error` message on failure.
//!
//! Nothing here logs to stderr: stderr belongs to the container.

pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod syscall;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, RawFd};
use std::path::PathBuf;

use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::ForkResult;
use serde::{Deserialize, Serialize};

use rootfs::RootfsConfig;

/// The hidden first argument that makes `carapace-agent` the helper.
pub const INIT_ARG: &str = "__carapace-init";
/// The helper reads its configuration (JSON) from this fd until EOF.
pub const CONFIG_FD: RawFd = 3;
/// The helper and its child write [`InitMessage`] lines to this fd.
pub const SYNC_FD: RawFd = 4;
/// The child reads one byte from this fd before it execs.
pub const START_FD: RawFd = 5;

/// A namespace type, as in `/proc/<pid>/ns/<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ns {
    Mount,
    Uts,
    Ipc,
    Pid,
    Cgroup,
}

impl Ns {
    pub fn flag(self) -> CloneFlags {
        match self {
            Ns::Mount => CloneFlags::CLONE_NEWNS,
            Ns::Uts => CloneFlags::CLONE_NEWUTS,
            Ns::Ipc => CloneFlags::CLONE_NEWIPC,
            Ns::Pid => CloneFlags::CLONE_NEWPID,
            Ns::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        }
    }

    pub fn proc_name(self) -> &'static str {
        match self {
            Ns::Mount => "mnt",
            Ns::Uts => "uts",
            Ns::Ipc => "ipc",
            Ns::Pid => "pid",
            Ns::Cgroup => "cgroup",
        }
    }
}

/// What the helper is asked to create.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum InitKind {
    /// A container's own process, in its new root filesystem.
    Container(Box<RootfsConfig>),
    /// A process in an existing container (namespaces joined).
    Exec,
    /// The holder of the pod's shared pid and IPC namespaces: PID 1 of the
    /// pod pid namespace, reaping orphans until the VM stops.
    PodHolder,
}

/// Everything the helper needs, sent by the agent on [`CONFIG_FD`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    pub kind: InitKind,
    pub process: Option<oci_spec::runtime::Process>,
    /// What decides the process's uid and gid besides `process.user`.
    pub user: super::user::UserSource,
    /// The cgroup.procs file to join first (the child inherits it).
    pub cgroup_procs: Option<PathBuf>,
    /// Namespaces to enter, in order, before unsharing.
    pub join: Vec<(Ns, PathBuf)>,
    /// Namespaces to create.
    pub unshare: Vec<Ns>,
    /// The seccomp profile, installed last.
    #[serde(default)]
    pub seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
}

/// One line on [`SYNC_FD`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InitMessage {
    /// The child's pid, in the agent's pid namespace.
    Pid(i32),
    /// Something the agent should log (e.g. a clamped oom_score_adj).
    Warning(String),
    /// Set up and waiting for the start byte.
    Ready,
    /// Setup or exec failed; the process exits.
    Error(String),
}

/// Errors of the helper; sent to the agent as the `Error` message text.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("reading the init configuration: {0}")]
    Config(String),
    #[error("joining cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("joining namespace {path}: {source}")]
    Join { path: PathBuf, source: nix::Error },
    #[error("creating namespaces: {0}")]
    Unshare(nix::Error),
    #[error("fork: {0}")]
    Fork(nix::Error),
    #[error("setting up the terminal: {0}")]
    Terminal(nix::Error),
    #[error("{0}")]
    Rootfs(#[from] rootfs::RootfsError),
    #[error("{0}")]
    Process(#[from] process::ProcessError),
}

fn send(sync: &mut File, msg: &InitMessage) {
    if let Ok(mut line) = serde_json::to_vec(msg) {
        line.push(b'\n');
        // Nothing to do if the agent went away.
        let _ = sync.write_all(&line);
    }
}

/// The helper's entry point; never returns.
pub fn main() -> ! {
    // SAFETY: the agent passes SYNC_FD open to the helper and nothing else
    // in this process owns it.
    let mut sync = unsafe { File::from_raw_fd(SYNC_FD) };
    match run(&mut sync) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            send(&mut sync, &InitMessage::Error(e.to_string()));
            std::process::exit(1)
        }
    }
}

fn read_config() -> Result<InitConfig, InitError> {
    // SAFETY: the agent passes CONFIG_FD open to the helper and nothing else
    // in this process owns it.
    let mut file = unsafe { File::from_raw_fd(CONFIG_FD) };
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)
        .map_err(|e| InitError::Config(e.to_string()))?;
    serde_json::from_slice(&buf).map_err(|e| InitError::Config(e.to_string()))
}

/// Runs the helper; returns the exit code of the helper (parent side) or
/// does not return (child side, after exec).
fn run(sync: &mut File) -> Result<i32, InitError> {
    let config = read_config()?;
    if let Some(path) = &config.cgroup_procs {
        std::fs::write(path, std::process::id().to_string()).map_err(|source| {
            InitError::Cgroup {
                path: path.clone(),
                source,
            }
        })?;
    }
    for (ns, path) in &config.join {
        let join_err = |source| InitError::Join {
            path: path.clone(),
            source,
        };
        let file = File::open(path).map_err(|e| join_err(io_errno(&e)))?;
        nix::sched::setns(&file, ns.flag()).map_err(join_err)?;
    }
    let flags = config
        .unshare
        .iter()
        .fold(CloneFlags::empty(), |f, ns| f | ns.flag());
    if !flags.is_empty() {
        nix::sched::unshare(flags).map_err(InitError::Unshare)?;
    }

    // SAFETY: this process is single-threaded (a fresh exec of the agent
    // binary that started no threads), so the child may run any code.
    match unsafe { nix::unistd::fork() }.map_err(InitError::Fork)? {
        ForkResult::Parent { child } => {
            send(sync, &InitMessage::Pid(child.as_raw()));
            Ok(0)
        }
        ForkResult::Child => child(sync, config),
    }
}

fn io_errno(e: &std::io::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

fn child(sync: &mut File, config: InitConfig) -> Result<i32, InitError> {
    if let InitKind::PodHolder = config.kind {
        send(sync, &InitMessage::Ready);
        hold_namespaces();
    }
    let process = config.process.unwrap_or_default();
    nix::unistd::setsid().map_err(InitError::Terminal)?;
    if process.terminal().unwrap_or(false) {
        // SAFETY: TIOCSCTTY on fd 0 (the terminal's slave) with argument 0;
        // no memory is passed.
        let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        if rc != 0 {
            return Err(InitError::Terminal(nix::Error::last()));
        }
    }
    if let InitKind::Container(rootfs_config) = &config.kind {
        rootfs::setup(&syscall::LinuxSyscall, rootfs_config)?;
    }
    let mut warnings = Vec::new();
    let prepared = process::prepare(
        &process,
        &config.user,
        config.seccomp.as_ref(),
        &mut warnings,
    )?;
    for w in warnings {
        send(sync, &InitMessage::Warning(w));
    }
    send(sync, &InitMessage::Ready);
    // SAFETY: the agent passes START_FD open and nothing else owns it.
    let mut start = unsafe { File::from_raw_fd(START_FD) };
    let mut byte = [0u8; 1];
    match start.read(&mut byte) {
        Ok(1) => {}
        // The agent closed the pipe without starting us: deleted.
        _ => std::process::exit(0),
    }
    drop(start);
    let e = process::exec(&prepared);
    Err(e.into())
}

/// PID 1 of the pod's pid namespace: reaps whatever is orphaned there, and
/// ends when the agent does (the agent keeps the start pipe's write end
/// open for the holder's life; its end of file means the agent is gone).
fn hold_namespaces() -> ! {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use std::os::fd::BorrowedFd;

    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    let _ = set.thread_block();
    let Ok(sigchld) = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
    else {
        std::process::exit(1)
    };
    // SAFETY: the agent passes START_FD open for the helper's whole life and
    // nothing else in this process closes it.
    let agent = unsafe { BorrowedFd::borrow_raw(START_FD) };
    loop {
        let mut fds = [
            PollFd::new(agent, PollFlags::POLLIN),
            PollFd::new(sigchld.as_fd(), PollFlags::POLLIN),
        ];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let agent_gone = fds[0].revents().is_some_and(|r| !r.is_empty());
        while sigchld.read_signal().is_ok_and(|s| s.is_some()) {}
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if status == nix::sys::wait::WaitStatus::StillAlive {
                break;
            }
        }
        if agent_gone {
            std::process::exit(0);
        }
    }
}
