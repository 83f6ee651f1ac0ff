//! Port-forward over WebSocket, as kubelet's streaming server serves it:
//! the ports come with the request (the CRI request's ports, else the
//! `port` query parameters); port `i` has two channels, data `2i` and error
//! `2i+1`, and the first message on each carries the port as two
//! little-endian bytes. Every message is a channel byte then data
//! (`v4.base64.channel.k8s.io`: text, the channel as `'0' + channel`, then
//! base64). One connection per port is opened at once; the session closes
//! (1000) once all of them ended.

use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::port_forward::{ClientData, Connection, Event, Forwarder, Reserve};
use super::session::CHANNEL_DEPTH;

/// Ports one session may forward: two channels each, and in base64 text
/// the channel is the character `'0' + channel`, which must stay ASCII
/// (one byte of UTF-8): channels 0..=79.
pub const MAX_PORTS: usize = 40;

/// A negotiated subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `v4.channel.k8s.io`, or no subprotocol at all.
    Binary,
    /// `v4.base64.channel.k8s.io`.
    Base64,
}

impl Protocol {
    /// The first of the client's protocols we speak, and whether to name
    /// it in the answer; no header means binary.
    pub fn negotiate(header: Option<&str>) -> Option<(Protocol, Option<&'static str>)> {
        let Some(header) = header else {
            return Some((Protocol::Binary, None));
        };
        header.split(',').map(str::trim).find_map(|p| match p {
            "v4.channel.k8s.io" => Some((Protocol::Binary, Some("v4.channel.k8s.io"))),
            "v4.base64.channel.k8s.io" => {
                Some((Protocol::Base64, Some("v4.base64.channel.k8s.io")))
            }
            _ => None,
        })
    }

    pub fn encode(self, channel: u8, data: &[u8]) -> Message {
        match self {
            Protocol::Base64 => {
                let mut text = String::with_capacity(1 + data.len() * 4 / 3 + 4);
                text.push(char::from(b'0'.saturating_add(channel)));
                base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
                Message::text(text)
            }
            Protocol::Binary => {
                let mut bytes = Vec::with_capacity(1 + data.len());
                bytes.push(channel);
                bytes.extend_from_slice(data);
                Message::binary(bytes)
            }
        }
    }

    /// A client message as (channel, data); `None` for a malformed one.
    pub fn decode(self, message: &Message) -> Option<(u8, Vec<u8>)> {
        match (self, message) {
            (Protocol::Base64, Message::Text(text)) => {
                let (&first, rest) = text.as_bytes().split_first()?;
                let channel = first.checked_sub(b'0')?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .ok()?;
                Some((channel, data))
            }
            (Protocol::Binary, Message::Binary(bytes)) => {
                let (&channel, rest) = bytes.split_first()?;
                Some((channel, rest.to_vec()))
            }
            _ => None,
        }
    }
}

/// The ports of a request: `requested` (the CRI request's) when there are
/// any, else the `port` query parameters (each may be a comma list), as
/// kubelet reads them.
pub fn ports(requested: &[i32], query: Option<&str>) -> Result<Vec<u16>, String> {
    let ports: Vec<u16> = if requested.is_empty() {
        let mut ports = Vec::new();
        for (key, value) in query
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
        {
            if key != "port" {
                continue;
            }
            if value.is_empty() {
                return Err("query parameter \"port\" cannot be empty".into());
            }
            for p in value.split(',') {
                match p.parse::<u16>() {
                    Ok(0) => return Err(format!("port {p:?} must be > 0")),
                    Ok(p) => ports.push(p),
                    Err(_) => return Err(format!("unable to parse {p:?} as a port")),
                }
                if ports.len() > MAX_PORTS {
                    return Err(format!("at most {MAX_PORTS} ports per session"));
                }
            }
        }
        ports
    } else {
        requested
            .iter()
            .map(|&p| match u16::try_from(p) {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(format!("port {p} is not a TCP port")),
            })
            .collect::<Result<_, _>>()?
    };
    if ports.is_empty() {
        return Err("query parameter \"port\" is required".into());
    }
    if ports.len() > MAX_PORTS {
        return Err(format!("at most {MAX_PORTS} ports per session"));
    }
    Ok(ports)
}

