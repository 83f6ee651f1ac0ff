//! Where the agent listens: vsock inside the guest, a unix socket for tests.

use std::path::PathBuf;
use std::str::FromStr;

/// A listening address for the agent API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A vsock port on any local CID (the guest's).
    Vsock(u32),
    /// A unix socket path (host-side testing and development).
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(port) = s.strip_prefix("vsock:") {
            let port = port
                .parse::<u32>()
                .map_err(|_| format!("invalid vsock port {port:?}"))?;
            Ok(ListenAddr::Vsock(port))
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("empty unix socket path".to_owned());
            }
            Ok(ListenAddr::Unix(path.into()))
        } else {
            Err(format!(
                "invalid listen address {s:?}: expected vsock:<port> or unix:<path>"
            ))
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Vsock(port) => write!(f, "vsock port {port}"),
            ListenAddr::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}
