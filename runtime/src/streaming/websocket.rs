//! The WebSocket remotecommand protocols (Kubernetes' channel protocols):
//! every message starts with a channel byte, 0 stdin, 1 stdout, 2 stderr,
//! 3 error/status, 4 resize; `v5.channel.k8s.io` adds 255, whose one-byte
//! payload names a channel the client closed (stdin). `base64.channel.k8s.io`
//! sends text messages: the channel as an ASCII digit, then the data in
//! base64.

use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::session::{Input, Output, Streams, Target, CHANNEL_DEPTH};
use super::status::{Outcome, TerminalSize};

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
pub const CLOSE: u8 = 255;

/// Largest message accepted from a client.
const MAX_MESSAGE: usize = 1 << 20;

/// A negotiated subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V5,
    V4,
    /// `channel.k8s.io` (v1).
    Channel,
    /// `base64.channel.k8s.io`.
    Base64,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V5 => "v5.channel.k8s.io",
            Protocol::V4 => "v4.channel.k8s.io",
            Protocol::Channel => "channel.k8s.io",
            Protocol::Base64 => "base64.channel.k8s.io",
        }
    }

    /// The first protocol of the client's `Sec-WebSocket-Protocol` list we
    /// speak; no header at all means `channel.k8s.io`.
    pub fn negotiate(header: Option<&str>) -> Option<Protocol> {
        let Some(header) = header else {
            return Some(Protocol::Channel);
        };
        header.split(',').map(str::trim).find_map(|p| match p {
            "v5.channel.k8s.io" => Some(Protocol::V5),
            "v4.channel.k8s.io" => Some(Protocol::V4),
            "channel.k8s.io" => Some(Protocol::Channel),
            "base64.channel.k8s.io" => Some(Protocol::Base64),
            _ => None,
        })
    }

    fn encode(self, channel: u8, data: &[u8]) -> Message {
        if self == Protocol::Base64 {
            let mut text = String::with_capacity(1 + data.len() * 4 / 3 + 4);
            text.push(char::from(b'0' + channel));
            base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
            Message::text(text)
        } else {
            let mut bytes = Vec::with_capacity(1 + data.len());
            bytes.push(channel);
            bytes.extend_from_slice(data);
            Message::binary(bytes)
        }
    }

    /// A client message as (channel, data); `None` for one without a
    /// channel or with bad base64.
    fn decode(self, message: &Message) -> Option<(u8, Vec<u8>)> {
        match (self, message) {
            (Protocol::Base64, Message::Text(text)) => {
                let (&first, rest) = text.as_bytes().split_first()?;
                let channel = first.checked_sub(b'0')?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .ok()?;
                Some((channel, data))
            }
            (Protocol::Base64, _) => None,
            (_, Message::Binary(bytes)) => {
                let (&channel, rest) = bytes.split_first()?;
                Some((channel, rest.to_vec()))
            }
            _ => None,
        }
    }
}

fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// Serves one exec or attach session over an upgraded connection.
pub async fn serve(
    upgraded: Upgraded,
    protocol: Protocol,
    target: Target,
    cmd: Vec<String>,
    streams: Streams,
    idle: Duration,
) {
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config()))
        .await;
    let (mut sink, mut source) = ws.split();
    let (in_tx, in_rx) = mpsc::channel(CHANNEL_DEPTH);
    let (out_tx, mut out_rx) = mpsc::channel(CHANNEL_DEPTH);
    let mut session = target.spawn(in_rx, out_tx);
    let mut in_tx = Some(in_tx);
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let mut output_done = false;
    let outcome = loop {
        tokio::select! {
            msg = source.next() => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                let msg = match msg {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        // The client is gone: the session kills the process.
                        drop(in_tx.take());
                        return;
                    }
                    Some(Ok(m)) => m,
                };
                let Some((channel, data)) = protocol.decode(&msg) else { continue };
                let input = match channel {
                    STDIN if streams.stdin => Input::Stdin(data),
                    RESIZE => match serde_json::from_slice::<TerminalSize>(&data) {
                        Ok(size) => Input::Resize(size),
                        Err(e) => {
                            tracing::debug!("bad resize message: {e}");
                            continue;
                        }
                    },
                    CLOSE if protocol == Protocol::V5 && data.first() == Some(&STDIN) => {
                        Input::CloseStdin
                    }
                    _ => continue,
                };
                if let Some(tx) = &in_tx {
                    if tx.send(input).await.is_err() {
                        in_tx = None;
                    }
                }
            }
            out = out_rx.recv(), if !output_done => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                let (channel, data, wanted) = match out {
                    Some(Output::Stdout(d)) => (STDOUT, d, streams.stdout),
                    Some(Output::Stderr(d)) => (STDERR, d, streams.stderr),
                    None => {
                        output_done = true;
                        continue;
                    }
                };
                if wanted && sink.send(protocol.encode(channel, &data)).await.is_err() {
                    return;
                }
            }
            outcome = &mut session => {
                break outcome.unwrap_or_else(|e| Outcome::Failed(format!("exec session: {e}")));
            }
            _ = &mut idle_timer => {
                tracing::info!("closing an idle exec session after {idle:?}");
                let _ = sink.send(normal_close()).await;
                return;
            }
        }
    };
    // The session ended after all output was handed over; send what is
    // still queued, then the status.
    while let Ok(out) = out_rx.try_recv() {
        let (channel, data, wanted) = match out {
            Output::Stdout(d) => (STDOUT, d, streams.stdout),
            Output::Stderr(d) => (STDERR, d, streams.stderr),
        };
        if wanted && sink.send(protocol.encode(channel, &data)).await.is_err() {
            return;
        }
    }
    let status = match protocol {
        Protocol::V5 | Protocol::V4 => Some(outcome.status_json(&cmd)),
        Protocol::Channel | Protocol::Base64 => outcome.error_text(&cmd),
    };
    if let Some(status) = status {
        let _ = sink.send(protocol.encode(ERROR, status.as_bytes())).await;
    }
    // A normal closure (1000): Kubernetes' Go client reports a close without
    // a status code (1005) as an error on the error stream.
    let _ = sink.send(normal_close()).await;
    let _ = sink.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_negotiate_in_client_order() {
        assert_eq!(
            Protocol::negotiate(Some("v5.channel.k8s.io, v4.channel.k8s.io")),
            Some(Protocol::V5)
        );
        assert_eq!(
            Protocol::negotiate(Some("bogus,v4.channel.k8s.io")),
            Some(Protocol::V4)
        );
        assert_eq!(
            Protocol::negotiate(Some("base64.channel.k8s.io")),
            Some(Protocol::Base64)
        );
        assert_eq!(Protocol::negotiate(None), Some(Protocol::Channel));
        assert_eq!(Protocol::negotiate(Some("v3.channel.k8s.io")), None);
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_ignored() {
        for p in [Protocol::V5, Protocol::Base64] {
            let m = p.encode(STDOUT, b"hi\n");
            assert_eq!(p.decode(&m), Some((STDOUT, b"hi\n".to_vec())));
        }
        assert_eq!(Protocol::V4.decode(&Message::binary(Vec::new())), None);
        assert_eq!(Protocol::V4.decode(&Message::text("0aGk=")), None);
        assert_eq!(Protocol::Base64.decode(&Message::text("")), None);
        assert_eq!(Protocol::Base64.decode(&Message::text("0!!")), None);
        assert_eq!(Protocol::Base64.decode(&Message::text(" aGk=")), None);
        assert_eq!(
            Protocol::Base64.decode(&Message::text("0aGk=")),
            Some((STDIN, b"hi".to_vec()))
        );
    }
}
