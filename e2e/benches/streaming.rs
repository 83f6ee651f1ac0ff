//! Exec round trip and port-forward throughput through the daemon's
//! streaming server, in one pod VM (the daemon's configured driver, qemu
//! here) with one busybox container:
//! - ExecSync of `true` (CRI call to its response, exit code 0);
//! - streaming exec of `true`: CRI Exec, then the returned URL over
//!   WebSocket (`v5.channel.k8s.io`, tokio-tungstenite) until the Status
//!   object with `Success` arrives on the error channel;
//! - port-forward throughput: the client pushes PF_MIB MiB (8) to a sink in
//!   the container that reads exactly that many bytes and answers with the
//!   count it read (`head -c N | wc -c` behind busybox `nc`), over
//!   WebSocket (`v4.channel.k8s.io` port-forward framing) and over SPDY/3.1
//!   (`portforward.k8s.io`, our client). Timed from the first byte sent to
//!   the count received (connection setup excluded); the count must match.
//!   As a baseline without the streaming path, the same sink fed from
//!   inside the guest (`head -c N /dev/zero | nc 127.0.0.1 8080` by
//!   ExecSync, the whole call timed).
//!
//! Median, min and max of RUNS (20) runs each; PF_RUNS (RUNS) for the
//! port-forward runs. Anything that fails panics: no figure is printed
//! that was not measured.
//! `cargo bench -p carapace-e2e --bench streaming`, or in the debug profile
//! `cargo test -p carapace-e2e --bench streaming`.

use std::time::{Duration, Instant};

use carapace_e2e::cri::{self, Cri};
use carapace_e2e::daemon::Daemon;
use carapace_e2e::streaming_client::{connect, read_to_end, SpdyClient, Ws};
use futures_util::{SinkExt, StreamExt};
use k8s_cri::v1::{ExecRequest, ExecSyncRequest, PortForwardRequest};
use tokio_tungstenite::tungstenite::Message;

