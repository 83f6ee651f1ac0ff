//! Just enough of a Kubernetes API server for the real `kubectl` to run `exec`, `attach`
//! and `port-forward` against our streaming server, as kubelet's proxy would: discovery and
//! pod documents are canned JSON; a streaming request is turned into a CRI call by the test's
//! handler, and the connection is then relayed, upgrade headers and all, to the URL the
//! daemon returned.

use std::future::Future;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The request line of one API request.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: String,
    pub path: String,
    pub query: String,
}

/// What the handler makes of a request.
pub enum ApiReply {
    /// 200 with this JSON body.
    Json(String),
    /// Relay the connection to this streaming URL (from CRI Exec/Attach/PortForward).
    Stream(String),
    /// 404 with a NotFound Status.
    NotFound,
}

/// The discovery documents every kubectl run reads, with `resources` (JSON objects) as the
/// `v1` resource list; `None` for any other path.
pub fn discovery(path: &str, resources: &str) -> Option<String> {
    match path {
        "/api" => Some(
            r#"{"kind":"APIVersions","versions":["v1"],"serverAddressByClientCIDRs":[]}"#.into(),
        ),
        "/apis" => Some(r#"{"kind":"APIGroupList","apiVersion":"v1","groups":[]}"#.into()),
        "/api/v1" => Some(format!(
            r#"{{"kind":"APIResourceList","groupVersion":"v1","resources":[{resources}]}}"#
        )),
        _ => None,
    }
}

/// Serves on a loopback port until the test ends; returns the address.
pub async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(ApiRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ApiReply> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = std::sync::Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let handler = handler.clone();
            tokio::spawn(async move { answer(tcp, &*handler).await });
        }
    });
    addr
}

async fn answer<F, Fut>(mut tcp: TcpStream, handler: &F)
where
    F: Fn(ApiRequest) -> Fut,
    Fut: Future<Output = ApiReply>,
{
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let (line, rest) = head.split_once("\r\n").unwrap();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap(), parts.next().unwrap());
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let request = ApiRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
    };
    let (status, body) = match handler(request).await {
        ApiReply::Stream(url) => {
            let rest_url = url.strip_prefix("http://").unwrap();
            let (up_addr, up_path) = rest_url.split_at(rest_url.find('/').unwrap());
            let mut up = TcpStream::connect(up_addr).await.unwrap();
            up.write_all(format!("{method} {up_path} HTTP/1.1\r\n{rest}").as_bytes())
                .await
                .unwrap();
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
            return;
        }
        ApiReply::Json(body) => ("200 OK", body),
        ApiReply::NotFound => (
            "404 Not Found",
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#
                .to_owned(),
        ),
    };
    let _ = tcp
        .write_all(
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
}
