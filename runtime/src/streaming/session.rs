//! The protocol-neutral core of an exec session: the wire protocol
//! (WebSocket or SPDY) turns client frames into [`Input`] and sends the
//! [`Output`] it is given; this drives the process in the guest.
//!
//! Both directions go through bounded channels, so a slow client slows the
//! reading of the agent's output (which then blocks the process as a full
//! pipe would) instead of making the daemon buffer without bound.

use std::time::Duration;

use carapace_agent_api::v1::OutputStream;
use tokio::sync::mpsc;

use super::status::{Outcome, TerminalSize};
use crate::container::stream::ExecHandle;

/// How many messages wait in either direction.
pub const CHANNEL_DEPTH: usize = 16;
/// How long the output may go on after the exit (a background child that
/// keeps the pipe open) before the status is sent anyway.
const OUTPUT_AFTER_EXIT: Duration = Duration::from_secs(5);

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
            let out = if chunk.stream == OutputStream::Stderr as i32 {
                Output::Stderr(chunk.data)
            } else {
                Output::Stdout(chunk.data)
            };
            if output.send(out).await.is_err() {
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
                Some(Input::Stdin(data)) => {
                    if let Err(e) = handle.write_stdin(data, false).await {
                        tracing::debug!("exec stdin: {e}");
                    }
                }
                Some(Input::CloseStdin) => {
                    if let Err(e) = handle.write_stdin(Vec::new(), true).await {
                        tracing::debug!("exec stdin close: {e}");
                    }
                }
                Some(Input::Resize(size)) => {
                    if let Err(e) = handle.resize(size.width.into(), size.height.into()).await {
                        tracing::debug!("exec resize: {e}");
                    }
                }
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
