//! The agent as an ordinary process on a unix socket: it answers Health, and
//! nothing a peer sends (garbage, truncated HTTP/2, oversized frames, abrupt
//! disconnects) makes it panic or stop serving.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use carapace_agent_api::v1::agent_client::AgentClient;
use carapace_agent_api::v1::HealthRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::Endpoint;

struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_carapace-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The socket file appears at bind(), a moment before listen().
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "agent does not accept connections"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent {
            child,
            socket,
            _dir: dir,
        }
    }

    fn assert_alive(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "the agent exited");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn health(socket: &Path) -> carapace_agent_api::v1::HealthResponse {
    let socket = socket.to_owned();
    let channel = Endpoint::from_static("http://agent")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .unwrap();
    AgentClient::new(channel)
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
    let agent = Agent::start();
    let h = health(&agent.socket).await;
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h.api_version, carapace_agent_api::API_VERSION);
    assert_eq!(h.min_api_version, carapace_agent_api::MIN_API_VERSION);
    assert!(h.min_api_version <= h.api_version);
}

#[tokio::test]
async fn hostile_peers_do_not_stop_the_agent() {
    let mut agent = Agent::start();
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

    let h = health(&agent.socket).await;
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    agent.assert_alive();
}
