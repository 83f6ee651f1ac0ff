//! The agent API server.

use std::time::{Duration, Instant};

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use carapace_agent_api::v1::agent_server::{Agent, AgentServer};
use carapace_agent_api::v1::{
    ContainerStatsRequest, ContainerStatsResponse, CreateContainerRequest, CreateContainerResponse,
    DeleteContainerRequest, DeleteContainerResponse, Event, EventsRequest, ExecProcessRequest,
    ExecProcessResponse, HealthRequest, HealthResponse, NamespaceMode, OutputChunk, ProcessRef,
    ReadOutputRequest, ResizeTtyRequest, ResizeTtyResponse, SetupSandboxRequest,
    SetupSandboxResponse, SignalProcessRequest, SignalProcessResponse, StartContainerRequest,
    StartContainerResponse, UpdateContainerResourcesRequest, UpdateContainerResourcesResponse,
    WaitProcessRequest, WaitProcessResponse, WriteStdinRequest, WriteStdinResponse,
};
use carapace_agent_api::{API_VERSION, MIN_API_VERSION};
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::container::user::UserSource;
use crate::container::{ContainerError, Manager, PidMode};

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
    containers: Arc<Manager>,
}

impl AgentService {
    pub fn new(started: Instant, containers: Arc<Manager>) -> Self {
        Self {
            started,
            containers,
        }
    }
}

fn status(e: ContainerError) -> Status {
    tracing::debug!("request failed: {e}");
    Status::new(e.code(), e.to_string())
}

