//! Exec and attach over SPDY/3.1 (what crictl and kubelet's proxy speak by default):
//! after the HTTP upgrade the client opens one stream per role, named by
//! its `streamType` header (`error`, `stdin`, `stdout`, `stderr`,
//! `resize`); we acknowledge each with a SYN_REPLY, copy data between them
//! and the process, and end with the status on the error stream.

use std::collections::HashMap;
use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::session::{Input, Output, Streams, Target, CHANNEL_DEPTH};
use super::spdy::{self, Frame, HeaderDecoder, HeaderEncoder, FLAG_FIN};
use super::status::{Outcome, TerminalSize};

/// remotecommand versions over SPDY, in the order we prefer them.
pub const VERSIONS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// The first version of the client's list we speak; none offered means
/// `channel.k8s.io`.
pub fn negotiate(offered: &[String]) -> Option<&'static str> {
    let offered: Vec<&str> = offered
        .iter()
        .flat_map(|h| h.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if offered.is_empty() {
        return Some("channel.k8s.io");
    }
    offered
        .iter()
        .find_map(|o| VERSIONS.iter().find(|v| *v == o).copied())
}

/// How long the client may take to open its streams.
const STREAMS_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Role {
    Error,
    Stdin,
    Stdout,
    Stderr,
    Resize,
}

enum Write {
    Frame(Frame),
    Reply(u32),
}

