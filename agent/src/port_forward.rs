//! Port-forward: each connection to the port-forward vsock port carries one
//! TCP connection to `127.0.0.1:<port>` in the guest (the pod's network
//! namespace is the VM's). Protocol: `carapace_agent_api::port_forward`.
//!
//! The host is untrusted like any peer: the request line is bounded and
//! must arrive in time, chunks are bounded, nothing panics, and every
//! connection's sockets are dropped when it ends.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use carapace_agent_api::port_forward::{self as proto, MAX_REQUEST};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the host may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the port in the guest may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the guest socket at once.
const READ_SIZE: usize = 32 * 1024;

/// Errors of one forwarded connection.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no port-forward request within {0:?}")]
    RequestTimeout(Duration),
    #[error(transparent)]
    Protocol(#[from] proto::ProtocolError),
    #[error("port-forward connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the port-forward listener until it fails; each connection runs
/// on its own task.
pub async fn serve(listener: tokio_vsock::VsockListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, Ipv4Addr::LOCALHOST).await {
                        tracing::info!("port-forward connection failed: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("port-forward accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Binds the port-forward vsock port and serves it in the background.
pub fn start(port: u32) -> std::io::Result<()> {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
    let listener = tokio_vsock::VsockListener::bind(addr)?;
    tracing::debug!("port-forward on vsock port {port}");
    tokio::spawn(serve(listener));
    Ok(())
}

/// One host connection: the request, the connect, the reply, then the
/// bytes both ways until both directions ended (or one side failed).
pub async fn handle<S>(mut host: S, ip: Ipv4Addr) -> Result<(), ForwardError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let line = tokio::time::timeout(REQUEST_TIMEOUT, proto::read_line(&mut host, MAX_REQUEST))
        .await
        .map_err(|_| ForwardError::RequestTimeout(REQUEST_TIMEOUT))??
        .ok_or(proto::ProtocolError::RequestTooLong)?;
    let port = match proto::parse_request(&line) {
        Ok(p) => p,
        Err(e) => {
            let _ = host
                .write_all(proto::reply_error(&e.to_string()).as_bytes())
                .await;
            return Err(e.into());
        }
    };
    let target = SocketAddr::from((ip, port));
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let message = format!("dial tcp {target}: connect: {}", error_text(&e));
            host.write_all(proto::reply_error(&message).as_bytes())
                .await?;
            return Ok(());
        }
        Err(_) => {
            let message = format!("dial tcp {target}: timed out after {CONNECT_TIMEOUT:?}");
            host.write_all(proto::reply_error(&message).as_bytes())
                .await?;
            return Ok(());
        }
    };
    let _ = tcp.set_nodelay(true);
    host.write_all(proto::REPLY_OK.as_bytes()).await?;
    host.flush().await?;
    pump(host, tcp).await
}

/// An OS error as Go (kubectl's side) words it: `connection refused`, not
/// `Connection refused (os error 111)`.
fn error_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(at) => &text[..at],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Copies until both directions ended: guest socket bytes become chunks to
/// the host, the host's chunks become socket bytes; each side's end is
/// passed on as a half-close. An error in either direction ends both.
async fn pump<S>(host: S, tcp: TcpStream) -> Result<(), ForwardError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut host_rd, mut host_wr) = tokio::io::split(host);
    let (mut tcp_rd, mut tcp_wr) = tcp.into_split();
    let to_host = async {
        let mut buf = vec![0u8; READ_SIZE];
        loop {
            let n = tcp_rd.read(&mut buf).await?;
            if n == 0 {
                return proto::write_end(&mut host_wr).await;
            }
            proto::write_chunk(&mut host_wr, &buf[..n]).await?;
        }
    };
    let to_guest = async {
        let mut buf = Vec::new();
        while proto::read_chunk(&mut host_rd, &mut buf).await? {
            tcp_wr.write_all(&buf).await?;
        }
        tcp_wr.shutdown().await
    };
    tokio::try_join!(to_host, to_guest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn reply(host: &mut tokio::io::DuplexStream) -> Vec<u8> {
        proto::read_line(host, proto::MAX_REPLY)
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn forwards_both_ways_with_half_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // A server that answers what it read once the client half-closed.
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(b"got: ").await.unwrap();
            s.write_all(&got).await.unwrap();
        });
        let (mut host, agent) = tokio::io::duplex(1024);
        let forward = tokio::spawn(handle(agent, Ipv4Addr::LOCALHOST));
        host.write_all(proto::request(port).as_bytes())
            .await
            .unwrap();
        assert_eq!(reply(&mut host).await, b"OK");
        let big = vec![b'x'; 200_000];
        proto::write_chunk(&mut host, &big).await.unwrap();
        proto::write_end(&mut host).await.unwrap();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while proto::read_chunk(&mut host, &mut buf).await.unwrap() {
            out.extend_from_slice(&buf);
        }
        assert_eq!(out.len(), 5 + big.len());
        assert!(out.starts_with(b"got: xxx"));
        server.await.unwrap();
        forward.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn refused_ports_and_bad_requests_are_answered() {
        // A port nothing listens on: bind, learn the port, close.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let (mut host, agent) = tokio::io::duplex(1024);
        let forward = tokio::spawn(handle(agent, Ipv4Addr::LOCALHOST));
        host.write_all(proto::request(port).as_bytes())
            .await
            .unwrap();
        let line = String::from_utf8(reply(&mut host).await).unwrap();
        assert!(line.starts_with("ERR dial tcp 127.0.0.1:"), "{line}");
        assert!(line.ends_with(": connect: connection refused"), "{line}");
        forward.await.unwrap().unwrap();

        for bad in [&b"PORT 0\n"[..], b"GET / HTTP/1.1\n", b"PORT 99999\n"] {
            let (mut host, agent) = tokio::io::duplex(1024);
            let forward = tokio::spawn(handle(agent, Ipv4Addr::LOCALHOST));
            host.write_all(bad).await.unwrap();
            assert!(reply(&mut host).await.starts_with(b"ERR malformed"));
            assert!(forward.await.unwrap().is_err());
        }
        // An endless line is cut off without a reply.
        let (mut host, agent) = tokio::io::duplex(1024);
        let forward = tokio::spawn(handle(agent, Ipv4Addr::LOCALHOST));
        let _ = host.write_all(&[b'A'; 100]).await;
        assert!(forward.await.unwrap().is_err());
        // A host that closes mid-data: the guest socket is closed too.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mut host, agent) = tokio::io::duplex(1024);
        let forward = tokio::spawn(handle(agent, Ipv4Addr::LOCALHOST));
        host.write_all(proto::request(port).as_bytes())
            .await
            .unwrap();
        let (mut guest, _) = listener.accept().await.unwrap();
        assert_eq!(reply(&mut host).await, b"OK");
        host.write_all(&[0, 0, 0, 9, b'p']).await.unwrap();
        drop(host);
        assert!(forward.await.unwrap().is_err());
        let mut rest = Vec::new();
        assert_eq!(guest.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