fn process_ref(r: Option<ProcessRef>) -> Result<ProcessRef, Status> {
    r.ok_or_else(|| Status::invalid_argument("process is required"))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

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

    async fn setup_sandbox(
        &self,
        request: Request<SetupSandboxRequest>,
    ) -> Result<Response<SetupSandboxResponse>, Status> {
        let req = request.into_inner();
        let net_err = |e: crate::network::NetworkError| Status::new(e.code(), e.to_string());
        // Validated before anything changes; applied after the files.
        crate::network::validate(&req.interfaces, &req.routes).map_err(net_err)?;
        let resp = crate::sandbox::setup(&req).map_err(|e| Status::new(e.code(), e.to_string()))?;
        crate::network::configure(&req.interfaces, &req.routes)
            .await
            .map_err(net_err)?;
        if let Some(first) = req.shared_filesystems.first() {
            self.containers
                .set_shared_root(PathBuf::from(&first.mount_point));
        }
        self.containers.prestart_pod_holder();
        Ok(Response::new(resp))
    }

    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        let req = request.into_inner();
        let pid_mode = NamespaceMode::try_from(req.pid_mode)
            .map_err(|_| Status::invalid_argument("unknown pid_mode"))?;
        let ipc_mode = NamespaceMode::try_from(req.ipc_mode)
            .map_err(|_| Status::invalid_argument("unknown ipc_mode"))?;
        if ipc_mode == NamespaceMode::Target {
            return Err(Status::invalid_argument(
                "ipc_mode TARGET: only the pid namespace can be another container's",
            ));
        }
        let pid_mode = match pid_mode {
            NamespaceMode::Target => PidMode::Target(req.pid_target_container_id),
            NamespaceMode::Pod => PidMode::Pod,
            NamespaceMode::Container => PidMode::Container,
        };
        let pid = self
            .containers
            .create(
                &req.container_id,
                &req.oci_spec_json,
                UserSource::from_request(
                    &req.username,
                    req.gid_from_passwd,
                    &req.group,
                    req.strict_supplemental_groups,
                ),
                pid_mode,
                ipc_mode,
                req.stdin,
            )
            .await
            .map_err(status)?;
        // The process is set up and waits for StartContainer: its identity
        // is the one it will run with.
        let identity = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| crate::container::user::identity_in_status(&s));
        let identity_known = identity.is_some();
        let (uid, gid, groups) = identity.unwrap_or_default();
        Ok(Response::new(CreateContainerResponse {
            pid: u32::try_from(pid).unwrap_or(0),
            identity_known,
            uid,
            gid,
            groups,
        }))
    }

    async fn start_container(
        &self,
        request: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        self.containers
            .start(&request.get_ref().container_id)
            .await
            .map_err(status)?;
        Ok(Response::new(StartContainerResponse {}))
    }

    async fn exec_process(
        &self,
        request: Request<ExecProcessRequest>,
    ) -> Result<Response<ExecProcessResponse>, Status> {
        let req = request.into_inner();
        let pid = self
            .containers
            .exec(
                &req.container_id,
                &req.exec_id,
                &req.oci_process_json,
                UserSource::from_request(
                    &req.username,
                    req.gid_from_passwd,
                    &req.group,
                    req.strict_supplemental_groups,
                ),
                req.stdin,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(ExecProcessResponse {
            pid: u32::try_from(pid).unwrap_or(0),
        }))
    }

    async fn signal_process(
        &self,
        request: Request<SignalProcessRequest>,
    ) -> Result<Response<SignalProcessResponse>, Status> {
        let req = request.into_inner();
        let process = process_ref(req.process)?;
        self.containers
            .signal(&process, req.signal)
            .map_err(status)?;
        Ok(Response::new(SignalProcessResponse {}))
    }

    async fn wait_process(
        &self,
        request: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        let process = process_ref(request.into_inner().process)?;
        let p = self.containers.process(&process).map_err(status)?;
        let exit = p.wait().await;
        p.waited.store(true, std::sync::atomic::Ordering::SeqCst);
        self.containers.forget_exec_if_done(&process, &p);
        Ok(Response::new(WaitProcessResponse { status: Some(exit) }))
    }

    async fn delete_container(
        &self,
        request: Request<DeleteContainerRequest>,
    ) -> Result<Response<DeleteContainerResponse>, Status> {
        let req = request.into_inner();
        self.containers
            .delete(&req.container_id, req.force)
            .await
            .map_err(status)?;
        Ok(Response::new(DeleteContainerResponse {}))
    }

    async fn write_stdin(
        &self,
        request: Request<WriteStdinRequest>,
    ) -> Result<Response<WriteStdinResponse>, Status> {
        let req = request.into_inner();
        let process = process_ref(req.process)?;
        let p = self.containers.process(&process).map_err(status)?;
        p.io.write_stdin(&req.data, req.close)
            .await
            .map_err(|e| status(e.into()))?;
        Ok(Response::new(WriteStdinResponse {}))
    }

    type ReadOutputStream = BoxStream<OutputChunk>;

    async fn read_output(
        &self,
        request: Request<ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        let process = process_ref(request.into_inner().process)?;
        let p = self.containers.process(&process).map_err(status)?;
        let output = p.io.take_output().map_err(|e| status(e.into()))?;
        let containers = self.containers.clone();
        let state = (output, containers, process, p);
        let stream = futures_util::stream::unfold(state, |mut state| async move {
            let (rx, containers, process, p) = &mut state;
            match rx.recv().await {
                Some(chunk) => Some((Ok(chunk), state)),
                None => {
                    p.drained.store(true, std::sync::atomic::Ordering::SeqCst);
                    containers.forget_exec_if_done(process, p);
                    None
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn resize_tty(
        &self,
        request: Request<ResizeTtyRequest>,
    ) -> Result<Response<ResizeTtyResponse>, Status> {
        let req = request.into_inner();
        let process = process_ref(req.process)?;
        let (Ok(rows), Ok(cols)) = (u16::try_from(req.rows), u16::try_from(req.cols)) else {
            return Err(Status::invalid_argument(
                "rows and cols must fit in 16 bits",
            ));
        };
        let p = self.containers.process(&process).map_err(status)?;
        p.io.resize(rows, cols).map_err(|e| status(e.into()))?;
        Ok(Response::new(ResizeTtyResponse {}))
    }

    async fn container_stats(
        &self,
        request: Request<ContainerStatsRequest>,
    ) -> Result<Response<ContainerStatsResponse>, Status> {
        let stats = self
            .containers
            .stats(&request.get_ref().container_id)
            .map_err(status)?;
        Ok(Response::new(stats))
    }

    async fn update_container_resources(
        &self,
        request: Request<UpdateContainerResourcesRequest>,
    ) -> Result<Response<UpdateContainerResourcesResponse>, Status> {
        let req = request.into_inner();
        self.containers
            .update(&req.container_id, &req.oci_resources_json)
            .map_err(status)?;
        Ok(Response::new(UpdateContainerResourcesResponse {}))
    }

    type EventsStream = BoxStream<Event>;

    async fn events(
        &self,
        _request: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let rx = self.containers.subscribe();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((Ok(event), rx)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("event stream reader lagged; {n} events dropped");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves the agent API on `addr` until the listener fails.
pub async fn serve(
    addr: &ListenAddr,
    started: Instant,
    containers: Arc<Manager>,
) -> Result<(), ServeError> {
    let listen_err = |source| ServeError::Listen {
        addr: addr.clone(),
        source,
    };
    match addr {
        ListenAddr::Vsock(port) => {
            let vsock_addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, *port);
            let listener = tokio_vsock::VsockListener::bind(vsock_addr).map_err(listen_err)?;
            // As init the agent logs to the serial console, where every byte is a VM exit
            // (about 15 ms a line in the nested test node): its start-up says one line, once
            // the host knows it is ready (docs/design.md, section 3).
            tokio::spawn(crate::announce::ready(addr.clone(), started));
            serve_incoming(
                accept_loop(listener, |l| Box::pin(l.accept())),
                AgentService::new(started, containers),
            )
            .await
        }
        ListenAddr::Unix(path) => {
            // A stale socket from an earlier run would make bind fail.
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path).map_err(listen_err)?;
            tracing::info!(
                "carapace-agent {} listening on {addr}",
                env!("CARGO_PKG_VERSION")
            );
            serve_incoming(
                accept_loop(listener, |l| Box::pin(l.accept())),
                AgentService::new(started, containers),
            )
            .await
        }
    }
}

async fn serve_incoming<S, IO>(incoming: S, service: AgentService) -> Result<(), ServeError>
where
    S: Stream<Item = Result<IO, std::io::Error>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
{
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(AgentServer::new(service))
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