/// Serves one exec or attach session over an upgraded SPDY connection.
pub async fn serve(
    upgraded: Upgraded,
    version: &'static str,
    target: Target,
    cmd: Vec<String>,
    streams: Streams,
    idle: Duration,
) {
    let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
    let (write_tx, mut write_rx) = mpsc::channel::<Write>(CHANNEL_DEPTH);
    let writer = tokio::spawn(async move {
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
    });

    let mut dec = HeaderDecoder::new();
    let mut roles: HashMap<u32, Role> = HashMap::new();
    let mut ids: HashMap<Role, u32> = HashMap::new();
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut resize_buf = Vec::new();
    let (in_tx, in_rx) = mpsc::channel(CHANNEL_DEPTH);
    let (out_tx, mut out_rx) = mpsc::channel(CHANNEL_DEPTH);
    let mut in_tx = Some(in_tx);
    let mut session = target.spawn(in_rx, out_tx);
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let streams_deadline = tokio::time::sleep(STREAMS_TIMEOUT);
    tokio::pin!(streams_deadline);
    let mut pending: Vec<Output> = Vec::new();
    let mut output_done = false;
    let ready = |ids: &HashMap<Role, u32>| {
        ids.contains_key(&Role::Error)
            && (!streams.stdout || ids.contains_key(&Role::Stdout))
            && (!streams.stderr || streams.tty || ids.contains_key(&Role::Stderr))
    };
    let mut chunk = vec![0u8; 16 * 1024];

    let outcome = loop {
        tokio::select! {
            n = rd.read(&mut chunk) => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                let n = match n {
                    Ok(0) | Err(_) => {
                        drop(in_tx.take());
                        writer.abort();
                        return;
                    }
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                loop {
                    let (frame, used) = match Frame::parse(&buf) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!("spdy exec: {e}");
                            drop(in_tx.take());
                            writer.abort();
                            return;
                        }
                    };
                    buf.drain(..used);
                    let mut input = None;
                    match frame {
                        Frame::SynStream { stream_id, block, .. } => {
                            let headers = match dec.decode(&block) {
                                Ok(h) => h,
                                Err(e) => {
                                    tracing::debug!("spdy exec: {e}");
                                    drop(in_tx.take());
                                    writer.abort();
                                    return;
                                }
                            };
                            let role = match spdy::header(&headers, "streamtype") {
                                Some("error") => Role::Error,
                                Some("stdin") => Role::Stdin,
                                Some("stdout") => Role::Stdout,
                                Some("stderr") => Role::Stderr,
                                Some("resize") => Role::Resize,
                                _ => {
                                    let _ = write_tx.send(Write::Frame(Frame::RstStream {
                                        stream_id,
                                        status: spdy::RST_PROTOCOL_ERROR,
                                    })).await;
                                    continue;
                                }
                            };
                            roles.insert(stream_id, role);
                            ids.insert(role, stream_id);
                            let _ = write_tx.send(Write::Reply(stream_id)).await;
                        }
                        Frame::Data { stream_id, flags, data } => {
                            match roles.get(&stream_id) {
                                Some(Role::Stdin) if streams.stdin => {
                                    if !data.is_empty() {
                                        if let Some(tx) = &in_tx {
                                            let _ = tx.send(Input::Stdin(data)).await;
                                        }
                                    }
                                    if flags & FLAG_FIN != 0 {
                                        input = Some(Input::CloseStdin);
                                    }
                                }
                                Some(Role::Resize) => {
                                    resize_buf.extend_from_slice(&data);
                                    if resize_buf.len() > 64 * 1024 {
                                        resize_buf.clear();
                                    }
                                    let mut sizes = serde_json::Deserializer::from_slice(&resize_buf)
                                        .into_iter::<TerminalSize>();
                                    let mut last = None;
                                    let mut consumed = 0;
                                    while let Some(s) = sizes.next() {
                                        match s {
                                            Ok(s) => {
                                                last = Some(s);
                                                consumed = sizes.byte_offset();
                                            }
                                            Err(e) if e.is_eof() => break,
                                            Err(_) => {
                                                consumed = resize_buf.len();
                                                break;
                                            }
                                        }
                                    }
                                    resize_buf.drain(..consumed);
                                    input = last.map(Input::Resize);
                                }
                                _ => {}
                            }
                        }
                        Frame::RstStream { stream_id, .. }
                            if roles.get(&stream_id) == Some(&Role::Stdin) =>
                        {
                            input = Some(Input::CloseStdin);
                        }
                        Frame::Ping(id) => {
                            let _ = write_tx.send(Write::Frame(Frame::Ping(id))).await;
                        }
                        Frame::GoAway { .. } => {
                            drop(in_tx.take());
                            writer.abort();
                            return;
                        }
                        _ => {}
                    }
                    if let (Some(input), Some(tx)) = (input, &in_tx) {
                        let _ = tx.send(input).await;
                    }
                }
                if ready(&ids) {
                    for out in pending.drain(..) {
                        send_output(&write_tx, &ids, &streams, out).await;
                    }
                }
            }
            out = out_rx.recv(), if !output_done && (ready(&ids) || pending.len() < CHANNEL_DEPTH) => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                match out {
                    Some(out) if ready(&ids) => send_output(&write_tx, &ids, &streams, out).await,
                    Some(out) => pending.push(out),
                    None => output_done = true,
                }
            }
            outcome = &mut session, if ready(&ids) => {
                break outcome.unwrap_or_else(|e| Outcome::Failed(format!("exec session: {e}")));
            }
            _ = &mut streams_deadline, if !ready(&ids) => {
                tracing::info!("spdy exec: the client did not open its streams in time");
                drop(in_tx.take());
                writer.abort();
                return;
            }
            _ = &mut idle_timer => {
                tracing::info!("closing an idle exec session after {idle:?}");
                drop(in_tx.take());
                writer.abort();
                return;
            }
        }
    };
    for out in pending.drain(..) {
        send_output(&write_tx, &ids, &streams, out).await;
    }
    while let Ok(out) = out_rx.try_recv() {
        send_output(&write_tx, &ids, &streams, out).await;
    }
    let status = if version == "v4.channel.k8s.io" {
        Some(outcome.status_json(&cmd))
    } else {
        outcome.error_text(&cmd)
    };
    if let (Some(status), Some(&id)) = (status, ids.get(&Role::Error)) {
        let _ = write_tx
            .send(Write::Frame(Frame::Data {
                stream_id: id,
                flags: 0,
                data: status.into_bytes(),
            }))
            .await;
    }
    for role in [Role::Stdout, Role::Stderr, Role::Error] {
        if let Some(&id) = ids.get(&role) {
            let _ = write_tx
                .send(Write::Frame(Frame::Data {
                    stream_id: id,
                    flags: FLAG_FIN,
                    data: Vec::new(),
                }))
                .await;
        }
    }
    let last = roles.keys().copied().max().unwrap_or(0);
    let _ = write_tx
        .send(Write::Frame(Frame::GoAway {
            last_good: last,
            status: 0,
        }))
        .await;
    drop(write_tx);
    let _ = writer.await;
}

async fn send_output(
    write_tx: &mpsc::Sender<Write>,
    ids: &HashMap<Role, u32>,
    streams: &Streams,
    out: Output,
) {
    let (role, data, wanted) = match out {
        Output::Stdout(d) => (Role::Stdout, d, streams.stdout),
        Output::Stderr(d) => (Role::Stderr, d, streams.stderr),
    };
    if let (true, Some(&stream_id)) = (wanted, ids.get(&role)) {
        let _ = write_tx
            .send(Write::Frame(Frame::Data {
                stream_id,
                flags: 0,
                data,
            }))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_negotiate_in_client_order() {
        let offer = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            negotiate(&offer(&["v4.channel.k8s.io", "v3.channel.k8s.io"])),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(
            negotiate(&offer(&["v5.channel.k8s.io", "v3.channel.k8s.io"])),
            Some("v3.channel.k8s.io")
        );
        assert_eq!(
            negotiate(&offer(&["v2.channel.k8s.io, channel.k8s.io"])),
            Some("v2.channel.k8s.io")
        );
        assert_eq!(negotiate(&[]), Some("channel.k8s.io"));
        assert_eq!(negotiate(&offer(&["portforward.k8s.io"])), None);
    }
}
