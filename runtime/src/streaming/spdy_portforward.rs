//! Port-forward over SPDY/3.1 (`portforward.k8s.io`, what kubectl and
//! kubelet's proxy speak): for each forwarded connection the client opens
//! a pair of streams with the headers `streamType` (`error` or `data`),
//! `port` and `requestID`; once both are there the connection starts.
//! The data stream carries the bytes both ways (a FIN is a half-close);
//! a failure (e.g. connection refused) is written on that pair's error
//! stream, and only that connection ends. Old clients without `requestID`
//! are paired as kubelet does (error stream id, data stream id − 2).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::port_forward::{ClientData, Connection, Event, Forwarder, Reserve, MAX_CONNECTIONS};
use super::session::CHANNEL_DEPTH;
use super::spdy::{self, Frame, HeaderDecoder, HeaderEncoder, Headers, FLAG_FIN};

/// The only port-forward protocol over SPDY.
pub const PROTOCOL: &str = "portforward.k8s.io";

/// How long a pair may wait for its second stream (kubelet's stream
/// creation timeout).
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);

/// The client's offer (`X-Stream-Protocol-Version` values) names ours.
pub fn negotiate(offered: &[String]) -> Option<&'static str> {
    offered
        .iter()
        .flat_map(|h| h.split(','))
        .any(|p| p.trim() == PROTOCOL)
        .then_some(PROTOCOL)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Data,
    Error,
}

/// What a stream's headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub kind: Kind,
    pub port: u16,
    pub request_id: String,
}

impl StreamInfo {
    /// Validates the headers of stream `id` as kubelet does.
    pub fn parse(headers: &Headers, id: u32) -> Result<Self, String> {
        let port = spdy::header(headers, "port").ok_or("\"port\" header is required")?;
        let port = match port.parse::<u16>() {
            Ok(0) => return Err(format!("port {port:?} must be > 0")),
            Ok(p) => p,
            Err(_) => return Err(format!("unable to parse {port:?} as a port")),
        };
        let kind = match spdy::header(headers, "streamtype") {
            Some("data") => Kind::Data,
            Some("error") => Kind::Error,
            Some(other) => return Err(format!("invalid stream type {other:?}")),
            None => return Err("\"streamType\" header is required".into()),
        };
        let request_id = match spdy::header(headers, "requestid") {
            Some(r) if !r.is_empty() => r.to_owned(),
            _ => match kind {
                Kind::Error => id.to_string(),
                Kind::Data => i64::from(id).saturating_sub(2).to_string(),
            },
        };
        Ok(Self {
            kind,
            port,
            request_id,
        })
    }
}

#[derive(Debug)]
struct Half {
    data: Option<u32>,
    error: Option<u32>,
    port: u16,
    since: Instant,
}

/// A pair of streams, complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    pub data: u32,
    pub error: u32,
    pub port: u16,
}

/// Pairs streams by request id.
#[derive(Debug, Default)]
pub struct Pairing {
    waiting: HashMap<String, Half>,
}

/// What adding a stream did.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    Waiting,
    Complete(Pair),
    /// The stream is refused (a second stream of one type, too many waiting).
    Refused(String),
}

impl Pairing {
    pub fn add(&mut self, info: StreamInfo, id: u32, now: Instant) -> Added {
        if !self.waiting.contains_key(&info.request_id) && self.waiting.len() >= MAX_CONNECTIONS {
            return Added::Refused("too many streams waiting for their pair".into());
        }
        let half = self.waiting.entry(info.request_id.clone()).or_insert(Half {
            data: None,
            error: None,
            port: info.port,
            since: now,
        });
        let slot = match info.kind {
            Kind::Data => &mut half.data,
            Kind::Error => &mut half.error,
        };
        if slot.is_some() {
            let what = if info.kind == Kind::Data {
                "data"
            } else {
                "error"
            };
            return Added::Refused(format!("{what} stream already assigned"));
        }
        *slot = Some(id);
        if info.kind == Kind::Data {
            half.port = info.port;
        }
        match (half.data, half.error) {
            (Some(data), Some(error)) => {
                let port = half.port;
                self.waiting.remove(&info.request_id);
                Added::Complete(Pair { data, error, port })
            }
            _ => Added::Waiting,
        }
    }

