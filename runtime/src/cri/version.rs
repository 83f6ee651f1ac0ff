//! Version, Status, RuntimeConfig.

use k8s_cri::v1::{
    CgroupDriver, LinuxRuntimeConfiguration, RuntimeCondition, RuntimeConfigResponse,
    RuntimeStatus, StatusResponse, VersionResponse,
};

use super::{CriError, CriService, CRI_API_VERSION};

impl CriService {
    pub(super) fn version(&self) -> Result<VersionResponse, CriError> {
        Ok(VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "carapace".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        })
    }

    /// RuntimeReady: the VM driver and the guest artifacts are present.
    /// NetworkReady: a usable CNI configuration exists (kubelet starts no
    /// pod but host-network ones while it is false).
    pub(super) fn status(&self, verbose: bool) -> Result<StatusResponse, CriError> {
        let problems = self.sandboxes.runtime_problems();
        let runtime = RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status: problems.is_empty(),
            reason: if problems.is_empty() {
                String::new()
            } else {
                "GuestArtifactsMissing".into()
            },
            message: problems.join("; "),
        };
        let network = match self.sandboxes.network_status() {
            Ok(()) => RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            Err(e) => RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: "NetworkPluginNotReady".into(),
                message: format!("cni config uninitialized: {e}"),
            },
        };
        let mut info = std::collections::HashMap::new();
        if verbose {
            info.insert("vmDriver".into(), self.sandboxes.driver().describe());
        }
        Ok(StatusResponse {
            status: Some(RuntimeStatus {
                conditions: vec![runtime, network],
            }),
            info,
            runtime_handlers: Vec::new(),
            features: None,
        })
    }

    pub(super) fn runtime_config(&self) -> Result<RuntimeConfigResponse, CriError> {
        Ok(RuntimeConfigResponse {
            linux: Some(LinuxRuntimeConfiguration {
                cgroup_driver: CgroupDriver::Cgroupfs as i32,
            }),
        })
    }
}
