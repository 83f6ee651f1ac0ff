//! The protocol-neutral core of port-forward: one forwarded connection is
//! one hybrid-vsock connection to the agent's port-forward port
//! (`carapace_agent_api::port_forward`), which connects to the port in the
//! guest. The wire protocol (SPDY or WebSocket) feeds each connection's
//! client bytes in through a bounded channel and writes out the
//! [`Event`]s the connections send it.
//!
//! Backpressure both ways: the client's bytes wait in a channel of
//! [`CHANNEL_DEPTH`] chunks, then in the vsock socket; the guest's wait in
//! the session's event channel, then in the vsock socket and the guest's
//! TCP window. Nothing is buffered without bound.

use std::path::PathBuf;
use std::time::Duration;

use carapace_agent_api::port_forward::{self as proto, MAX_REPLY};
use carapace_agent_api::PORT_FORWARD_VSOCK_PORT;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::session::CHANNEL_DEPTH;
use crate::agent_client::{connect_hybrid_vsock, AgentError};

/// How long the agent may take to answer a connection request (it gives
/// up connecting in the guest after 10 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// Forwarded connections one session may hold at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// Why a forwarded connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Vsock(#[from] AgentError),
    /// The agent could not connect (the message names why, e.g. connection
    /// refused).
    #[error("{0}")]
    Refused(String),
    #[error("the agent did not answer the port-forward request within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Protocol(#[from] proto::ProtocolError),
    #[error("port-forward connection to the agent: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a session's connections go: the pod's VM.
#[derive(Debug, Clone)]
pub struct Forwarder {
    /// The pod sandbox id (for messages).
    pub pod: String,
    /// The VM's hybrid-vsock socket.
    pub socket: PathBuf,
}

impl Forwarder {
    /// A connection to `port` in the guest, past the agent's `OK`.
    pub async fn connect(&self, port: u16) -> Result<UnixStream, ForwardError> {
        let mut stream = connect_hybrid_vsock(&self.socket, PORT_FORWARD_VSOCK_PORT).await?;
        stream.write_all(proto::request(port).as_bytes()).await?;
        let line = tokio::time::timeout(REPLY_TIMEOUT, proto::read_line(&mut stream, MAX_REPLY))
            .await
            .map_err(|_| ForwardError::Timeout(REPLY_TIMEOUT))??
            .ok_or(proto::ProtocolError::ReplyTooLong)?;
        match proto::parse_reply(&line) {
            Ok(()) => Ok(stream),
            Err(Ok(message)) => Err(ForwardError::Refused(message)),
            Err(Err(e)) => Err(e.into()),
        }
    }
}

/// From the client, for one connection.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientData {
    Data(Vec<u8>),
    /// The client will send no more (half-close).
    End,
}

/// To the client, for the connection with the given key.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Data(Vec<u8>),
    /// The guest side will send no more.
    End,
    /// The connection failed: the text for the error stream.
    Error(String),
    /// Nothing more will come for this connection.
    Done,
}

/// A wait for room in a connection's input (a session holds one at most,
/// and reads no more from its client meanwhile).
pub type Reserve = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<mpsc::OwnedPermit<ClientData>, mpsc::error::SendError<()>>,
            > + Send,
    >,
>;

/// A running connection: its input channel and its task.
pub struct Connection {
    input: Option<mpsc::Sender<ClientData>>,
    task: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Starts connection `key` to `port`: its events go to `events`. A
    /// closed input channel ends the client's direction as [`ClientData::End`]
    /// does; dropping the [`Connection`] (or [`Connection::abort`]) closes
    /// the vsock connection at once, and the agent then closes the guest
    /// socket.
    pub fn start(
        forwarder: Forwarder,
        port: u16,
        key: u32,
        events: mpsc::Sender<(u32, Event)>,
    ) -> Self {
        let (input, rx) = mpsc::channel(CHANNEL_DEPTH);
        let task = tokio::spawn(async move {
            if let Err(e) = run(&forwarder, port, key, rx, &events).await {
                let text = format!(
                    "error forwarding port {port} to pod {}, uid : {e}",
                    forwarder.pod
                );
                tracing::debug!("{text}");
                let _ = events.send((key, Event::Error(text))).await;
            }
            let _ = events.send((key, Event::Done)).await;
        });
        Self {
            input: Some(input),
            task,
        }
    }

    /// Where the client's bytes go; `None` once closed.
    pub fn input(&self) -> Option<&mpsc::Sender<ClientData>> {
        self.input.as_ref()
    }

    /// Ends the client's direction (as [`ClientData::End`] would); the
    /// connection runs on until the guest's side ends.
    pub fn close_input(&mut self) {
        self.input = None;
    }

