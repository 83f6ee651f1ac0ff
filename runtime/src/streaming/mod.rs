//! The streaming server: CRI Exec, Attach and PortForward return a URL on
//! it, naming a single-use token; kubelet (proxying the API server) or
//! crictl then connects there and upgrades the HTTP request to WebSocket
//! (or SPDY/3.1). See docs/streaming.md.

pub mod port_forward;
pub mod session;
pub mod spdy;
pub mod spdy_portforward;
pub mod spdy_remotecommand;
pub mod status;
pub mod tokens;
pub mod websocket;
pub mod websocket_portforward;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{AttachRequest, ExecRequest, PortForwardRequest};
use tokio::net::TcpListener;

pub use tokens::TokenError;

use crate::config::StreamingConfig;
use crate::container::stream::ExecSpec;
use crate::container::Containers;
use crate::sandbox::{SandboxError, Sandboxes};
use session::Target;

/// What a token stands for.
#[derive(Debug, Clone)]
pub enum StreamRequest {
    Exec(ExecRequest),
    Attach(AttachRequest),
    PortForward(PortForwardRequest),
}

impl StreamRequest {
    fn kind(&self) -> &'static str {
        match self {
            StreamRequest::Exec(_) => "exec",
            StreamRequest::Attach(_) => "attach",
            StreamRequest::PortForward(_) => "portforward",
        }
    }
}

/// The running server.
pub struct StreamingServer {
    addr: SocketAddr,
    tokens: tokens::Tokens<StreamRequest>,
    containers: Arc<Containers>,
    sandboxes: Arc<Sandboxes>,
    idle: Duration,
}

type Body = Full<Bytes>;

impl StreamingServer {
    /// Binds the configured address and serves until the process ends.
    pub async fn start(
        config: &StreamingConfig,
        containers: Arc<Containers>,
        sandboxes: Arc<Sandboxes>,
    ) -> std::io::Result<Arc<Self>> {
        let listener = TcpListener::bind(config.address).await?;
        let this = Arc::new(Self {
            addr: listener.local_addr()?,
            tokens: tokens::Tokens::new(Duration::from_secs(config.token_ttl_secs)),
            containers,
            sandboxes,
            idle: Duration::from_secs(config.idle_timeout_secs),
        });
        tracing::info!("streaming server on http://{}", this.addr);
        let server = this.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("streaming server accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let server = server.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await
                    {
                        tracing::debug!(%peer, "streaming connection: {e}");
                    }
                });
            }
        });
        Ok(this)
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stores `request` under a new token; the URL to return to the client.
    pub fn issue(&self, request: StreamRequest) -> Result<String, TokenError> {
        let kind = request.kind();
        let token = self.tokens.issue(request)?;
        Ok(format!("http://{}/{kind}/{token}", self.addr))
    }

    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let request = match take_token(&self.tokens, req.uri().path()) {
            Ok(r) => r,
            Err((status, why)) => return plain(status, why),
        };
        if let StreamRequest::PortForward(pf) = request {
            return self.port_forward(req, pf).await;
        }
        let upgrade = header(&req, UPGRADE)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let wire = match upgrade.as_str() {
            "websocket" => {
                let Some(key) = header(&req, hyper::header::SEC_WEBSOCKET_KEY) else {
                    return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
                };
                let offered = header(&req, hyper::header::SEC_WEBSOCKET_PROTOCOL);
                let Some(protocol) = websocket::Protocol::negotiate(offered.as_deref()) else {
                    return plain(StatusCode::BAD_REQUEST, "no supported channel protocol");
                };
                Wire::WebSocket {
                    key,
                    protocol,
                    echo: offered.is_some(),
                }
            }
            "spdy/3.1" => {
                let offered: Vec<String> = req
                    .headers()
                    .get_all("x-stream-protocol-version")
                    .iter()
                    .filter_map(|v| v.to_str().ok().map(str::to_owned))
                    .collect();
                let Some(version) = spdy_remotecommand::negotiate(&offered) else {
                    return plain(
                        StatusCode::FORBIDDEN,
                        "no supported X-Stream-Protocol-Version",
                    );
                };
                Wire::Spdy { version }
            }
            _ => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    "expected an upgrade to websocket or SPDY/3.1",
                )
            }
        };
        let (target, streams, cmd) = match request {
            StreamRequest::Exec(exec) => {
                let spec = ExecSpec {
                    cmd: exec.cmd.clone(),
                    tty: exec.tty,
                    stdin: exec.stdin,
                };
                match self.containers.start_exec(&exec.container_id, &spec).await {
                    Ok(h) => (
                        Target::Exec(h),
                        session::Streams {
                            stdin: exec.stdin,
                            stdout: exec.stdout,
                            stderr: exec.stderr,
                            tty: exec.tty,
                        },
                        exec.cmd,
                    ),
                    Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                }
            }
            StreamRequest::Attach(attach) => {
                match self.containers.attach(&attach.container_id).await {
                    Ok((h, output)) => (
                        Target::Attach(h, output),
                        session::Streams {
                            stdin: attach.stdin,
                            stdout: attach.stdout,
                            stderr: attach.stderr,
                            tty: attach.tty,
                        },
                        Vec::new(),
                    ),
                    Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                }
            }
            StreamRequest::PortForward(_) => {
                unreachable!("port-forward requests are served by port_forward")
            }
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let idle = self.idle;
        let session_wire = wire.clone();
        tokio::spawn(async move {
            let upgraded = match upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!("upgrade: {e}");
                    target.abandon().await;
                    return;
                }
            };
            match session_wire {
                Wire::WebSocket { protocol, .. } => {
                    websocket::serve(upgraded, protocol, target, cmd, streams, idle).await
                }
                Wire::Spdy { version } => {
                    spdy_remotecommand::serve(upgraded, version, target, cmd, streams, idle).await
                }
            }
        });
        let mut response = Response::new(Body::default());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        match wire {
            Wire::WebSocket {
                key,
                protocol,
                echo,
            } => {
                headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                if let Ok(v) = HeaderValue::from_str(&accept) {
                    headers.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, v);
                }
                if echo {
                    headers.insert(
                        hyper::header::SEC_WEBSOCKET_PROTOCOL,
                        HeaderValue::from_static(protocol.name()),
                    );
                }
            }
            Wire::Spdy { version } => {
                headers.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
                headers.insert(
                    "x-stream-protocol-version",
                    HeaderValue::from_static(version),
                );
            }
        }
        response
    }
}