    /// Takes the halves waiting longer than `timeout`: (data, error) ids.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<(Option<u32>, Option<u32>)> {
        let mut gone = Vec::new();
        self.waiting.retain(|_, h| {
            let keep = now.saturating_duration_since(h.since) < timeout;
            if !keep {
                gone.push((h.data, h.error));
            }
            keep
        });
        gone
    }
}

enum Write {
    Frame(Frame),
    Reply(u32),
}

struct Active {
    error: u32,
    conn: Connection,
    /// We sent the FIN of the data stream.
    data_ended: bool,
}

fn data_frame(stream_id: u32, flags: u8, data: Vec<u8>) -> Write {
    Write::Frame(Frame::Data {
        stream_id,
        flags,
        data,
    })
}

/// Serves one port-forward session over an upgraded SPDY connection.
pub async fn serve<S>(io: S, forwarder: Forwarder, idle: Duration)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let (write_tx, mut write_rx) = mpsc::channel::<Write>(CHANNEL_DEPTH);
    let _writer = AbortOnDrop(tokio::spawn(async move {
        let mut enc = HeaderEncoder::new();
        while let Some(w) = write_rx.recv().await {
            let frame = match w {
                Write::Frame(f) => f,
                Write::Reply(stream_id) => match enc.encode(&[]) {
                    Ok(block) => Frame::SynReply {
                        stream_id,
                        flags: 0,
                        block,
                    },
                    Err(_) => break,
                },
            };
            if wr.write_all(&frame.encode()).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    }));
    let (events_tx, mut events) = mpsc::channel::<(u32, Event)>(CHANNEL_DEPTH);
    let mut dec = HeaderDecoder::new();
    let mut pairing = Pairing::default();
    let mut active: HashMap<u32, Active> = HashMap::new();
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut blocked: Option<(Reserve, ClientData)> = None;
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let mut tick = tokio::time::interval(Duration::from_secs(1));

    loop {
        // Frames already read, while no connection's input is full.
        while blocked.is_none() {
            let (frame, used) = match Frame::parse(&buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("spdy port-forward: {e}");
                    return;
                }
            };
            buf.drain(..used);
            let mut out = Vec::new();
            match frame {
                Frame::SynStream {
                    stream_id, block, ..
                } => {
                    let headers = match dec.decode(&block) {
                        Ok(h) => h,
                        Err(e) => {
                            tracing::debug!("spdy port-forward: {e}");
                            return;
                        }
                    };
                    let added = match StreamInfo::parse(&headers, stream_id) {
                        Err(e) => Added::Refused(e),
                        Ok(_) if active.len() >= MAX_CONNECTIONS => {
                            Added::Refused("too many forwarded connections".into())
                        }
                        Ok(info) => pairing.add(info, stream_id, Instant::now()),
                    };
                    match added {
                        Added::Refused(why) => {
                            tracing::debug!("spdy port-forward: stream {stream_id} refused: {why}");
                            out.push(Write::Frame(Frame::RstStream {
                                stream_id,
                                status: spdy::RST_REFUSED_STREAM,
                            }));
                        }
                        Added::Waiting => out.push(Write::Reply(stream_id)),
                        Added::Complete(pair) => {
                            out.push(Write::Reply(stream_id));
                            let conn = Connection::start(
                                forwarder.clone(),
                                pair.port,
                                pair.data,
                                events_tx.clone(),
                            );
                            active.insert(
                                pair.data,
                                Active {
                                    error: pair.error,
                                    conn,
                                    data_ended: false,
                                },
                            );
                        }
                    }
                }
                Frame::Data {
                    stream_id,
                    flags,
                    data,
                } => {
                    if let Some(tx) = active.get(&stream_id).and_then(|a| a.conn.input()) {
                        let mut inputs = Vec::new();
                        if !data.is_empty() {
                            inputs.push(ClientData::Data(data));
                        }
                        if flags & FLAG_FIN != 0 {
                            inputs.push(ClientData::End);
                        }
                        for input in inputs {
                            match tx.try_send(input) {
                                Ok(()) | Err(TrySendError::Closed(_)) => {}
                                Err(TrySendError::Full(input)) if blocked.is_none() => {
                                    let reserve = tx.clone().reserve_owned();
                                    blocked = Some((Box::pin(reserve), input));
                                }
                                Err(TrySendError::Full(input)) => {
                                    // Data then FIN, both full: the FIN
                                    // follows once there is room.
                                    let tx = tx.clone();
                                    tokio::spawn(async move { tx.send(input).await });
                                }
                            }
                        }
                    }
                }
                Frame::RstStream { stream_id, .. } => {
                    if let Some(a) = active.remove(&stream_id) {
                        a.conn.abort();
                        out.push(data_frame(a.error, FLAG_FIN, Vec::new()));
                    }
                }
                Frame::Ping(id) => out.push(Write::Frame(Frame::Ping(id))),
                Frame::GoAway { .. } => return,
                _ => {}
            }
            for w in out {
                if write_tx.send(w).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            n = rd.read(&mut chunk), if blocked.is_none() => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            permit = async { blocked.as_mut().map(|b| b.0.as_mut()).expect("guarded").await },
                if blocked.is_some() =>
            {
                let (_, input) = blocked.take().expect("guarded");
                if let Ok(permit) = permit {
                    permit.send(input);
                }
            }
            Some((key, event)) = events.recv() => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                let Some(a) = active.get_mut(&key) else { continue };
                let mut out = Vec::new();
                match event {
                    Event::Data(d) => out.push(data_frame(key, 0, d)),
                    Event::End => {
                        a.data_ended = true;
                        out.push(data_frame(key, FLAG_FIN, Vec::new()));
                    }
                    Event::Error(text) => out.push(data_frame(a.error, 0, text.into_bytes())),
                    Event::Done => {
                        if !a.data_ended {
                            out.push(data_frame(key, FLAG_FIN, Vec::new()));
                        }
                        out.push(data_frame(a.error, FLAG_FIN, Vec::new()));
                        active.remove(&key);
                    }
                }
                for w in out {
                    if write_tx.send(w).await.is_err() {
                        return;
                    }
                }
            }
            _ = tick.tick() => {
                for (data, error) in pairing.expire(Instant::now(), PAIR_TIMEOUT) {
                    if let Some(error) = error {
                        let text = "timed out waiting for the other stream of the pair";
                        let _ = write_tx.send(data_frame(error, 0, text.into())).await;
                        let _ = write_tx.send(data_frame(error, FLAG_FIN, Vec::new())).await;
                    }
                    if let Some(data) = data {
                        let _ = write_tx.send(data_frame(data, FLAG_FIN, Vec::new())).await;
                    }
                }
            }
            _ = &mut idle_timer => {
                tracing::info!("closing an idle port-forward session after {idle:?}");
                return;
            }
        }
    }
}

