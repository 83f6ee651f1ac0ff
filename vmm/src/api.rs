//! The control API: a unix socket; each connection sends one JSON request line such as
//! `{"action": "status"}` and gets one JSON line back. Actions: `status`, `metrics`,
//! `pause`, `resume`, `shutdown`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// Longest request we read.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// A request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiRequest {
    /// VM state, vCPU count, uptime.
    Status,
    /// Counters.
    Metrics,
    /// Pause all vCPUs.
    Pause,
    /// Resume them.
    Resume,
    /// Stop the VM and exit.
    Shutdown,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    action: ApiRequest,
}

/// The listening socket; removed when dropped.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiServer {
    /// Listens on `path`.
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        if let Err(e) = listener.set_nonblocking(true) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Accepts one client and reads its request.
    pub fn accept(&self) -> Option<(Result<ApiRequest, String>, UnixStream)> {
        let (stream, _) = self.listener.accept().ok()?;
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
        let mut line = String::new();
        let read = BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line);
        let req = match read {
            Ok(_) => parse_request(&line),
            Err(e) => Err(format!("cannot read request: {e}")),
        };
        Some((req, stream))
    }

    /// Sends the answer and closes the connection.
    pub fn respond(mut conn: UnixStream, value: &Value) {
        let mut text = value.to_string();
        text.push('\n');
        let _ = conn.write_all(text.as_bytes());
    }
}

impl AsRawFd for ApiServer {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<ApiRequest, String> {
    serde_json::from_str::<RawRequest>(line.trim())
        .map(|r| r.action)
        .map_err(|e| format!("invalid request: {e}"))
}

/// Sends `request` to the API at `path` and returns the answer (a client for tests and
/// tools).
pub fn call(path: &Path, request: &str) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    s.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_request(r#"{"action":"pause"}"#),
            Ok(ApiRequest::Pause)
        );
        assert_eq!(
            parse_request(" {\"action\": \"metrics\"}\n"),
            Ok(ApiRequest::Metrics)
        );
        assert!(parse_request(r#"{"action":"reboot"}"#).is_err());
        assert!(parse_request(r#"{"action":"status","x":1}"#).is_err());
        assert!(parse_request("status").is_err());
    }
}
