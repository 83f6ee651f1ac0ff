//! PodSandboxStatus.

use std::collections::HashMap;

use k8s_cri::v1::{
    PodSandboxMetadata, PodSandboxNetworkStatus, PodSandboxState, PodSandboxStatus,
    PodSandboxStatusResponse,
};

use super::sandbox_run::require_id;
use super::{CriError, CriService};
use crate::sandbox::{now_ns, SandboxRecord, SandboxState};

impl CriService {
    pub(super) async fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<PodSandboxStatusResponse, CriError> {
        require_id(id)?;
        let sandbox = self
            .sandboxes
            .get(id)
            .ok_or_else(|| CriError::NotFound(format!("pod sandbox {id} not found")))?;
        let mut sandbox = sandbox.lock().await;
        self.sandboxes.refresh(&mut sandbox);
        let record = &sandbox.record;
        let mut info = HashMap::new();
        if verbose {
            info.insert("info".into(), verbose_info(record));
        }
        Ok(PodSandboxStatusResponse {
            status: Some(PodSandboxStatus {
                id: record.id.clone(),
                metadata: Some(cri_metadata(record)),
                state: cri_state(record.state) as i32,
                created_at: record.created_at_ns,
                network: Some(network_status(record)),
                linux: None,
                labels: record.labels.clone().into_iter().collect(),
                annotations: record.annotations.clone().into_iter().collect(),
                runtime_handler: record.runtime_handler.clone(),
            }),
            info,
            containers_statuses: Vec::new(),
            timestamp: now_ns(),
        })
    }
}

pub(super) fn cri_metadata(record: &SandboxRecord) -> PodSandboxMetadata {
    PodSandboxMetadata {
        name: record.meta.name.clone(),
        uid: record.meta.uid.clone(),
        namespace: record.meta.namespace.clone(),
        attempt: record.meta.attempt,
    }
}

pub(super) fn cri_state(state: SandboxState) -> PodSandboxState {
    match state {
        SandboxState::Ready => PodSandboxState::SandboxReady,
        SandboxState::NotReady => PodSandboxState::SandboxNotready,
    }
}

/// The verbose `info` map entry: a JSON document for operators (crictl
/// inspectp), with the VM's processes, size and why it is not ready.
fn verbose_info(record: &SandboxRecord) -> String {
    serde_json::json!({
        "vm": {
            "monitor": record.vm.as_ref().map(|vm| vm.monitor.name.clone()),
            "vcpus": record.size.vcpus,
            "memMiB": record.size.mem_mib,
            "running": record.vm.as_ref().is_some_and(|vm| vm.is_running()),
            "monitorPid": record.vm.as_ref().map(|vm| vm.monitor.pid),
            "consoleLog": record.run_dir.join("console.log"),
        },
        "reason": record.reason,
    })
    .to_string()
}

/// The pod's IPs from its CNI result (eth0's first, IPv4 before IPv6 as
/// kubelet expects the primary first); empty for a pod without a network.
fn network_status(record: &crate::sandbox::SandboxRecord) -> PodSandboxNetworkStatus {
    let mut ips: Vec<String> = record
        .network
        .as_ref()
        .map(|n| {
            n.result
                .ips
                .iter()
                .filter_map(|ip| ip.address.split('/').next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ips.sort_by_key(|ip| ip.contains(':'));
    let mut ips = ips.into_iter();
    PodSandboxNetworkStatus {
        ip: ips.next().unwrap_or_default(),
        additional_ips: ips.map(|ip| k8s_cri::v1::PodIp { ip }).collect(),
    }
}
