//! The agent as an ordinary process on a unix socket: it answers Health, and
//! nothing a peer sends (garbage, truncated HTTP/2, oversized frames, abrupt
//! disconnects) makes it panic or stop serving.

mod common;

use std::path::Path;
use std::time::Duration;

use carapace_agent_api::v1::HealthRequest;
use common::Agent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

async fn health(agent: &Agent) -> carapace_agent_api::v1::HealthResponse {
    agent
        .client()
        .await
        .health(HealthRequest {
            api_version: carapace_agent_api::API_VERSION,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Sends `bytes`, reads whatever comes back for a moment, and hangs up.
async fn poke(socket: &Path, bytes: &[u8]) {
    let mut s = UnixStream::connect(socket).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(100), s.read(&mut sink)).await;
}

#[tokio::test]
async fn health_reports_version_and_api_range() {
    let agent = Agent::spawn();
    let h = health(&agent).await;
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h.api_version, carapace_agent_api::API_VERSION);
    assert_eq!(h.min_api_version, carapace_agent_api::MIN_API_VERSION);
    assert!(h.min_api_version <= h.api_version);
}

#[tokio::test]
async fn hostile_peers_do_not_stop_the_agent() {
    let mut agent = Agent::spawn();
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut oversized_frame = PREFACE.to_vec();
    // A DATA frame header announcing 16 MiB on stream 1, then silence.
    oversized_frame.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 0x00, 0, 0, 0, 1]);
    let mut bogus_headers = PREFACE.to_vec();
    // SETTINGS then a HEADERS frame whose HPACK block is garbage.
    bogus_headers.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    bogus_headers.extend_from_slice(&[0, 0, 8, 1, 5, 0, 0, 0, 1]);
    bogus_headers.extend_from_slice(&[0xff; 8]);
    let random: Vec<u8> = (0u32..65536)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();

    let attacks: Vec<&[u8]> = vec![
        b"",
        b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n",
        &PREFACE[..10],
        PREFACE,
        &oversized_frame,
        &bogus_headers,
        &random,
    ];
    for attack in attacks {
        poke(&agent.socket, attack).await;
        agent.assert_alive();
    }
    // Many connections opened and dropped at once.
    let mut open = Vec::new();
    for _ in 0..200 {
        open.push(UnixStream::connect(&agent.socket).await.unwrap());
    }
    drop(open);

    let h = health(&agent).await;
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    agent.assert_alive();
}
