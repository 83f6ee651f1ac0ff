//! Tells the host that the agent serves: one connection to the host's
//! readiness port carrying `READY <version>\n`.

use std::time::Duration;

use carapace_agent_api::READY_VSOCK_PORT;
use tokio::io::AsyncWriteExt;
use tokio_vsock::{VsockAddr, VsockStream, VMADDR_CID_HOST};

/// How long the host may take to accept the announcement.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Announces readiness; failures are logged, never fatal (a host that does
/// not listen, e.g. a daemon restarting, simply connects later).
pub async fn ready() {
    let announce = async {
        let mut stream =
            VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, READY_VSOCK_PORT)).await?;
        stream
            .write_all(format!("READY {}\n", env!("CARGO_PKG_VERSION")).as_bytes())
            .await?;
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(ANNOUNCE_TIMEOUT, announce).await {
        Ok(Ok(())) => tracing::debug!("announced readiness to the host"),
        Ok(Err(e)) => tracing::info!("could not announce readiness to the host: {e}"),
        Err(_) => tracing::info!("announcing readiness to the host timed out"),
    }
}
