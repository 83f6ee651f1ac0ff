//! The agent API server.

use std::time::{Duration, Instant};

use carapace_agent_api::v1::agent_server::{Agent, AgentServer};
use carapace_agent_api::v1::{HealthRequest, HealthResponse};
use carapace_agent_api::{API_VERSION, MIN_API_VERSION};
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::listen::ListenAddr;

/// Errors that stop the server (each is retried by the caller when init).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: ListenAddr,
        source: std::io::Error,
    },
    #[error("agent API server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// How many requests one connection may have in flight; the runtime needs a
/// handful, so this only bounds what a misbehaving peer can queue.
const MAX_CONCURRENT_STREAMS: u32 = 64;

/// The agent API implementation.
#[derive(Debug)]
pub struct AgentService {
    started: Instant,
}

impl AgentService {
    pub fn new(started: Instant) -> Self {
        Self { started }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn health(
        &self,
        request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let peer_version = request.get_ref().api_version;
        tracing::debug!(peer_version, "health");
        Ok(Response::new(HealthResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            api_version: API_VERSION,
            min_api_version: MIN_API_VERSION,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }))
    }
}

/// Serves the agent API on `addr` until the listener fails.
pub async fn serve(addr: &ListenAddr, started: Instant) -> Result<(), ServeError> {
    let listen_err = |source| ServeError::Listen {
        addr: addr.clone(),
        source,
    };
    match addr {
        ListenAddr::Vsock(port) => {
            let vsock_addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, *port);
            let listener = tokio_vsock::VsockListener::bind(vsock_addr).map_err(listen_err)?;
            tracing::info!(
                "carapace-agent {} listening on {addr}",
                env!("CARGO_PKG_VERSION")
            );
            tokio::spawn(crate::announce::ready());
            serve_incoming(accept_loop(listener, |l| Box::pin(l.accept())), started).await
        }
        ListenAddr::Unix(path) => {
            // A stale socket from an earlier run would make bind fail.
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path).map_err(listen_err)?;
            tracing::info!(
                "carapace-agent {} listening on {addr}",
                env!("CARGO_PKG_VERSION")
            );
            serve_incoming(accept_loop(listener, |l| Box::pin(l.accept())), started).await
        }
    }
}

async fn serve_incoming<S, IO>(incoming: S, started: Instant) -> Result<(), ServeError>
where
    S: Stream<Item = Result<IO, std::io::Error>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
{
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(AgentServer::new(AgentService::new(started)))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

type AcceptFuture<'a, IO, A> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<(IO, A)>> + Send + 'a>>;

/// Turns a listener into a stream of connections that never ends on an
/// accept error: a failed accept (a peer that vanished, fd exhaustion) is
/// logged and the loop goes on, so no single peer can stop the server.
fn accept_loop<L, IO, A>(
    listener: L,
    accept: for<'a> fn(&'a L) -> AcceptFuture<'a, IO, A>,
) -> impl Stream<Item = Result<IO, std::io::Error>> + Send + 'static
where
    L: Send + Sync + 'static,
    IO: Send + 'static,
    A: Send + 'static,
{
    futures_util::stream::unfold(listener, move |listener| async move {
        loop {
            match accept(&listener).await {
                Ok((stream, _)) => return Some((Ok(stream), listener)),
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}