/// One WebSocket message or SPDY DATA frame of payload.
const CHUNK: usize = 32 * 1024;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median (mean of the two middle values for an even count), min, max.
fn summary(figures: &mut [f64]) -> (f64, f64, f64) {
    assert!(!figures.is_empty(), "no runs");
    figures.sort_by(f64::total_cmp);
    let n = figures.len();
    let median = if n.is_multiple_of(2) {
        (figures[n / 2 - 1] + figures[n / 2]) / 2.0
    } else {
        figures[n / 2]
    };
    (median, figures[0], figures[n - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn exec_sync(cri: &mut Cri, container: &str, cmd: &[&str]) -> (i32, String) {
    let out = cri
        .exec_sync(ExecSyncRequest {
            container_id: container.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 30,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"))
        .into_inner();
    (
        out.exit_code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// CRI Exec of `true`, the URL over WebSocket v5, until the Status object
/// arrives on the error channel; it must say `Success`.
async fn streaming_exec_true(cri: &mut Cri, container: &str) -> Duration {
    let start = Instant::now();
    let url = cri
        .exec(ExecRequest {
            container_id: container.into(),
            cmd: vec!["true".into()],
            tty: false,
            stdin: false,
            stdout: true,
            stderr: true,
        })
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let mut ws = connect(&url, "v5.channel.k8s.io")
        .await
        .expect("WebSocket upgrade of the exec URL");
    let mut status = Vec::new();
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => match b.split_first() {
                    Some((3, rest)) => {
                        status.extend_from_slice(rest);
                        if serde_json::from_slice::<serde_json::Value>(&status).is_ok() {
                            return;
                        }
                    }
                    Some((1 | 2, rest)) => {
                        panic!("`true` wrote {:?}", String::from_utf8_lossy(rest))
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None => {
                    panic!(
                        "the session ended before the status: {:?}",
                        String::from_utf8_lossy(&status)
                    )
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("WebSocket error: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("no exit status within 60 s");
    let took = start.elapsed();
    let status: serde_json::Value = serde_json::from_slice(&status).expect("status JSON");
    assert_eq!(status["status"], "Success", "{status}");
    let _ = ws.close(None).await;
    took
}

async fn port_forward_url(cri: &mut Cri, pod: &str, ports: &[i32]) -> String {
    cri.port_forward(PortForwardRequest {
        pod_sandbox_id: pod.into(),
        port: ports.to_vec(),
    })
    .await
    .expect("PortForward")
    .into_inner()
    .url
}

/// The next port-forward WebSocket message: its channel and data.
async fn ws_next(ws: &mut Ws) -> (u8, Vec<u8>) {
    let msg = tokio::time::timeout(Duration::from_secs(120), ws.next())
        .await
        .expect("no WebSocket message within 120 s")
        .expect("the WebSocket ended")
        .expect("WebSocket error");
    match msg {
        Message::Binary(b) if !b.is_empty() => (b[0], b[1..].to_vec()),
        other => panic!("unexpected {other:?}"),
    }
}

/// Checks the sink's answer: the byte count it read.
fn check_count(answer: &[u8], bytes: usize) {
    let text = String::from_utf8_lossy(answer);
    assert_eq!(
        text.trim().parse::<usize>().ok(),
        Some(bytes),
        "the sink read {text:?}, {bytes} sent"
    );
}

/// `bytes` to the sink over a WebSocket port-forward session; the time from
/// the first byte sent to the sink's count.
async fn ws_push(cri: &mut Cri, pod: &str, payload: &[u8]) -> Duration {
    let url = port_forward_url(cri, pod, &[8080]).await;
    let mut ws = connect(&url, "v4.channel.k8s.io")
        .await
        .expect("WebSocket upgrade of the port-forward URL");
    // Each channel first carries its port, little endian.
    for _ in 0..2 {
        let (channel, data) = ws_next(&mut ws).await;
        assert!(channel < 2, "channel {channel} before the port prefixes");
        assert_eq!(data, 8080u16.to_le_bytes(), "channel {channel}");
    }
    let start = Instant::now();
    for piece in payload.chunks(CHUNK) {
        let mut message = Vec::with_capacity(piece.len() + 1);
        message.push(0);
        message.extend_from_slice(piece);
        ws.send(Message::binary(message))
            .await
            .expect("WebSocket send");
    }
    let mut answer = Vec::new();
    while !answer.ends_with(b"\n") {
        let (channel, data) = ws_next(&mut ws).await;
        assert_eq!(channel, 0, "error: {}", String::from_utf8_lossy(&data));
        answer.extend_from_slice(&data);
    }
    let took = start.elapsed();
    check_count(&answer, payload.len());
    let _ = ws.close(None).await;
    took
}

/// The same over SPDY/3.1: one session, one forwarded connection; the
/// client half-closes after the payload.
async fn spdy_push(cri: &mut Cri, pod: &str, payload: &[u8], request: usize) -> Duration {
    let url = port_forward_url(cri, pod, &[]).await;
    let client = SpdyClient::connect(&url).await;
    let (id, mut data, mut error) = client.forward(8080, request).await;
    let start = Instant::now();
    for piece in payload.chunks(CHUNK) {
        client.send(id, piece, false).await;
    }
    client.send(id, b"", true).await;
    let answer = read_to_end(&mut data).await;
    let took = start.elapsed();
    let error = read_to_end(&mut error).await;
    assert!(error.is_empty(), "{}", String::from_utf8_lossy(&error));
    check_count(&answer, payload.len());
    took
}

fn main() {
    let runs = env_or("RUNS", 20);
    let pf_runs = env_or("PF_RUNS", runs);
    let pf_mib = env_or("PF_MIB", 8);
    assert!(
        runs > 0 && pf_runs > 0 && pf_mib > 0,
        "RUNS, PF_RUNS, PF_MIB > 0"
    );
    let bytes = pf_mib * 1024 * 1024;
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let daemon = Daemon::start_with_busybox().await;
        let mut cri = daemon.runtime().await;
        let logs = tempfile::tempdir().expect("log directory");
        let pod_config = cri::pod_config("sbench", logs.path());
        let pod = cri::run_pod(&mut cri, &daemon, &pod_config).await;
        // Every connection to 8080 gets a sink that reads exactly `bytes`
        // and answers with how many it read.
        let server = format!(
            "printf '#!/bin/sh\\nhead -c {bytes} | wc -c\\n' > /tmp/sink && chmod +x /tmp/sink && \
             exec nc -llllllllllllllll -p 8080 -e /tmp/sink"
        );
        let container = cri::create_running(
            &mut cri,
            &pod,
            cri::busybox("sink", &["sh", "-c", &server], "sink.log"),
            &pod_config,
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !exec_sync(&mut cri, &container, &["netstat", "-tln"])
            .await
            .1
            .contains(":8080 ")
        {
            assert!(Instant::now() < deadline, "nc never listened on 8080");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let mut exec_sync_ms = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            let (code, _) = exec_sync(&mut cri, &container, &["true"]).await;
            exec_sync_ms.push(ms(start.elapsed()));
            assert_eq!(code, 0, "ExecSync `true` exited {code}");
        }
        let mut stream_ms = Vec::new();
        for _ in 0..runs {
            stream_ms.push(ms(streaming_exec_true(&mut cri, &container).await));
        }
        let payload: Vec<u8> = (0..bytes).map(|n| (n % 251) as u8).collect();
        let mib = bytes as f64 / (1024.0 * 1024.0);
        let mut ws_rate = Vec::new();
        for _ in 0..pf_runs {
            let took = ws_push(&mut cri, &pod, &payload).await;
            ws_rate.push(mib / took.as_secs_f64());
        }
        let mut spdy_rate = Vec::new();
        for i in 0..pf_runs {
            let took = spdy_push(&mut cri, &pod, &payload, i).await;
            spdy_rate.push(mib / took.as_secs_f64());
        }
        // The baseline without the streaming path: the same sink fed from
        // inside the guest over its loopback TCP. The whole ExecSync call
        // is timed, its exec cost included (the ExecSync `true` figure).
        let feed = format!("head -c {bytes} /dev/zero | nc 127.0.0.1 8080");
        let mut guest_rate = Vec::new();
        for _ in 0..pf_runs {
            let start = Instant::now();
            let (code, answer) = exec_sync(&mut cri, &container, &["sh", "-c", &feed]).await;
            let took = start.elapsed();
            assert_eq!(code, 0, "the guest feeder exited {code}: {answer:?}");
            check_count(answer.as_bytes(), bytes);
            guest_rate.push(mib / took.as_secs_f64());
        }
        cri::remove_pod(&mut cri, &pod).await;

        for (what, figures) in [
            ("ExecSync `true`", &mut exec_sync_ms),
            (
                "streaming exec `true` (CRI Exec + WebSocket v5 to exit status)",
                &mut stream_ms,
            ),
        ] {
            let (median, min, max) = summary(figures);
            println!(
                "{what} over {runs} runs: median {median:.1} ms, min {min:.1} ms, max {max:.1} ms"
            );
        }
        for (what, figures) in [
            (
                "port-forward over WebSocket (v4.channel.k8s.io)",
                &mut ws_rate,
            ),
            (
                "port-forward over SPDY/3.1 (portforward.k8s.io)",
                &mut spdy_rate,
            ),
            (
                "baseline, no port-forward: fed inside the guest (ExecSync of head | nc 127.0.0.1)",
                &mut guest_rate,
            ),
        ] {
            let (median, min, max) = summary(figures);
            println!(
                "{pf_mib} MiB to a sink in the pod, {what}, {pf_runs} runs: \
                 median {median:.1} MiB/s, min {min:.1} MiB/s, max {max:.1} MiB/s"
            );
        }
    });
}