/// Serves one port-forward session over an upgraded connection.
pub async fn serve(
    upgraded: Upgraded,
    protocol: Protocol,
    ports: Vec<u16>,
    forwarder: Forwarder,
    idle: Duration,
) {
    let ws = WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Server,
        Some(super::websocket::config()),
    )
    .await;
    let (mut sink, mut source) = ws.split();
    let (events_tx, mut events) = mpsc::channel::<(u32, Event)>(CHANNEL_DEPTH);
    let mut conns: Vec<Option<Connection>> = Vec::with_capacity(ports.len());
    for (i, &port) in ports.iter().enumerate() {
        for channel in [2 * i as u8, 2 * i as u8 + 1] {
            if sink
                .send(protocol.encode(channel, &port.to_le_bytes()))
                .await
                .is_err()
            {
                return;
            }
        }
        conns.push(Some(Connection::start(
            forwarder.clone(),
            port,
            i as u32,
            events_tx.clone(),
        )));
    }
    drop(events_tx);
    let mut blocked: Option<(Reserve, ClientData)> = None;
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    loop {
        tokio::select! {
            msg = source.next(), if blocked.is_none() => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                let msg = match msg {
                    // The client is gone: dropping the connections closes
                    // them in the guest.
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(m)) => m,
                };
                let Some((channel, data)) = protocol.decode(&msg) else { continue };
                let i = usize::from(channel / 2);
                if channel % 2 != 0 || data.is_empty() {
                    continue;
                }
                let Some(tx) = conns.get(i).and_then(|c| c.as_ref()).and_then(|c| c.input()) else {
                    continue;
                };
                // Backpressure: a full connection stops the reading of the
                // client (not of the events: the guest may need its output
                // read before it reads more, e.g. an echo server).
                match tx.try_send(ClientData::Data(data)) {
                    Ok(()) | Err(TrySendError::Closed(_)) => {}
                    Err(TrySendError::Full(input)) => {
                        blocked = Some((Box::pin(tx.clone().reserve_owned()), input));
                    }
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
            event = events.recv() => {
                let Some((key, event)) = event else {
                    // Every connection ended.
                    let _ = sink.send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "".into(),
                    }))).await;
                    let _ = sink.flush().await;
                    return;
                };
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                let data_channel = 2 * key as u8;
                let message = match event {
                    Event::Data(d) => protocol.encode(data_channel, &d),
                    Event::Error(text) => protocol.encode(data_channel + 1, text.as_bytes()),
                    // v4 has no half-close on the wire: the guest's end
                    // ends the client's direction too (as kubelet's
                    // forwarders do) once it is written out.
                    Event::End => {
                        if let Some(Some(conn)) = conns.get_mut(key as usize) {
                            conn.close_input();
                        }
                        continue;
                    }
                    Event::Done => {
                        if let Some(slot) = conns.get_mut(key as usize) {
                            slot.take();
                        }
                        continue;
                    }
                };
                if sink.send(message).await.is_err() {
                    return;
                }
            }
            _ = &mut idle_timer => {
                tracing::info!("closing an idle port-forward session after {idle:?}");
                let _ = sink.send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                }))).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_negotiate_as_kubelet() {
        assert_eq!(Protocol::negotiate(None), Some((Protocol::Binary, None)));
        assert_eq!(
            Protocol::negotiate(Some("bogus, v4.base64.channel.k8s.io")),
            Some((Protocol::Base64, Some("v4.base64.channel.k8s.io")))
        );
        assert_eq!(
            Protocol::negotiate(Some("v4.channel.k8s.io")),
            Some((Protocol::Binary, Some("v4.channel.k8s.io")))
        );
        // Exec's protocols are not port-forward's.
        assert_eq!(Protocol::negotiate(Some("v5.channel.k8s.io")), None);
        assert_eq!(Protocol::negotiate(Some("portforward.k8s.io")), None);
    }

    #[test]
    fn ports_come_from_the_request_else_the_query() {
        assert_eq!(ports(&[8080, 9090], Some("port=1")), Ok(vec![8080, 9090]));
        assert_eq!(
            ports(&[], Some("port=8080&x=y&port=81,82")),
            Ok(vec![8080, 81, 82])
        );
        for bad in [
            None,
            Some(""),
            Some("port="),
            Some("port=0"),
            Some("port=65536"),
            Some("port=http"),
            Some("port=1,"),
        ] {
            assert!(ports(&[], bad).is_err(), "{bad:?}");
        }
        assert!(ports(&[0], None).is_err());
        assert!(ports(&[70000], None).is_err());
        let many = vec!["port=1"; MAX_PORTS + 1].join("&");
        assert!(ports(&[], Some(&many)).is_err());
        let max = vec!["port=1"; MAX_PORTS].join("&");
        assert_eq!(ports(&[], Some(&max)).unwrap().len(), MAX_PORTS);
    }

    #[test]
    fn channels_carry_the_port_prefix_and_data() {
        // Port 8080 on its data channel of the second port (2): 0x1f90 LE.
        let m = Protocol::Binary.encode(2, &8080u16.to_le_bytes());
        assert_eq!(m, Message::binary(vec![2, 0x90, 0x1f]));
        let m = Protocol::Base64.encode(3, &8080u16.to_le_bytes());
        assert_eq!(m, Message::text("3kB8="));
        // The highest channel of the largest session stays one byte.
        let last = (2 * MAX_PORTS - 1) as u8;
        assert!((b'0' + last).is_ascii());
        for p in [Protocol::Binary, Protocol::Base64] {
            let m = p.encode(last, b"data");
            assert_eq!(p.decode(&m), Some((last, b"data".to_vec())));
        }
        assert_eq!(Protocol::Binary.decode(&Message::binary(Vec::new())), None);
        assert_eq!(Protocol::Binary.decode(&Message::text("0aGk=")), None);
        assert_eq!(Protocol::Base64.decode(&Message::binary(vec![0, 1])), None);
        assert_eq!(Protocol::Base64.decode(&Message::text("0!!")), None);
        assert_eq!(Protocol::Base64.decode(&Message::text("")), None);
    }
}
