//! Client sides of the streaming server's protocols, shared by the e2e
//! tests and the streaming benchmark: a WebSocket remotecommand client on
//! tokio-tungstenite (a client library, not our server code) and a SPDY/3.1
//! port-forward client built on our framing (`carapace::streaming::spdy`,
//! checked against the spec's frame layouts in the runtime's unit tests).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use carapace::streaming::spdy::{Frame, HeaderEncoder, FLAG_FIN};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// What a session delivered: stdout, stderr, the error channel.
#[derive(Debug, Default)]
pub struct Seen {
    pub stdout: String,
    pub stderr: String,
    pub status: String,
}

/// A WebSocket client connection (tokio-tungstenite).
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects to a streaming URL (`http://` becomes `ws://`) offering
/// `protocol` (a comma-separated list); asserts that the server chose the
/// first one.
pub async fn connect(url: &str, protocol: &str) -> Result<Ws, WsError> {
    let mut request = url
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (ws, response) = tokio_tungstenite::connect_async(request).await?;
    assert_eq!(
        response.headers()["Sec-WebSocket-Protocol"],
        protocol.split(',').next().unwrap().trim()
    );
    Ok(ws)
}

/// Reads the session to its end.
pub async fn read_all(ws: &mut Ws) -> Seen {
    let mut seen = Seen::default();
    let read = async {
        while let Some(msg) = ws.next().await {
            let data = match msg.expect("websocket message") {
                Message::Binary(b) => b.to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            let Some((&channel, rest)) = data.split_first() else {
                continue;
            };
            let text = String::from_utf8_lossy(rest);
            match channel {
                1 => seen.stdout.push_str(&text),
                2 => seen.stderr.push_str(&text),
                3 => seen.status.push_str(&text),
                other => panic!("unexpected channel {other}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the session ended");
    seen
}

/// A SPDY/3.1 client for port-forward built on our framing (checked
/// against the spec's layouts in the unit tests): each stream's data and
/// whether it ended, by stream id.
pub struct SpdyClient {
    wr: Mutex<(HeaderEncoder, tokio::net::tcp::OwnedWriteHalf)>,
    streams: Routes,
    next_id: std::sync::atomic::AtomicU32,
}

/// A stream's incoming data; `None` once it ended (FIN or reset).
pub type Incoming = mpsc::UnboundedReceiver<Option<Vec<u8>>>;

/// Where the reader sends each stream's data.
pub type Routes = Arc<std::sync::Mutex<HashMap<u32, mpsc::UnboundedSender<Option<Vec<u8>>>>>>;

impl SpdyClient {
    /// Upgrades a CRI PortForward URL to SPDY/3.1 (`portforward.k8s.io`)
    /// and starts the frame reader.
    pub async fn connect(url: &str) -> Arc<Self> {
        let rest = url.strip_prefix("http://").unwrap();
        let (addr, path) = rest.split_at(rest.find('/').unwrap());
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
                 X-Stream-Protocol-Version: portforward.k8s.io\r\nContent-Length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "response ended");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(
            head.contains("x-stream-protocol-version: portforward.k8s.io"),
            "{head}"
        );
        let (mut rd, wr) = tcp.into_split();
        let streams: Routes = Default::default();
        let routes = streams.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                while let Some((frame, used)) = Frame::parse(&buf).unwrap() {
                    buf.drain(..used);
                    let routes = routes.lock().unwrap();
                    match frame {
                        Frame::Data {
                            stream_id,
                            flags,
                            data,
                        } => {
                            if let Some(tx) = routes.get(&stream_id) {
                                if !data.is_empty() {
                                    let _ = tx.send(Some(data));
                                }
                                if flags & FLAG_FIN != 0 {
                                    let _ = tx.send(None);
                                }
                            }
                        }
                        Frame::RstStream { stream_id, .. } => {
                            if let Some(tx) = routes.get(&stream_id) {
                                let _ = tx.send(None);
                            }
                        }
                        _ => {}
                    }
                }
                match rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
        Arc::new(Self {
            wr: Mutex::new((HeaderEncoder::new(), wr)),
            streams,
            next_id: 1.into(),
        })
    }

    /// Opens a stream with these headers; returns its id and data.
    pub async fn open(&self, headers: &[(&str, &str)]) -> (u32, Incoming) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut wr = self.wr.lock().await;
        let id = self
            .next_id
            .fetch_add(2, std::sync::atomic::Ordering::SeqCst);
        self.streams.lock().unwrap().insert(id, tx);
        let block = wr.0.encode(headers).unwrap();
        let frame = Frame::SynStream {
            stream_id: id,
            associated: 0,
            priority: 0,
            flags: 0,
            block,
        };
        wr.1.write_all(&frame.encode()).await.unwrap();
        (id, rx)
    }

    /// A DATA frame on `stream_id` (FIN with `fin`).
    pub async fn send(&self, stream_id: u32, data: &[u8], fin: bool) {
        let frame = Frame::Data {
            stream_id,
            flags: if fin { FLAG_FIN } else { 0 },
            data: data.to_vec(),
        };
        self.wr
            .lock()
            .await
            .1
            .write_all(&frame.encode())
            .await
            .unwrap();
    }

    /// A forwarded connection to `port`: (data stream id, data, error).
    pub async fn forward(&self, port: u16, request: usize) -> (u32, Incoming, Incoming) {
        let port = port.to_string();
        let request = request.to_string();
        let (error_id, error) = self
            .open(&[
                ("streamType", "error"),
                ("port", &port),
                ("requestID", &request),
            ])
            .await;
        // The client sends nothing on the error stream.
        self.send(error_id, b"", true).await;
        let (data_id, data) = self
            .open(&[
                ("streamType", "data"),
                ("port", &port),
                ("requestID", &request),
            ])
            .await;
        (data_id, data, error)
    }
}

/// Everything a stream carries until it ends.
pub async fn read_to_end(rx: &mut Incoming) -> Vec<u8> {
    let mut all = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(Some(d))) => all.extend_from_slice(&d),
            Ok(Some(None)) | Ok(None) => return all,
            Err(_) => panic!("stream did not end: {}", String::from_utf8_lossy(&all)),
        }
    }
}
