//! Exec, Attach and PortForward: validated here, then answered with a URL
//! on the streaming server, where the stream itself is served.

use k8s_cri::v1::{
    AttachRequest, AttachResponse, ExecRequest, ExecResponse, PortForwardRequest,
    PortForwardResponse,
};

use super::{CriError, CriService};
use crate::streaming::{StreamRequest, StreamingServer, TokenError};

/// CRI's rules for the streams of Exec and Attach.
fn check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Result<(), CriError> {
    if !(stdin || stdout || stderr) {
        return Err(CriError::InvalidArgument(
            "one of stdin, stdout and stderr must be requested".into(),
        ));
    }
    if tty && stderr {
        return Err(CriError::InvalidArgument(
            "tty and stderr cannot both be requested (a terminal has one output stream)".into(),
        ));
    }
    Ok(())
}

impl CriService {
    fn streaming_server(&self) -> Result<&StreamingServer, CriError> {
        self.streaming
            .as_deref()
            .ok_or_else(|| CriError::Unavailable("the streaming server is not running".into()))
    }

    fn issue(&self, request: StreamRequest) -> Result<String, CriError> {
        self.streaming_server()?
            .issue(request)
            .map_err(|e| match e {
                TokenError::Full => CriError::Unavailable(e.to_string()),
                _ => CriError::Internal(e.to_string()),
            })
    }

    pub(super) async fn exec(&self, request: ExecRequest) -> Result<ExecResponse, CriError> {
        if request.cmd.is_empty() {
            return Err(CriError::InvalidArgument("exec cmd is empty".into()));
        }
        check_streams(request.stdin, request.stdout, request.stderr, request.tty)?;
        self.containers.check_running(&request.container_id).await?;
        let url = self.issue(StreamRequest::Exec(request))?;
        Ok(ExecResponse { url })
    }

    pub(super) async fn attach(&self, request: AttachRequest) -> Result<AttachResponse, CriError> {
        check_streams(request.stdin, request.stdout, request.stderr, request.tty)?;
        self.containers.check_running(&request.container_id).await?;
        let url = self.issue(StreamRequest::Attach(request))?;
        Ok(AttachResponse { url })
    }

    /// Port-forward: the pod must be ready and its agent serve port-forward
    /// (each connection then goes over vsock to the agent, which connects to
    /// the port inside the VM).
    pub(super) async fn port_forward(
        &self,
        request: PortForwardRequest,
    ) -> Result<PortForwardResponse, CriError> {
        if let Some(bad) = request.port.iter().find(|&&p| !(1..=65535).contains(&p)) {
            return Err(CriError::InvalidArgument(format!(
                "port {bad} is not a TCP port"
            )));
        }
        self.sandboxes
            .port_forward_socket(&request.pod_sandbox_id)
            .await?;
        let url = self.issue(StreamRequest::PortForward(request))?;
        Ok(PortForwardResponse { url })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_flags_follow_cri() {
        assert!(check_streams(false, true, true, false).is_ok());
        assert!(check_streams(true, true, false, true).is_ok());
        assert!(check_streams(false, false, false, false).is_err());
        assert!(check_streams(true, true, true, true).is_err());
    }
}
