//! The CRI server: kubelet's RuntimeService (and ImageService) over a unix
//! socket. One file per RPC family, one wrapper ([`rpc`]) around every call
//! for logging and the mapping of errors to gRPC status codes.

mod container;
mod events;
pub mod image_service;
mod metrics;
pub mod runtime_config;
mod runtime_service;
mod sandbox_list;
mod sandbox_run;
mod sandbox_status;
mod stats;
mod streaming;
mod version;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Response, Status};

use crate::sandbox::{SandboxError, Sandboxes};

/// The CRI API version we implement.
pub const CRI_API_VERSION: &str = "v1";

/// Errors of CRI calls, each with its gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// Content that failed verification (a digest mismatch, a corrupt layer).
    #[error("{0}")]
    DataLoss(String),
    #[error("{0} is not supported by carapace yet")]
    Unimplemented(&'static str),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Internal(String),
}

impl From<CriError> for Status {
    fn from(e: CriError) -> Self {
        let message = e.to_string();
        match e {
            CriError::InvalidArgument(_) => Status::invalid_argument(message),
            CriError::NotFound(_) => Status::not_found(message),
            CriError::AlreadyExists(_) => Status::already_exists(message),
            CriError::FailedPrecondition(_) => Status::failed_precondition(message),
            CriError::Unauthenticated(_) => Status::unauthenticated(message),
            CriError::PermissionDenied(_) => Status::permission_denied(message),
            CriError::DataLoss(_) => Status::data_loss(message),
            CriError::Unimplemented(_) => Status::unimplemented(message),
            CriError::Unavailable(_) => Status::unavailable(message),
            CriError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            CriError::Internal(_) => Status::internal(message),
        }
    }
}

impl From<SandboxError> for CriError {
    fn from(e: SandboxError) -> Self {
        let message = e.to_string();
        match e {
            SandboxError::NotFound(_) => CriError::NotFound(message),
            SandboxError::InvalidArgument(_) => CriError::InvalidArgument(message),
            SandboxError::NameReserved { .. } => CriError::AlreadyExists(message),
            SandboxError::NotReady { .. } | SandboxError::AgentTooOld { .. } => {
                CriError::FailedPrecondition(message)
            }
            SandboxError::AgentNotReady { .. } | SandboxError::Vm(_) => {
                CriError::Unavailable(message)
            }
            SandboxError::Network(crate::network::NetworkError::NoConfig(_)) => {
                CriError::FailedPrecondition(message)
            }
            SandboxError::Network(_) => CriError::Unavailable(message),
            SandboxError::State(_) | SandboxError::Io { .. } => CriError::Internal(message),
        }
    }
}

/// Runs one CRI call: logs it (errors at `error`, the rest at `debug`) and
/// maps its error to a gRPC status.
pub async fn rpc<T>(
    method: &'static str,
    call: impl Future<Output = Result<T, CriError>>,
) -> Result<Response<T>, Status> {
    let start = Instant::now();
    let result = call.await;
    let elapsed_ms = start.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok(reply) => {
            tracing::debug!(method, elapsed_ms, "ok");
            Ok(Response::new(reply))
        }
        Err(e) => {
            match &e {
                CriError::NotFound(_) | CriError::Unimplemented(_) => {
                    tracing::debug!(method, elapsed_ms, "{e}")
                }
                _ => tracing::error!(method, elapsed_ms, "{e}"),
            }
            Err(e.into())
        }
    }
}

/// The state every CRI call works on (cheap to clone: all shared).
#[derive(Clone)]
pub struct CriService {
    pub sandboxes: Arc<Sandboxes>,
    pub containers: Arc<crate::container::Containers>,
    pub cpu_samples: Arc<stats::CpuSamples>,
    /// Where Exec, Attach and PortForward send their clients (none: those
    /// calls answer Unavailable).
    pub streaming: Option<Arc<crate::streaming::StreamingServer>>,
    /// Set when the daemon shuts down: endless streams (events) end, so
    /// that the server's graceful shutdown does not wait for them.
    shutdown: Arc<tokio::sync::watch::Sender<bool>>,
    /// What kubelet told us with UpdateRuntimeConfig.
    pub runtime_config: Arc<runtime_config::NodeRuntimeConfig>,
}

impl CriService {
    pub fn new(
        sandboxes: Arc<Sandboxes>,
        containers: Arc<crate::container::Containers>,
        runtime_config: Arc<runtime_config::NodeRuntimeConfig>,
    ) -> Self {
        Self {
            sandboxes,
            containers,
            cpu_samples: Default::default(),
            streaming: None,
            shutdown: Arc::new(tokio::sync::watch::channel(false).0),
            runtime_config,
        }
    }

    /// With the streaming server for Exec, Attach and PortForward.
    pub fn with_streaming(mut self, server: Arc<crate::streaming::StreamingServer>) -> Self {
        self.streaming = Some(server);
        self
    }

    /// Ends the streams that would otherwise never end.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

/// Serves CRI on `socket` until `shutdown` completes.
pub async fn serve(
    socket: &Path,
    service: CriService,
    images: image_service::CriImageService,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", socket.display())),
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("restricting {}", socket.display()))?;
    }
    tracing::info!("serving CRI on {}", socket.display());
    tonic::transport::Server::builder()
        .add_service(RuntimeServiceServer::new(service))
        .add_service(ImageServiceServer::new(images))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("CRI server")?;
    let _ = std::fs::remove_file(socket);
    Ok(())
}