    /// Closes the connection without a goodbye (a client's reset).
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    forwarder: &Forwarder,
    port: u16,
    key: u32,
    mut input: mpsc::Receiver<ClientData>,
    events: &mpsc::Sender<(u32, Event)>,
) -> Result<(), ForwardError> {
    let stream = forwarder.connect(port).await?;
    let (mut rd, mut wr) = stream.into_split();
    let to_guest = async {
        while let Some(data) = input.recv().await {
            match data {
                ClientData::Data(d) => proto::write_chunk(&mut wr, &d).await?,
                ClientData::End => break,
            }
        }
        proto::write_end(&mut wr).await
    };
    let to_client = async {
        let mut buf = Vec::new();
        while proto::read_chunk(&mut rd, &mut buf).await? {
            if events
                .send((key, Event::Data(std::mem::take(&mut buf))))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        let _ = events.send((key, Event::End)).await;
        Ok::<_, std::io::Error>(())
    };
    tokio::try_join!(to_guest, to_client)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A fake VM socket: answers the hybrid-vsock handshake, then acts as
    /// the agent with `agent`.
    pub(crate) async fn fake_vm<F, Fut>(agent: F) -> (tempfile::TempDir, Forwarder)
    where
        F: Fn(UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let line = proto::read_line(&mut s, 64).await.unwrap().unwrap();
                assert_eq!(
                    line,
                    format!("CONNECT {PORT_FORWARD_VSOCK_PORT}").as_bytes()
                );
                s.write_all(b"OK 5\n").await.unwrap();
                tokio::spawn(agent(s));
            }
        });
        let forwarder = Forwarder {
            pod: "p".into(),
            socket,
        };
        (dir, forwarder)
    }

    #[tokio::test]
    async fn a_connection_carries_both_ways_and_ends() {
        let (_dir, fwd) = fake_vm(|mut s| async move {
            let line = proto::read_line(&mut s, 64).await.unwrap().unwrap();
            assert_eq!(line, b"PORT 80");
            s.write_all(b"OK\n").await.unwrap();
            // Echo every chunk, then end after the client's end.
            let mut buf = Vec::new();
            while proto::read_chunk(&mut s, &mut buf).await.unwrap() {
                proto::write_chunk(&mut s, &buf).await.unwrap();
            }
            proto::write_end(&mut s).await.unwrap();
        })
        .await;
        let (tx, mut rx) = mpsc::channel(4);
        let mut conn = Connection::start(fwd, 80, 7, tx);
        conn.input()
            .unwrap()
            .send(ClientData::Data(b"ping".to_vec()))
            .await
            .unwrap();
        assert_eq!(rx.recv().await, Some((7, Event::Data(b"ping".to_vec()))));
        conn.close_input();
        assert_eq!(rx.recv().await, Some((7, Event::End)));
        assert_eq!(rx.recv().await, Some((7, Event::Done)));
    }

    #[tokio::test]
    async fn refusals_and_lost_agents_are_reported() {
        let (_dir, fwd) = fake_vm(|mut s| async move {
            let line = proto::read_line(&mut s, 64).await.unwrap().unwrap();
            if line == b"PORT 1" {
                s.write_all(b"ERR dial tcp 127.0.0.1:1: connection refused\n")
                    .await
                    .unwrap();
            } else {
                // Accept, then vanish mid-stream.
                s.write_all(b"OK\n\0\0\0\x02hi").await.unwrap();
            }
        })
        .await;
        let (tx, mut rx) = mpsc::channel(4);
        let _refused = Connection::start(fwd.clone(), 1, 1, tx.clone());
        match rx.recv().await {
            Some((1, Event::Error(e))) => {
                assert!(
                    e.contains("port 1 to pod p") && e.ends_with("connection refused"),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rx.recv().await, Some((1, Event::Done)));
        let _lost = Connection::start(fwd, 2, 2, tx);
        assert_eq!(rx.recv().await, Some((2, Event::Data(b"hi".to_vec()))));
        assert!(matches!(rx.recv().await, Some((2, Event::Error(_)))));
        assert_eq!(rx.recv().await, Some((2, Event::Done)));
    }

    #[tokio::test]
    async fn dropping_a_connection_closes_the_vsock_stream() {
        let (closed_tx, mut closed_rx) = mpsc::channel(1);
        let (_dir, fwd) = fake_vm(move |mut s| {
            let closed_tx = closed_tx.clone();
            async move {
                let _ = proto::read_line(&mut s, 64).await;
                s.write_all(b"OK\n").await.unwrap();
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
                closed_tx.send(rest).await.unwrap();
            }
        })
        .await;
        let (tx, _rx) = mpsc::channel(4);
        let conn = Connection::start(fwd, 80, 1, tx);
        conn.input()
            .unwrap()
            .send(ClientData::Data(b"x".to_vec()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(conn);
        let rest = tokio::time::timeout(Duration::from_secs(5), closed_rx.recv())
            .await
            .expect("the vsock stream stayed open")
            .unwrap();
        // The data came, the end marker did not: an abort, not a half-close.
        assert_eq!(rest, b"\0\0\0\x01x");
    }
}
