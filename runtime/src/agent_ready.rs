//! Waiting for a new VM's agent: it announces itself by connecting to the
//! host's readiness port (`READY <version>\n`, see
//! `carapace_agent_api::READY_VSOCK_PORT`). With the hybrid-vsock convention
//! a guest connection to host port P arrives at the unix socket
//! `<vsock socket>_P`, which [`ReadyListener`] binds before the VM starts.
//!
//! Waiting for the announcement, rather than polling the guest with
//! connection attempts, matters: vhost-device-vsock can stop answering host
//! connections that arrive while the guest's vsock driver is initialising.

use std::path::{Path, PathBuf};
use std::time::Duration;

use carapace_agent_api::READY_VSOCK_PORT;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

/// The longest announcement line accepted.
const MAX_LINE: usize = 64;

/// Errors while waiting for the announcement.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("cannot listen for the agent's announcement on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent did not announce itself within {0:?}")]
    Timeout(Duration),
    #[error("the VM exited before its agent was ready")]
    VmExited,
    #[error("bad announcement from the guest: {0}")]
    BadAnnouncement(String),
}

/// A unix listener for the agent's readiness announcement. The socket file
/// is removed when the listener is dropped.
#[derive(Debug)]
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    /// Binds `<vsock_socket>_<READY_VSOCK_PORT>`.
    pub fn bind(vsock_socket: &Path) -> Result<Self, ReadyError> {
        let mut path = vsock_socket.as_os_str().to_owned();
        path.push(format!("_{READY_VSOCK_PORT}"));
        let path = PathBuf::from(path);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| ReadyError::Bind {
            path: path.clone(),
            source,
        })?;
        Ok(Self { listener, path })
    }

    /// Waits for the announcement and returns the agent's version. Gives up
    /// early when `vm_alive` says the VM is gone (checked every 50 ms).
    pub async fn wait(
        &self,
        timeout: Duration,
        vm_alive: impl Fn() -> bool,
    ) -> Result<String, ReadyError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let accept = tokio::time::timeout(Duration::from_millis(50), self.listener.accept());
            match accept.await {
                Ok(Ok((mut stream, _))) => {
                    let mut line = Vec::with_capacity(MAX_LINE);
                    let mut limited = (&mut stream).take(MAX_LINE as u64);
                    let read = limited.read_to_end(&mut line);
                    match tokio::time::timeout(Duration::from_secs(2), read).await {
                        // A connection that says nothing usable is not the
                        // agent; keep waiting for the real one.
                        Ok(Ok(_)) => match parse_announcement(&line) {
                            Ok(version) => return Ok(version),
                            Err(e) => tracing::warn!("ignoring a connection: {e}"),
                        },
                        Ok(Err(e)) => tracing::debug!("announcement read failed: {e}"),
                        Err(_) => tracing::debug!("announcement read timed out"),
                    }
                }
                Ok(Err(e)) => tracing::debug!("announcement accept failed: {e}"),
                Err(_) => {}
            }
            if !vm_alive() {
                return Err(ReadyError::VmExited);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ReadyError::Timeout(timeout));
            }
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn parse_announcement(line: &[u8]) -> Result<String, ReadyError> {
    let text =
        std::str::from_utf8(line).map_err(|_| ReadyError::BadAnnouncement("not text".into()))?;
    let version = text
        .strip_suffix('\n')
        .and_then(|t| t.strip_prefix("READY "))
        .ok_or_else(|| ReadyError::BadAnnouncement(format!("{text:?}")))?;
    if version.is_empty() || version.len() > 32 || version.chars().any(char::is_control) {
        return Err(ReadyError::BadAnnouncement(format!("{text:?}")));
    }
    Ok(version.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    #[test]
    fn parses_announcements() {
        assert_eq!(parse_announcement(b"READY 0.1.0\n").unwrap(), "0.1.0");
        for bad in [
            &b"READY 0.1.0"[..],
            b"HELLO\n",
            b"READY \n",
            b"READY a\x07b\n",
            &[0xff, b'\n'],
        ] {
            assert!(parse_announcement(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn waits_for_the_announcement_and_skips_junk() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        let ready = ReadyListener::bind(&vsock).unwrap();
        let path = dir.path().join("vsock.sock_1025");
        assert!(path.exists());
        tokio::spawn(async move {
            // A silent peer and a chatty one first, then the agent.
            drop(UnixStream::connect(&path).await.unwrap());
            let mut junk = UnixStream::connect(&path).await.unwrap();
            junk.write_all(&[b'x'; 200]).await.unwrap();
            drop(junk);
            let mut s = UnixStream::connect(&path).await.unwrap();
            s.write_all(b"READY 9.9.9\n").await.unwrap();
        });
        let version = ready.wait(Duration::from_secs(5), || true).await.unwrap();
        assert_eq!(version, "9.9.9");
        drop(ready);
        assert!(!dir.path().join("vsock.sock_1025").exists());
    }

    #[tokio::test]
    async fn gives_up_when_the_vm_dies_or_time_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let ready = ReadyListener::bind(&dir.path().join("v.sock")).unwrap();
        assert!(matches!(
            ready.wait(Duration::from_secs(5), || false).await,
            Err(ReadyError::VmExited)
        ));
        assert!(matches!(
            ready.wait(Duration::from_millis(100), || true).await,
            Err(ReadyError::Timeout(_))
        ));
    }
}
