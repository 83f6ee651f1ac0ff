//! The agent's side of process creation: spawns the helper
//! (`/proc/self/exe __carapace-init`, see [`super::init`]) with its stdio and
//! protocol fds, sends the configuration, and follows the helper's messages.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::wait::WaitStatus;
use tokio::sync::oneshot;

use super::init::{InitConfig, InitMessage, CONFIG_FD, INIT_ARG, START_FD, SYNC_FD};
use crate::reaper::Reaper;
use crate::stdio::ChildStdio;

/// How long a helper may take to set a process up (TCG guests are slow).
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors creating a process; `Setup` carries the helper's own message.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("creating the helper's pipes: {0}")]
    Pipe(nix::Error),
    #[error("starting the helper: {0}")]
    Spawn(std::io::Error),
    #[error("sending the configuration: {0}")]
    Config(std::io::Error),
    #[error("{0}")]
    Setup(String),
    #[error("the helper ended without a report ({0})")]
    Vanished(String),
    #[error("process setup did not finish within {0:?}")]
    Timeout(Duration),
}

/// A process whose setup finished: it waits for [`Pending::start`].
#[derive(Debug)]
pub struct Pending {
    pub pid: i32,
    exit: Option<oneshot::Receiver<WaitStatus>>,
    start: File,
    sync: BufReader<File>,
}

/// Moves an fd to a number >= 10 (close-on-exec), out of the way of the
/// numbers it is dup2'ed to in the child.
fn high_fd(fd: OwnedFd) -> Result<OwnedFd, SpawnError> {
    let raw = fcntl(fd.as_fd(), FcntlArg::F_DUPFD_CLOEXEC(10)).map_err(SpawnError::Pipe)?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(SpawnError::Pipe)
}

/// Reads the next message; `None` at end of file.
fn next_message(sync: &mut BufReader<File>) -> Option<InitMessage> {
    let mut line = String::new();
    match sync.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => serde_json::from_str(&line)
            .ok()
            .or_else(|| Some(InitMessage::Error(format!("bad helper message {line:?}")))),
    }
}

fn describe(status: Option<WaitStatus>) -> String {
    match status {
        Some(WaitStatus::Exited(_, code)) => format!("exit code {code}"),
        Some(WaitStatus::Signaled(_, sig, _)) => format!("killed by {sig}"),
        _ => "status unknown".into(),
    }
}

