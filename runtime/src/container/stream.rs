//! Interactive processes for the streaming server: a process started
//! through the agent (CRI Exec) whose stdin, output, terminal size and exit
//! the caller drives (ExecSync in `mod.rs` is the batch variant of the same
//! agent calls); and the container's own process (CRI Attach), whose output
//! the log copier fans out to every attach session ([`OutputFanout`]).

use carapace_agent_api::v1::{
    ExecProcessRequest, ExitStatus, OutputChunk, ProcessRef, ReadOutputRequest, ResizeTtyRequest,
    SignalProcessRequest, WaitProcessRequest, WriteStdinRequest,
};

use std::collections::HashMap;

use tokio::sync::broadcast;

use super::{agent_err, lock, ContainerError, ContainerState, Containers, SIGKILL};
use crate::agent_client::AgentClient;

/// A running process in a container (an exec), as the agent knows it.
#[derive(Clone)]
pub struct ExecHandle {
    pub(super) agent: AgentClient,
    pub(super) process: ProcessRef,
}

/// What a streaming exec asks for.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
}

/// Chunks an attach session may fall behind before it loses the oldest
/// (the log copier never waits for attach sessions).
const FANOUT_DEPTH: usize = 256;

/// The output of running containers, for attach sessions. The agent has one
/// reader per process, the log copier (`copy_output` in `mod.rs`): it hands
/// every chunk here too. A container without a log path has no copier, so
/// attach to it sees no output.
#[derive(Default)]
pub struct OutputFanout(std::sync::Mutex<HashMap<String, broadcast::Sender<OutputChunk>>>);

impl OutputFanout {
    /// The sender of container `id` (made on first use).
    pub(super) fn open(&self, id: &str) -> broadcast::Sender<OutputChunk> {
        lock(&self.0)
            .entry(id.to_owned())
            .or_insert_with(|| broadcast::channel(FANOUT_DEPTH).0)
            .clone()
    }

    /// The container's output ended: sessions see the end once the copier
    /// dropped its sender too.
    pub(super) fn close(&self, id: &str) {
        lock(&self.0).remove(id);
    }

    fn subscribe(&self, id: &str) -> Option<broadcast::Receiver<OutputChunk>> {
        lock(&self.0).get(id).map(|tx| tx.subscribe())
    }
}

impl Containers {
    /// CRI Attach: the container's own process (stdin, resize) and its
    /// output from now on.
    pub async fn attach(
        &self,
        id: &str,
    ) -> Result<(ExecHandle, broadcast::Receiver<OutputChunk>), ContainerError> {
        let entry = self.entry(id)?;
        let sandbox_id = {
            let r = entry.record.lock().await;
            if r.state != ContainerState::Running {
                return Err(ContainerError::FailedPrecondition(format!(
                    "container {id} is not running"
                )));
            }
            r.sandbox_id.clone()
        };
        let output = self.fanout.subscribe(id).ok_or_else(|| {
            ContainerError::FailedPrecondition(format!(
                "container {id} has no log path: its output cannot be attached to"
            ))
        })?;
        let agent = self.agent(&sandbox_id).await?;
        Ok((
            ExecHandle {
                agent,
                process: ProcessRef {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                },
            },
            output,
        ))
    }

    /// Fails unless the container exists and runs.
    pub async fn check_running(&self, id: &str) -> Result<(), ContainerError> {
        let entry = self.entry(id)?;
        if entry.record.lock().await.state != ContainerState::Running {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        Ok(())
    }

    /// Starts `spec.cmd` in the running container `id` with the container's
    /// own process settings (env, user, cwd), as ExecSync does.
    pub async fn start_exec(
        &self,
        id: &str,
        spec: &ExecSpec,
    ) -> Result<ExecHandle, ContainerError> {
        if spec.cmd.is_empty() {
            return Err(ContainerError::InvalidArgument("exec cmd is empty".into()));
        }
        let entry = self.entry(id)?;
        let (sandbox_id, process_json, username, gid_from_passwd, group, strict) = {
            let r = entry.record.lock().await;
            if r.state != ContainerState::Running {
                return Err(ContainerError::FailedPrecondition(format!(
                    "container {id} is not running"
                )));
            }
            (
                r.sandbox_id.clone(),
                r.process_json.clone(),
                r.username.clone(),
                r.gid_from_passwd,
                r.group.clone(),
                r.strict_supplemental_groups,
            )
        };
        let mut process: serde_json::Value =
            serde_json::from_str(&process_json).map_err(|e| ContainerError::Io {
                what: "reading the recorded process".into(),
                source: e.into(),
            })?;
        process["args"] = serde_json::json!(spec.cmd);
        process["terminal"] = serde_json::json!(spec.tty);
        let agent = self.agent(&sandbox_id).await?;
        let exec_id = crate::sandbox::new_id()
            .map(|id| id[..16].to_owned())
            .map_err(|e| ContainerError::Io {
                what: "making an exec id".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        agent
            .rpc()
            .exec_process(ExecProcessRequest {
                container_id: id.to_owned(),
                exec_id: exec_id.clone(),
                oci_process_json: process.to_string(),
                username,
                gid_from_passwd,
                group,
                strict_supplemental_groups: strict,
                stdin: spec.stdin,
            })
            .await
            .map_err(agent_err)?;
        Ok(ExecHandle {
            agent,
            process: ProcessRef {
                container_id: id.to_owned(),
                exec_id,
            },
        })
    }
}

impl ExecHandle {
    /// The process's output until both streams end (one stream in terminal
    /// mode). The agent keeps output until it is read, so a stream opened
    /// after the exit still has all of it.
    pub async fn output(&self) -> Result<tonic::Streaming<OutputChunk>, ContainerError> {
        Ok(self
            .agent
            .rpc()
            .read_output(ReadOutputRequest {
                process: Some(self.process.clone()),
            })
            .await
            .map_err(agent_err)?
            .into_inner())
    }

    /// Writes to stdin; `close` closes it after `data`.
    pub async fn write_stdin(&self, data: Vec<u8>, close: bool) -> Result<(), ContainerError> {
        self.agent
            .rpc()
            .write_stdin(WriteStdinRequest {
                process: Some(self.process.clone()),
                data,
                close,
            })
            .await
            .map_err(agent_err)?;
        Ok(())
    }

    /// Resizes the process's terminal.
    pub async fn resize(&self, cols: u32, rows: u32) -> Result<(), ContainerError> {
        self.agent
            .rpc()
            .resize_tty(ResizeTtyRequest {
                process: Some(self.process.clone()),
                rows,
                cols,
            })
            .await
            .map_err(agent_err)?;
        Ok(())
    }

    /// Waits for the exit (after which the agent forgets the exec, once its
    /// output was read too).
    pub async fn wait(&self) -> Result<ExitStatus, ContainerError> {
        self.agent
            .rpc()
            .wait_process(WaitProcessRequest {
                process: Some(self.process.clone()),
            })
            .await
            .map_err(agent_err)?
            .into_inner()
            .status
            .ok_or_else(|| ContainerError::Io {
                what: "waiting for the exec".into(),
                source: std::io::Error::other("the agent sent no exit status"),
            })
    }

    /// SIGKILL (the client went away); a process already gone is fine.
    pub async fn kill(&self) {
        let _ = self
            .agent
            .rpc()
            .signal_process(SignalProcessRequest {
                process: Some(self.process.clone()),
                signal: SIGKILL,
            })
            .await;
    }
}
