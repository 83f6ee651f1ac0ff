//! A VM's host processes (the monitor, its device backends), held by pid so
//! that they outlive a restart of the daemon.
//!
//! Processes are spawned in their own process group (a signal to the
//! daemon's terminal does not reach them) and, while the daemon that spawned
//! them runs, reaped by a background task. After a restart the daemon finds
//! them again from their recorded pid, and checks that the pid still belongs
//! to the same process (its start time, from `/proc/<pid>/stat`) before it
//! signals it: a recycled pid is never killed.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// A spawned process, identified by pid and start time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProcess {
    pub name: String,
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot.
    pub start_ticks: u64,
}

impl VmProcess {
    /// Spawns `command` detached from the daemon's process group, with
    /// stdin closed and stderr to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> std::io::Result<Self> {
        let log = std::fs::File::create(log)?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("spawned process has no pid"))?;
        let start_ticks = start_ticks(pid).unwrap_or(0);
        // Reap the child when it exits, so it never lingers as a zombie.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(Self {
            name: name.to_owned(),
            pid,
            start_ticks,
        })
    }

    /// Whether this very process still runs (not a zombie, pid not reused).
    pub fn is_running(&self) -> bool {
        match proc_stat(self.pid) {
            Some(stat) => stat.ticks == self.start_ticks && stat.state != 'Z' && stat.state != 'X',
            None => false,
        }
    }

    /// Whether this process ended but is still this daemon's zombie child:
    /// the reaper task collects it soon. Until then it shows in `ps`, and
    /// would become init's zombie if the daemon exited now.
    fn is_unreaped_child(&self) -> bool {
        proc_stat(self.pid).is_some_and(|stat| {
            stat.ticks == self.start_ticks && stat.state == 'Z' && stat.ppid == std::process::id()
        })
    }

    /// The pids of this process's children (a jailed VMM's supervisor has
    /// one: the VMM), found by their parent pid in `/proc`.
    pub fn children(&self) -> Vec<u32> {
        if !self.is_running() {
            return Vec::new();
        }
        all_pids()
            .filter(|pid| proc_stat(*pid).is_some_and(|stat| stat.ppid == self.pid))
            .collect()
    }

    /// Sends `signal` if the process still runs.
    pub fn signal(&self, signal: Signal) {
        if self.is_running() {
            if let Ok(pid) = i32::try_from(self.pid) {
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once it is gone.
    pub async fn stop(&self, grace: Duration) {
        self.signal(Signal::SIGTERM);
        if !self.wait_exit(grace).await {
            self.signal(Signal::SIGKILL);
            self.wait_exit(Duration::from_secs(5)).await;
        }
    }

    /// Kills the process at once (synchronous: usable from `Drop`). It is
    /// gone soon after, not yet on return: the daemon waits for every
    /// process killed so before it exits ([`wait_killed`]).
    pub fn kill_now(&self) {
        self.signal(Signal::SIGKILL);
        let mut killed = KILLED.lock().unwrap_or_else(|e| e.into_inner());
        killed.retain(|p| p.is_running() || p.is_unreaped_child());
        killed.push(self.clone());
    }

    /// Waits up to `timeout` for the process to end (and, if it is this
    /// daemon's child, to be reaped); true if it did.
    pub async fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_running() || self.is_unreaped_child() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// Processes killed by [`VmProcess::kill_now`] that may not be gone yet.
static KILLED: std::sync::Mutex<Vec<VmProcess>> = std::sync::Mutex::new(Vec::new());

/// Waits up to `timeout` until every process [`VmProcess::kill_now`] killed
/// is gone and, if it was this daemon's child, reaped; true if all are. The
/// daemon calls it last: a start cut short by the shutdown (its future
/// dropped) kills its processes from `Drop`, which cannot wait, and none of
/// them may outlive the daemon or be left as a zombie of init.
pub async fn wait_killed(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let killed = std::mem::take(&mut *KILLED.lock().unwrap_or_else(|e| e.into_inner()));
    let mut all = true;
    for process in killed {
        all &= process
            .wait_exit(deadline.saturating_duration_since(Instant::now()))
            .await;
    }
    all
}

/// The pids of every process on the host (the numeric entries of `/proc`).
pub fn all_pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
}

fn start_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|stat| stat.ticks)
}

/// What the daemon reads of `/proc/<pid>/stat`.
#[derive(Debug, PartialEq, Eq)]
struct ProcStat {
    /// Field 3: `R`, `S`, `Z`...
    state: char,
    /// Field 4: the parent's pid.
    ppid: u32,
    /// Field 22: start time in clock ticks after boot.
    ticks: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<ProcStat> {
    // The command name (field 2) may contain spaces and parentheses: the
    // fields we want follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    // `rest` starts at field 3 (state); start time is field 22.
    let ticks = fields.nth(17)?.parse().ok()?;
    Some(ProcStat { state, ppid, ticks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 987654 1000 10";
        assert_eq!(
            parse_stat(stat),
            Some(ProcStat {
                state: 'S',
                ppid: 1,
                ticks: 987654
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[tokio::test]
    async fn spawn_observe_and_stop() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let p = VmProcess::spawn("sleep", cmd, &dir.path().join("log")).unwrap();
        assert!(p.is_running());
        // A record with another start time is not this process.
        let impostor = VmProcess {
            start_ticks: p.start_ticks + 1,
            ..p.clone()
        };
        assert!(!impostor.is_running());
        p.stop(Duration::from_secs(2)).await;
        assert!(!p.is_running());
        assert!(
            !Path::new(&format!("/proc/{}", p.pid)).exists(),
            "stop() returns once the child is reaped, not a zombie"
        );
    }

    #[tokio::test]
    async fn processes_killed_from_drop_are_awaited() {
        let dir = tempfile::tempdir().unwrap();
        let mut killed = Vec::new();
        for i in 0..3 {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            let p = VmProcess::spawn("sleep", cmd, &dir.path().join(format!("log{i}"))).unwrap();
            p.kill_now();
            killed.push(p);
        }
        assert!(wait_killed(Duration::from_secs(5)).await);
        for p in &killed {
            assert!(
                !Path::new(&format!("/proc/{}", p.pid)).exists(),
                "{} is gone and reaped when wait_killed returns",
                p.pid
            );
        }
        // Nothing left to wait for.
        assert!(KILLED.lock().unwrap().iter().all(|p| !killed.contains(p)));
    }
}