/// Spawns the helper for `config` and waits until the new process is set
/// up (`Ready`). On failure every process it created is killed.
pub async fn spawn(
    reaper: &Arc<Reaper>,
    config: &InitConfig,
    stdio: ChildStdio,
) -> Result<(Pending, Vec<String>), SpawnError> {
    let payload = serde_json::to_vec(config).map_err(|e| SpawnError::Config(e.into()))?;
    let (config_r, config_w) = pipe()?;
    let (sync_r, sync_w) = pipe()?;
    let (start_r, start_w) = pipe()?;
    let child_fds: [(OwnedFd, RawFd); 3] = [
        (high_fd(config_r)?, CONFIG_FD),
        (high_fd(sync_w)?, SYNC_FD),
        (high_fd(start_r)?, START_FD),
    ];
    let raw: Vec<(RawFd, RawFd)> = child_fds
        .iter()
        .map(|(fd, target)| (fd.as_raw_fd(), *target))
        .collect();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("carapace-init")
        .arg(INIT_ARG)
        .env_clear()
        .stdin(Stdio::from(stdio.stdin))
        .stdout(Stdio::from(stdio.stdout))
        .stderr(Stdio::from(stdio.stderr));
    // SAFETY: the closure runs between fork and exec and only calls dup2,
    // which is async-signal-safe; the source fds are open in the parent
    // (owned by `child_fds`, alive until after spawn) and numbered >= 10,
    // so no dup2 overwrites a later source.
    unsafe {
        cmd.pre_exec(move || {
            for (src, dst) in &raw {
                if libc::dup2(*src, *dst) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(SpawnError::Spawn)?;
    let helper_pid = i32::try_from(child.id()).unwrap_or(-1);
    // The helper blocks on its configuration, so it cannot have ended yet.
    let helper_exit = reaper.watch(helper_pid);
    drop(child_fds);
    drop(child); // not waited here: the reaper owns all waiting

    let mut config_file = File::from(config_w);
    config_file
        .write_all(&payload)
        .map_err(SpawnError::Config)?;
    drop(config_file);

    let reaper = reaper.clone();
    let sync = BufReader::new(File::from(sync_r));
    let follow = tokio::task::spawn_blocking(move || follow_setup(&reaper, sync));
    let result = match tokio::time::timeout(SETUP_TIMEOUT, follow).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err((None, SpawnError::Vanished(join.to_string()))),
        Err(_) => Err((None, SpawnError::Timeout(SETUP_TIMEOUT))),
    };
    match result {
        Ok((pid, exit, sync, warnings)) => {
            // The helper exits right after reporting the pid.
            let _ = helper_exit.await;
            Ok((
                Pending {
                    pid,
                    exit: Some(exit),
                    start: File::from(start_w),
                    sync,
                },
                warnings,
            ))
        }
        Err((pid, e)) => {
            if let Some(pid) = pid {
                kill(pid);
            }
            kill(helper_pid);
            let e = match e {
                SpawnError::Vanished(_) if pid.is_none() => {
                    let status = tokio::time::timeout(Duration::from_secs(5), helper_exit)
                        .await
                        .ok()
                        .and_then(Result::ok);
                    SpawnError::Vanished(describe(status))
                }
                e => e,
            };
            Err(e)
        }
    }
}

type SetupResult = Result<
    (
        i32,
        oneshot::Receiver<WaitStatus>,
        BufReader<File>,
        Vec<String>,
    ),
    (Option<i32>, SpawnError),
>;

fn follow_setup(reaper: &Reaper, mut sync: BufReader<File>) -> SetupResult {
    let mut pid = None;
    let mut exit = None;
    let mut ready = false;
    let mut warnings = Vec::new();
    // The helper's Pid and its child's Ready come from two processes: in
    // either order.
    loop {
        if let (true, Some(pid)) = (ready, pid) {
            if let Some(exit) = exit.take() {
                return Ok((pid, exit, sync, warnings));
            }
        }
        match next_message(&mut sync) {
            Some(InitMessage::Pid(p)) => {
                pid = Some(p);
                exit = Some(reaper.watch(p));
            }
            Some(InitMessage::Warning(w)) => warnings.push(w),
            Some(InitMessage::Ready) => ready = true,
            Some(InitMessage::Error(e)) => return Err((pid, SpawnError::Setup(e))),
            None => return Err((pid, SpawnError::Vanished(String::new()))),
        }
    }
}

fn kill(pid: i32) {
    if pid > 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Pending {
    /// The process's exit status, once it ends (taken once).
    pub fn take_exit(&mut self) -> Option<oneshot::Receiver<WaitStatus>> {
        self.exit.take()
    }

    /// Lets the process exec. Returns once the exec happened, or the
    /// reason it failed (the process then exits on its own).
    pub async fn start(self) -> Result<(), SpawnError> {
        let Pending {
            pid,
            mut start,
            mut sync,
            ..
        } = self;
        start
            .write_all(&[1])
            .map_err(|e| SpawnError::Setup(format!("starting the process: {e}")))?;
        let follow = tokio::task::spawn_blocking(move || next_message(&mut sync));
        match tokio::time::timeout(SETUP_TIMEOUT, follow).await {
            // End of file: the sync fd was closed by a successful exec.
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(InitMessage::Error(e)))) => Err(SpawnError::Setup(e)),
            Ok(Ok(Some(other))) => Err(SpawnError::Setup(format!("unexpected {other:?}"))),
            Ok(Err(join)) => Err(SpawnError::Vanished(join.to_string())),
            Err(_) => {
                kill(pid);
                Err(SpawnError::Timeout(SETUP_TIMEOUT))
            }
        }
    }

    /// Abandons a process that was never started.
    pub fn abandon(self) {
        kill(self.pid);
    }
}
