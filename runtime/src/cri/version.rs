//! Version, Status, RuntimeConfig, UpdateRuntimeConfig.

use k8s_cri::v1::{
    CgroupDriver, LinuxRuntimeConfiguration, RuntimeCondition, RuntimeConfigResponse,
    RuntimeFeatures, RuntimeStatus, StatusResponse, UpdateRuntimeConfigRequest,
    UpdateRuntimeConfigResponse, VersionResponse,
};

use super::runtime_config::UpdateError;

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
            // crictl shows a value only if it is a JSON object (newer versions print null
            // for anything else).
            let ours = serde_json::json!({
                "vmDriver": self.sandboxes.driver().describe(),
                "podCIDR": self.runtime_config.pod_cidr(),
            });
            info.insert("carapace".into(), ours.to_string());
        }
        Ok(StatusResponse {
            status: Some(RuntimeStatus {
                conditions: vec![runtime, network],
            }),
            info,
            runtime_handlers: Vec::new(),
            // SupplementalGroupsPolicy (Strict) and ContainerStatus.user.
            features: Some(RuntimeFeatures {
                supplemental_groups_policy: true,
            }),
        })
    }

    /// Keeps the node's pod CIDRs (the only field of the runtime configuration).
    pub(super) fn update_runtime_config(
        &self,
        request: UpdateRuntimeConfigRequest,
    ) -> Result<UpdateRuntimeConfigResponse, CriError> {
        let network = request
            .runtime_config
            .and_then(|c| c.network_config)
            .ok_or_else(|| {
                CriError::InvalidArgument("runtime_config.network_config is required".into())
            })?;
        match self.runtime_config.set_pod_cidr(&network.pod_cidr) {
            Ok(()) => Ok(UpdateRuntimeConfigResponse {}),
            Err(e @ UpdateError::Invalid(..)) => Err(CriError::InvalidArgument(e.to_string())),
            Err(e @ UpdateError::State(_)) => Err(CriError::Internal(e.to_string())),
        }
    }

    pub(super) fn runtime_config(&self) -> Result<RuntimeConfigResponse, CriError> {
        Ok(RuntimeConfigResponse {
            linux: Some(LinuxRuntimeConfiguration {
                cgroup_driver: CgroupDriver::Cgroupfs as i32,
            }),
        })
    }
}
