//! The protocol-neutral core of an exec session: the wire protocol
//! (WebSocket or SPDY) turns client frames into [`Input`] and sends the
//! [`Output`] it is given; this drives the process in the guest.
//!
//! Both directions go through bounded channels, so a slow client slows the
//! reading of the agent's output (which then blocks the process as a full
//! pipe would) instead of making the daemon buffer without bound.

use std::time::Duration;

use carapace_agent_api::v1::{OutputChunk, OutputStream};
use tokio::sync::{broadcast, mpsc};

use super::status::{Outcome, TerminalSize};
use crate::container::stream::ExecHandle;

/// How many messages wait in either direction.
pub const CHANNEL_DEPTH: usize = 16;
/// How long the output may go on after the exit (a background child that
/// keeps the pipe open) before the status is sent anyway.
const OUTPUT_AFTER_EXIT: Duration = Duration::from_secs(5);

/// Which streams the client asked for.
#[derive(Debug, Clone, Copy)]
pub struct Streams {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// From the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    Stdin(Vec<u8>),
    CloseStdin,
    Resize(TerminalSize),
}

/// To the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// What a session drives.
pub enum Target {
    /// A new process (CRI Exec).
    Exec(ExecHandle),
    /// The container's own process (CRI Attach) and its output.
    Attach(ExecHandle, broadcast::Receiver<OutputChunk>),
}

impl Target {
    /// Runs the session in its own task.
    pub fn spawn(
        self,
        input: mpsc::Receiver<Input>,
        output: mpsc::Sender<Output>,
    ) -> tokio::task::JoinHandle<Outcome> {
        match self {
            Target::Exec(handle) => tokio::spawn(run_exec(handle, input, output)),
            Target::Attach(handle, chunks) => {
                tokio::spawn(run_attach(handle, chunks, input, output))
            }
        }
    }

    /// The client never came: an exec is killed, an attach left alone.
    pub async fn abandon(self) {
        if let Target::Exec(handle) = self {
            handle.kill().await;
        }
    }
}

fn output_of(chunk: OutputChunk) -> Output {
    if chunk.stream == OutputStream::Stderr as i32 {
        Output::Stderr(chunk.data)
    } else {
        Output::Stdout(chunk.data)
    }
}

/// Forwards one client message to the process.
async fn forward(handle: &ExecHandle, input: Input) {
    let result = match input {
        Input::Stdin(data) => handle.write_stdin(data, false).await,
        Input::CloseStdin => handle.write_stdin(Vec::new(), true).await,
        Input::Resize(size) => handle.resize(size.width.into(), size.height.into()).await,
    };
    if let Err(e) = result {
        tracing::debug!("stream input: {e}");
    }
}

/// Runs an attach until the container's output ends (success) or the
/// client leaves (the container goes on). A session that falls more than
/// the fan-out's depth behind loses the oldest chunks.
pub async fn run_attach(
    handle: ExecHandle,
    mut chunks: broadcast::Receiver<OutputChunk>,
    mut input: mpsc::Receiver<Input>,
    output: mpsc::Sender<Output>,
) -> Outcome {
    loop {
        tokio::select! {
            msg = input.recv() => match msg {
                Some(msg) => forward(&handle, msg).await,
                None => return Outcome::Exited(0),
            },
            chunk = chunks.recv() => match chunk {
                Ok(chunk) => {
                    if output.send(output_of(chunk)).await.is_err() {
                        return Outcome::Exited(0);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("attach session fell behind: {n} output chunks lost");
                }
                Err(broadcast::error::RecvError::Closed) => return Outcome::Exited(0),
            },
        }
    }
}

/// Runs an exec to its end. When `input` closes (the client went away)
/// before the exit, the process is killed. All output is sent before this
/// returns (up to [`OUTPUT_AFTER_EXIT`] after the exit).
pub async fn run_exec(
    handle: ExecHandle,
    mut input: mpsc::Receiver<Input>,
    output: mpsc::Sender<Output>,
) -> Outcome {
    let mut stream = match handle.output().await {
        Ok(s) => s,
        Err(e) => {
            handle.kill().await;
            return Outcome::Failed(e.to_string());
        }
    };
    let reader = tokio::spawn(async move {
        while let Ok(Some(chunk)) = stream.message().await {
            if output.send(output_of(chunk)).await.is_err() {
                break;
            }
        }
    });
    let wait = handle.wait();
    tokio::pin!(wait);
    let mut client_here = true;
    let status = loop {
        tokio::select! {
            msg = input.recv(), if client_here => match msg {
                Some(msg) => forward(&handle, msg).await,
                None => {
                    client_here = false;
                    handle.kill().await;
                }
            },
            status = &mut wait => break status,
        }
    };
    if tokio::time::timeout(OUTPUT_AFTER_EXIT, reader)
        .await
        .is_err()
    {
        tracing::warn!("exec output still open {OUTPUT_AFTER_EXIT:?} after its exit");
    }
    match status {
        Ok(s) => Outcome::Exited(s.exit_code),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}
