//! Tells the host that the agent serves: one connection to the host's
//! readiness port carrying `READY <version>\n`.

use std::time::{Duration, Instant};

use carapace_agent_api::READY_VSOCK_PORT;
use tokio::io::AsyncWriteExt;
use tokio_vsock::{VsockAddr, VsockStream, VMADDR_CID_HOST};

use crate::listen::ListenAddr;

/// How long the host may take to accept the announcement.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Announces readiness, then logs the agent's one start-up line: listening on `addr`, and
/// how the announcement went. Failures are logged, never fatal (a host that does not
/// listen, e.g. a daemon restarting, simply connects later).
pub async fn ready(addr: ListenAddr, started: Instant) {
    let announce = async {
        let mut stream =
            VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, READY_VSOCK_PORT)).await?;
        stream
            .write_all(format!("READY {}\n", env!("CARGO_PKG_VERSION")).as_bytes())
            .await?;
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok::<_, std::io::Error>(())
    };
    let outcome = match tokio::time::timeout(ANNOUNCE_TIMEOUT, announce).await {
        Ok(Ok(())) => format!(
            "announced to the host {} ms after start",
            started.elapsed().as_millis()
        ),
        Ok(Err(e)) => format!("could not announce readiness to the host: {e}"),
        Err(_) => "announcing readiness to the host timed out".to_owned(),
    };
    tracing::info!(
        "carapace-agent {} listening on {addr}; {outcome}",
        env!("CARGO_PKG_VERSION")
    );
}
