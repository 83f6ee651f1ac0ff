//! The runtime's client for the in-guest agent.
//!
//! Both VM drivers expose the guest's vsock the same way (the hybrid-vsock
//! convention of Firecracker): a unix socket on the host. The client connects,
//! writes `CONNECT <port>\n`, reads `OK <host port>\n`, and from then on the
//! stream is a plain byte pipe to the guest port, over which we speak gRPC.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use carapace_agent_api::v1::agent_client::AgentClient as GrpcClient;
use carapace_agent_api::v1::{HealthRequest, HealthResponse};
use carapace_agent_api::{AGENT_VSOCK_PORT, API_VERSION};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// The longest reply line we accept to `CONNECT`: `OK ` plus a u32 and `\n`
/// fits in 14 bytes; anything longer is not a hybrid-vsock peer.
const MAX_REPLY_LEN: usize = 32;

/// How long one connection handshake may take before it is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the VM's vsock socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vsock handshake for port {port} failed: {reason}")]
    Handshake { port: u32, reason: String },
    #[error("agent transport: {}", error_chain(.0))]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Ready(#[from] crate::agent_ready::ReadyError),
    #[error("agent call failed: {0}")]
    Call(#[from] tonic::Status),
    #[error("agent not ready after {waited:?}; last error: {last}")]
    NotReady { waited: Duration, last: String },
}

/// An error and its sources, joined: tonic's transport errors say little
/// on their own ("transport error"); the cause is in the source chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Opens a byte stream to `port` in the guest through the VM's hybrid-vsock
/// unix socket at `uds_path`.
pub async fn connect_hybrid_vsock(uds_path: &Path, port: u32) -> Result<UnixStream, AgentError> {
    let handshake = async {
        let mut stream =
            UnixStream::connect(uds_path)
                .await
                .map_err(|source| AgentError::Connect {
                    path: uds_path.to_owned(),
                    source,
                })?;
        let handshake_err = |reason: String| AgentError::Handshake { port, reason };
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|e| handshake_err(format!("write: {e}")))?;
        // Read the reply one byte at a time: whatever follows the newline
        // belongs to the guest's protocol and must stay in the stream.
        let mut reply = Vec::with_capacity(MAX_REPLY_LEN);
        loop {
            let byte = match stream.read_u8().await {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(handshake_err(
                        "connection closed (nothing listening?)".into(),
                    ))
                }
                Err(e) => return Err(handshake_err(format!("read: {e}"))),
            };
            if byte == b'\n' {
                break;
            }
            if reply.len() == MAX_REPLY_LEN {
                return Err(handshake_err("reply line too long".into()));
            }
            reply.push(byte);
        }
        parse_ok_reply(&reply).map_err(handshake_err)?;
        Ok(stream)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| AgentError::Handshake {
            port,
            reason: format!("no reply within {HANDSHAKE_TIMEOUT:?}"),
        })?
}

/// Parses `OK <port>` (without the newline) and returns the port.
fn parse_ok_reply(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "reply is not text".to_owned())?;
    let port = text
        .strip_prefix("OK ")
        .ok_or_else(|| format!("unexpected reply {text:?}"))?;
    port.trim()
        .parse::<u32>()
        .map_err(|_| format!("unexpected reply {text:?}"))
}

/// A gRPC client for one VM's agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    grpc: GrpcClient<Channel>,
}

impl AgentClient {
    /// Connects to the agent behind the VM's hybrid-vsock socket. Each
    /// (re)connection of the channel performs the handshake again.
    pub async fn connect(uds_path: &Path) -> Result<Self, AgentError> {
        let path = uds_path.to_owned();
        // The URI is required by the API but unused: the connector decides
        // where the bytes go.
        let channel = Endpoint::from_static("http://agent.vsock")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    connect_hybrid_vsock(&path, AGENT_VSOCK_PORT)
                        .await
                        .map(TokioIo::new)
                        .map_err(std::io::Error::other)
                }
            }))
            .await?;
        Ok(Self {
            grpc: GrpcClient::new(channel),
        })
    }

    /// Connects and calls Health until the agent answers or `timeout` passes.
    /// Returns the client and the first answer.
    pub async fn wait_ready(
        uds_path: &Path,
        timeout: Duration,
    ) -> Result<(Self, HealthResponse), AgentError> {
        let start = Instant::now();
        loop {
            let attempt = async {
                let mut client = Self::connect(uds_path).await?;
                let health = client.health().await?;
                Ok::<_, AgentError>((client, health))
            };
            let last = match attempt.await {
                Ok(ready) => return Ok(ready),
                Err(e) => e.to_string(),
            };
            if start.elapsed() >= timeout {
                return Err(AgentError::NotReady {
                    waited: start.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The agent's health and version.
    pub async fn health(&mut self) -> Result<HealthResponse, AgentError> {
        let request = HealthRequest {
            api_version: API_VERSION,
        };
        Ok(self.grpc.health(request).await?.into_inner())
    }

    /// The generated client, for the agent RPCs this wrapper does not
    /// name (containers, processes, stdio, stats, events).
    pub fn grpc(&mut self) -> &mut GrpcClient<Channel> {
        &mut self.grpc
    }

    /// A handle of the generated client for one call (a cheap clone: calls
    /// share the one HTTP/2 connection to the agent).
    pub fn rpc(&self) -> GrpcClient<Channel> {
        self.grpc.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn parses_replies() {
        assert_eq!(parse_ok_reply(b"OK 1024"), Ok(1024));
        assert_eq!(parse_ok_reply(b"OK 7\r"), Ok(7));
        assert!(parse_ok_reply(b"ERR").is_err());
        assert!(parse_ok_reply(b"OK x").is_err());
        assert!(parse_ok_reply(b"OK 99999999999").is_err());
        assert!(parse_ok_reply(&[0xff, 0xfe]).is_err());
    }

    /// A fake hybrid-vsock peer that answers the handshake with `reply` and
    /// then echoes what follows.
    async fn fake_peer(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut line = Vec::new();
            loop {
                let b = s.read_u8().await.unwrap();
                if b == b'\n' {
                    break;
                }
                line.push(b);
            }
            assert_eq!(line, b"CONNECT 1024");
            s.write_all(reply).await.unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        (dir, path)
    }

    #[tokio::test]
    async fn handshake_keeps_bytes_after_the_reply() {
        // The peer sends its first payload bytes right behind the reply line:
        // they must not be swallowed by the handshake.
        let (_dir, path) = fake_peer(b"OK 5\nhello").await;
        let mut s = connect_hybrid_vsock(&path, 1024).await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn handshake_rejects_bad_replies() {
        for reply in [&b"NOPE\n"[..], b"", &[b'O'; 100]] {
            let (_dir, path) = fake_peer(reply).await;
            let err = connect_hybrid_vsock(&path, 1024).await.unwrap_err();
            assert!(matches!(err, AgentError::Handshake { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect_hybrid_vsock(&dir.path().join("absent"), 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, AgentError::Connect { .. }), "{err}");
    }
}