impl StreamingServer {
    /// A port-forward request: WebSocket (ports from the request) or SPDY
    /// (ports named by each stream pair).
    async fn port_forward(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        pf: PortForwardRequest,
    ) -> Response<Body> {
        let upgrade = header(&req, UPGRADE)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let mut response = Response::new(Body::default());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        enum PfWire {
            WebSocket(websocket_portforward::Protocol, Vec<u16>),
            Spdy,
            Tunnel,
        }
        let wire = match upgrade.as_str() {
            "websocket" => {
                let Some(key) = header(&req, hyper::header::SEC_WEBSOCKET_KEY) else {
                    return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
                };
                let offered = header(&req, hyper::header::SEC_WEBSOCKET_PROTOCOL);
                let tunnel = offered.as_deref().is_some_and(|o| {
                    o.split(',')
                        .any(|p| p.trim() == spdy_portforward::TUNNEL_PROTOCOL)
                });
                let (wire, name) = if tunnel {
                    (PfWire::Tunnel, Some(spdy_portforward::TUNNEL_PROTOCOL))
                } else {
                    let Some((protocol, name)) =
                        websocket_portforward::Protocol::negotiate(offered.as_deref())
                    else {
                        return plain(StatusCode::BAD_REQUEST, "no supported channel protocol");
                    };
                    let ports = match websocket_portforward::ports(&pf.port, req.uri().query()) {
                        Ok(p) => p,
                        Err(e) => return plain(StatusCode::BAD_REQUEST, &e),
                    };
                    (PfWire::WebSocket(protocol, ports), name)
                };
                headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                if let Ok(v) = HeaderValue::from_str(&accept) {
                    headers.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, v);
                }
                if let Some(name) = name {
                    headers.insert(
                        hyper::header::SEC_WEBSOCKET_PROTOCOL,
                        HeaderValue::from_static(name),
                    );
                }
                wire
            }
            "spdy/3.1" => {
                let offered: Vec<String> = req
                    .headers()
                    .get_all("x-stream-protocol-version")
                    .iter()
                    .filter_map(|v| v.to_str().ok().map(str::to_owned))
                    .collect();
                let Some(version) = spdy_portforward::negotiate(&offered) else {
                    return plain(
                        StatusCode::FORBIDDEN,
                        "unable to upgrade: X-Stream-Protocol-Version portforward.k8s.io is required",
                    );
                };
                headers.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
                headers.insert(
                    "x-stream-protocol-version",
                    HeaderValue::from_static(version),
                );
                PfWire::Spdy
            }
            _ => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    "expected an upgrade to websocket or SPDY/3.1",
                )
            }
        };
        let socket = match self.sandboxes.port_forward_socket(&pf.pod_sandbox_id).await {
            Ok(s) => s,
            Err(e @ SandboxError::NotFound(_)) => {
                return plain(StatusCode::NOT_FOUND, &e.to_string())
            }
            Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        };
        let forwarder = port_forward::Forwarder {
            pod: pf.pod_sandbox_id,
            socket,
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let idle = self.idle;
        tokio::spawn(async move {
            let upgraded = match upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!("upgrade: {e}");
                    return;
                }
            };
            let over = match &wire {
                PfWire::WebSocket(..) => "WebSocket",
                PfWire::Spdy => "SPDY",
                PfWire::Tunnel => "SPDY in a WebSocket tunnel",
            };
            tracing::debug!(pod = %forwarder.pod, "port-forward session over {over}");
            match wire {
                PfWire::WebSocket(protocol, ports) => {
                    websocket_portforward::serve(upgraded, protocol, ports, forwarder, idle).await
                }
                PfWire::Spdy => {
                    spdy_portforward::serve(TokioIo::new(upgraded), forwarder, idle).await
                }
                PfWire::Tunnel => spdy_portforward::serve_tunneled(upgraded, forwarder, idle).await,
            }
        });
        response
    }
}