/// The WebSocket subprotocol of kubectl's SPDY-over-WebSocket tunnel
/// (client-go's default for port-forward since 1.31).
pub const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

/// Serves a port-forward session whose SPDY bytes travel in the binary
/// messages of a WebSocket (`TUNNEL_PROTOCOL`): a pipe of 64 KiB between
/// the WebSocket and [`serve`] keeps the backpressure.
pub async fn serve_tunneled(
    upgraded: hyper::upgrade::Upgraded,
    forwarder: Forwarder,
    idle: Duration,
) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{protocol::Role, Message};
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        Role::Server,
        Some(super::websocket::config()),
    )
    .await;
    let (mut sink, mut source) = ws.split();
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut rd, mut wr) = tokio::io::split(ours);
    let session = AbortOnDrop(tokio::spawn(serve(theirs, forwarder, idle)));
    let inbound = async {
        while let Some(Ok(msg)) = source.next().await {
            match msg {
                Message::Binary(b) if wr.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    // Either side ending ends the session.
    tokio::select! {
        _ = inbound => {}
        _ = outbound => {}
    }
    drop(session);
}

/// Aborts a task when dropped (the writer must not outlive its session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_portforward_is_negotiated() {
        let offer = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(negotiate(&offer(&["portforward.k8s.io"])), Some(PROTOCOL));
        assert_eq!(
            negotiate(&offer(&["v4.channel.k8s.io, portforward.k8s.io"])),
            Some(PROTOCOL)
        );
        assert_eq!(negotiate(&offer(&["v4.channel.k8s.io"])), None);
        assert_eq!(negotiate(&[]), None);
    }

    #[test]
    fn stream_headers_are_validated() {
        let ok = StreamInfo::parse(
            &headers(&[("streamtype", "data"), ("port", "8080"), ("requestid", "4")]),
            5,
        )
        .unwrap();
        assert_eq!(
            ok,
            StreamInfo {
                kind: Kind::Data,
                port: 8080,
                request_id: "4".into()
            }
        );
        for bad in [
            &[("streamtype", "data")][..],
            &[("streamtype", "data"), ("port", "0")],
            &[("streamtype", "data"), ("port", "65536")],
            &[("streamtype", "data"), ("port", "http")],
            &[("streamtype", "stdin"), ("port", "80")],
            &[("port", "80")],
        ] {
            assert!(StreamInfo::parse(&headers(bad), 1).is_err(), "{bad:?}");
        }
        // No request id: kubelet's pairing of old clients.
        let e = StreamInfo::parse(&headers(&[("streamtype", "error"), ("port", "1")]), 7);
        let d = StreamInfo::parse(&headers(&[("streamtype", "data"), ("port", "1")]), 9);
        assert_eq!(e.unwrap().request_id, "7");
        assert_eq!(d.unwrap().request_id, "7");
    }

    fn info(kind: Kind, port: u16, request: &str) -> StreamInfo {
        StreamInfo {
            kind,
            port,
            request_id: request.into(),
        }
    }

    #[test]
    fn streams_pair_by_request_id_in_any_order() {
        let now = Instant::now();
        let mut p = Pairing::default();
        assert_eq!(p.add(info(Kind::Error, 80, "0"), 1, now), Added::Waiting);
        assert_eq!(p.add(info(Kind::Data, 81, "1"), 3, now), Added::Waiting);
        assert_eq!(p.add(info(Kind::Error, 81, "1"), 5, now), {
            Added::Complete(Pair {
                data: 3,
                error: 5,
                port: 81,
            })
        });
        assert!(matches!(
            p.add(info(Kind::Error, 80, "0"), 7, now),
            Added::Refused(_)
        ));
        assert_eq!(
            p.add(info(Kind::Data, 80, "0"), 9, now),
            Added::Complete(Pair {
                data: 9,
                error: 1,
                port: 80
            })
        );
        // A request id may be used again once its pair is complete.
        assert_eq!(p.add(info(Kind::Data, 80, "0"), 11, now), Added::Waiting);
        assert!(p.expire(now, PAIR_TIMEOUT).is_empty());
        assert_eq!(
            p.expire(now + PAIR_TIMEOUT, PAIR_TIMEOUT),
            vec![(Some(11), None)]
        );
        assert!(p.waiting.is_empty());
    }

    /// A SPDY client on one end of a pipe: (writer with its header
    /// context, frames read).
    struct Client {
        enc: HeaderEncoder,
        wr: tokio::io::WriteHalf<tokio::io::DuplexStream>,
        frames: mpsc::UnboundedReceiver<Frame>,
    }

    impl Client {
        fn start(forwarder: Forwarder) -> Self {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            tokio::spawn(serve(theirs, forwarder, Duration::from_secs(60)));
            let (mut rd, wr) = tokio::io::split(ours);
            let (tx, frames) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 16 * 1024];
                loop {
                    while let Some((f, used)) = Frame::parse(&buf).unwrap() {
                        buf.drain(..used);
                        if tx.send(f).is_err() {
                            return;
                        }
                    }
                    match rd.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
            Self {
                enc: HeaderEncoder::new(),
                wr,
                frames,
            }
        }

        async fn open(&mut self, id: u32, kind: &str, port: &str, request: &str) {
            let block = self
                .enc
                .encode(&[("streamType", kind), ("port", port), ("requestID", request)])
                .unwrap();
            let frame = Frame::SynStream {
                stream_id: id,
                associated: 0,
                priority: 0,
                flags: 0,
                block,
            };
            self.wr.write_all(&frame.encode()).await.unwrap();
        }

        async fn data(&mut self, id: u32, data: &[u8], fin: bool) {
            let frame = Frame::Data {
                stream_id: id,
                flags: if fin { FLAG_FIN } else { 0 },
                data: data.to_vec(),
            };
            self.wr.write_all(&frame.encode()).await.unwrap();
        }
    }

    /// An agent that answers `OK` for port 80 and refuses the others, then
    /// echoes chunk by chunk (reading no more while its echo is not taken).
    async fn echo_agent(mut s: tokio::net::UnixStream) {
        use carapace_agent_api::port_forward as proto;
        let line = proto::read_line(&mut s, 64).await.unwrap().unwrap();
        if line != b"PORT 80" {
            let _ = s
                .write_all(proto::reply_error("dial tcp: connect: connection refused").as_bytes())
                .await;
            return;
        }
        s.write_all(b"OK\n").await.unwrap();
        let mut buf = Vec::new();
        while let Ok(true) = proto::read_chunk(&mut s, &mut buf).await {
            if proto::write_chunk(&mut s, &buf).await.is_err() {
                return;
            }
        }
        let _ = proto::write_end(&mut s).await;
    }

    #[tokio::test]
    async fn a_session_pairs_forwards_echoes_and_reports_refusals() {
        let (_dir, fwd) = crate::streaming::port_forward::tests::fake_vm(echo_agent).await;
        let mut c = Client::start(fwd);
        // Request 0 to a refused port, request 1 to the echo: data first.
        c.open(1, "error", "81", "0").await;
        c.open(3, "data", "81", "0").await;
        c.open(5, "data", "80", "1").await;
        c.open(7, "error", "80", "1").await;
        // A bad stream is refused, the session goes on.
        c.open(9, "stdin", "80", "2").await;
        // 4 MiB through the echo while reading: the session must neither
        // deadlock nor lose anything.
        let payload: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let sender = {
            let payload = payload.clone();
            let mut wr = c.wr;
            tokio::spawn(async move {
                for piece in payload.chunks(16 * 1024) {
                    let f = Frame::Data {
                        stream_id: 5,
                        flags: 0,
                        data: piece.to_vec(),
                    };
                    wr.write_all(&f.encode()).await.unwrap();
                }
                let f = Frame::Data {
                    stream_id: 5,
                    flags: FLAG_FIN,
                    data: Vec::new(),
                };
                wr.write_all(&f.encode()).await.unwrap();
                wr
            })
        };
        let mut replies = Vec::new();
        let mut streams: HashMap<u32, (Vec<u8>, bool)> = HashMap::new();
        let mut rst = Vec::new();
        let done = |s: &HashMap<u32, (Vec<u8>, bool)>| {
            [1, 3, 5, 7].iter().all(|id| s.get(id).is_some_and(|e| e.1))
        };
        while !done(&streams) {
            let frame = tokio::time::timeout(Duration::from_secs(20), c.frames.recv())
                .await
                .expect("the session stalled")
                .expect("the session ended");
            match frame {
                Frame::SynReply { stream_id, .. } => replies.push(stream_id),
                Frame::RstStream { stream_id, .. } => rst.push(stream_id),
                Frame::Data {
                    stream_id,
                    flags,
                    data,
                } => {
                    let e = streams.entry(stream_id).or_default();
                    assert!(!e.1, "data after FIN on {stream_id}");
                    e.0.extend_from_slice(&data);
                    e.1 = flags & FLAG_FIN != 0;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        replies.sort();
        assert_eq!(replies, [1, 3, 5, 7]);
        assert_eq!(rst, [9]);
        let refusal = String::from_utf8_lossy(&streams[&1].0).into_owned();
        assert_eq!(
            refusal,
            "error forwarding port 81 to pod p, uid : dial tcp: connect: connection refused"
        );
        assert!(streams[&3].0.is_empty());
        assert!(streams[&5].0 == payload, "the echo differs");
        assert!(streams[&7].0.is_empty());
        c.wr = sender.await.unwrap();
        // PINGs are answered.
        let ping = Frame::Ping(7).encode();
        c.wr.write_all(&ping).await.unwrap();
        assert_eq!(c.frames.recv().await, Some(Frame::Ping(7)));
        c.data(5, b"late", false).await;
    }

    #[test]
    fn waiting_halves_are_bounded() {
        let now = Instant::now();
        let mut p = Pairing::default();
        for i in 0..MAX_CONNECTIONS {
            assert_eq!(
                p.add(info(Kind::Data, 80, &i.to_string()), i as u32, now),
                Added::Waiting
            );
        }
        assert!(matches!(
            p.add(info(Kind::Data, 80, "new"), 1, now),
            Added::Refused(_)
        ));
        // Completing a waiting one still works.
        assert!(matches!(
            p.add(info(Kind::Error, 80, "0"), 99_999, now),
            Added::Complete(_)
        ));
    }
}
