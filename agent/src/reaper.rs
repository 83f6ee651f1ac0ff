//! Reaping children: the agent is PID 1 of the guest (or a child subreaper
//! on a host), so every orphan of every container ends up as its child.
//! One task reaps all of them on SIGCHLD; whoever started a process asks
//! for that pid's status with [`Reaper::watch`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::sync::oneshot;

/// Statuses of reaped pids nobody watched (yet), kept for a late watcher;
/// bounded so that orphans reaped over the VM's life do not pile up.
const MAX_UNCLAIMED: usize = 1024;

#[derive(Debug, Default)]
struct State {
    watchers: HashMap<i32, oneshot::Sender<WaitStatus>>,
    unclaimed: HashMap<i32, WaitStatus>,
    order: VecDeque<i32>,
}

/// The one place where the agent waits for children.
#[derive(Debug, Default)]
pub struct Reaper {
    state: Mutex<State>,
}

impl Reaper {
    /// Starts reaping in the background (needs a tokio runtime).
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let task_reaper = reaper.clone();
        tokio::spawn(async move {
            // Children that ended before the handler was installed.
            task_reaper.reap_all();
            while sigchld.recv().await.is_some() {
                task_reaper.reap_all();
            }
        });
        Ok(reaper)
    }

    /// The exit status of `pid`, once it ends. Call it before the process
    /// can end (the agent's processes wait for a start byte or a config),
    /// so an older unclaimed status of a reused pid is discarded.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<WaitStatus> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.lock();
        state.unclaimed.remove(&pid);
        state.watchers.insert(pid, tx);
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the map is intact.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reap_all(&self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let Some(pid) = status.pid() else { continue };
            let pid = pid.as_raw();
            if !matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
                continue;
            }
            let mut state = self.lock();
            match state.watchers.remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(status);
                }
                None => {
                    if state.unclaimed.insert(pid, status).is_none() {
                        state.order.push_back(pid);
                    }
                    while state.order.len() > MAX_UNCLAIMED {
                        if let Some(old) = state.order.pop_front() {
                            state.unclaimed.remove(&old);
                        }
                    }
                }
            }
        }
    }
}