/// The protocol a request upgrades to.
#[derive(Clone)]
enum Wire {
    WebSocket {
        key: String,
        protocol: websocket::Protocol,
        /// The client named protocols: the answer names the chosen one.
        echo: bool,
    },
    Spdy {
        version: &'static str,
    },
}

/// The request a URL path (`/<kind>/<token>`) stands for, taking its token;
/// or the answer to a refused one.
fn take_token(
    tokens: &tokens::Tokens<StreamRequest>,
    path: &str,
) -> Result<StreamRequest, (StatusCode, &'static str)> {
    let Some((kind, token)) = path.trim_start_matches('/').split_once('/') else {
        return Err((StatusCode::NOT_FOUND, "not found"));
    };
    match tokens.take(token) {
        Ok(r) if r.kind() == kind => Ok(r),
        Ok(_) | Err(TokenError::Unknown) | Err(TokenError::Full) => {
            Err((StatusCode::NOT_FOUND, "unknown or already used token"))
        }
        Err(TokenError::Expired) => Err((StatusCode::GONE, "expired token")),
    }
}

fn header(req: &Request<Incoming>, name: hyper::header::HeaderName) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn plain(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(Body::new(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> StreamRequest {
        StreamRequest::Exec(ExecRequest::default())
    }

    #[test]
    fn paths_take_tokens_once_and_of_their_kind() {
        let tokens = tokens::Tokens::new(Duration::from_secs(60));
        let t = tokens.issue(exec()).unwrap();
        assert!(take_token(&tokens, &format!("/exec/{t}")).is_ok());
        assert_eq!(
            take_token(&tokens, &format!("/exec/{t}")).unwrap_err().0,
            StatusCode::NOT_FOUND
        );
        // A token used on the wrong path is gone too.
        let t = tokens.issue(exec()).unwrap();
        assert_eq!(
            take_token(&tokens, &format!("/attach/{t}")).unwrap_err().0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            take_token(&tokens, &format!("/exec/{t}")).unwrap_err().0,
            StatusCode::NOT_FOUND
        );
        for bad in ["", "/", "/exec", "/exec/", "/exec/zz", "//x"] {
            assert_eq!(
                take_token(&tokens, bad).unwrap_err().0,
                StatusCode::NOT_FOUND
            );
        }
    }

    #[test]
    fn expired_tokens_are_gone() {
        let tokens = tokens::Tokens::new(Duration::from_millis(1));
        let t = tokens.issue(exec()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            take_token(&tokens, &format!("/exec/{t}")).unwrap_err().0,
            StatusCode::GONE
        );
    }
}
