//! The container RPCs: CreateContainer, StartContainer, StopContainer,
//! RemoveContainer, ContainerStatus, ListContainers, ExecSync,
//! UpdateContainerResources, ReopenContainerLog.

use std::collections::HashMap;
use std::time::Duration;

use k8s_cri::v1::{
    Container, ContainerFilter, ContainerMetadata, ContainerState as CriState, ContainerStatus,
    ContainerStatusResponse, ContainerUser, CreateContainerRequest, ExecSyncResponse, ImageSpec,
    LinuxContainerResources, LinuxContainerUser, ListContainersResponse, Mount,
};

use super::{CriError, CriService};
use crate::container::{ContainerError, ContainerRecord, ContainerState, NewContainer};
use crate::sandbox::now_ns;

impl From<ContainerError> for CriError {
    fn from(e: ContainerError) -> Self {
        let message = e.to_string();
        match e {
            ContainerError::NotFound(_) => CriError::NotFound(message),
            ContainerError::InvalidArgument(_) | ContainerError::Spec(_) => {
                CriError::InvalidArgument(message)
            }
            ContainerError::NameReserved { .. } => CriError::AlreadyExists(message),
            ContainerError::FailedPrecondition(_) => CriError::FailedPrecondition(message),
            ContainerError::Timeout(_) => CriError::DeadlineExceeded(message),
            ContainerError::Sandbox(e) => e.into(),
            ContainerError::Agent(status) => match status.code() {
                tonic::Code::InvalidArgument => CriError::InvalidArgument(message),
                tonic::Code::NotFound => CriError::NotFound(message),
                tonic::Code::FailedPrecondition => CriError::FailedPrecondition(message),
                tonic::Code::Unimplemented => CriError::InvalidArgument(message),
                _ => CriError::Internal(message),
            },
            ContainerError::Volume(_) => CriError::InvalidArgument(message),
            ContainerError::Rootfs(_)
            | ContainerError::Log(_)
            | ContainerError::State(_)
            | ContainerError::Io { .. } => CriError::Internal(message),
        }
    }
}

impl CriService {
    pub(super) async fn create_container(
        &self,
        request: CreateContainerRequest,
    ) -> Result<String, CriError> {
        let config = request.config.ok_or_else(|| {
            CriError::InvalidArgument("CreateContainer: config is required".into())
        })?;
        let new = NewContainer {
            sandbox_id: request.pod_sandbox_id,
            config,
            pod_sysctls: request
                .sandbox_config
                .and_then(|c| c.linux)
                .map(|l| l.sysctls.into_iter().collect())
                .unwrap_or_default(),
        };
        let containers = self.containers.clone();
        // Its own task, as RunPodSandbox: a caller that stops waiting
        // never leaves a container half made.
        let created = tokio::spawn(async move { containers.create(new).await })
            .await
            .map_err(|e| CriError::Internal(format!("CreateContainer: {e}")))?;
        Ok(created?)
    }

    pub(super) async fn start_container(&self, id: &str) -> Result<(), CriError> {
        Ok(self.containers.start(id).await?)
    }

    pub(super) async fn stop_container(&self, id: &str, timeout_secs: i64) -> Result<(), CriError> {
        let timeout = Duration::from_secs(u64::try_from(timeout_secs).unwrap_or(0));
        Ok(self.containers.stop(id, timeout).await?)
    }

    pub(super) async fn remove_container(&self, id: &str) -> Result<(), CriError> {
        Ok(self.containers.remove(id).await?)
    }

    pub(super) async fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<ContainerStatusResponse, CriError> {
        let record = self.containers.record(id).await?;
        let mut info = HashMap::new();
        if verbose {
            info.insert(
                "info".into(),
                serde_json::json!({
                    "sandboxID": record.sandbox_id,
                    "layerDir": record.layer_dir,
                    "shareDir": record.share_dir,
                    "process": serde_json::from_str::<serde_json::Value>(&record.process_json).ok(),
                })
                .to_string(),
            );
        }
        Ok(ContainerStatusResponse {
            status: Some(cri_status(&record)),
            info,
        })
    }

    pub(super) async fn list_containers(
        &self,
        filter: Option<ContainerFilter>,
    ) -> Result<ListContainersResponse, CriError> {
        let mut containers: Vec<Container> = self
            .containers
            .list()
            .await
            .iter()
            .filter(|r| matches(r, filter.as_ref()))
            .map(cri_container)
            .collect();
        containers.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(ListContainersResponse { containers })
    }

    pub(super) async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout_secs: i64,
    ) -> Result<ExecSyncResponse, CriError> {
        let timeout = Duration::from_secs(u64::try_from(timeout_secs).unwrap_or(0));
        let out = self.containers.exec_sync(id, cmd, timeout).await?;
        Ok(ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        })
    }

    pub(super) async fn update_container_resources(
        &self,
        id: &str,
        linux: Option<LinuxContainerResources>,
    ) -> Result<(), CriError> {
        let Some(r) = linux else {
            // Nothing for Linux to change (e.g. only Windows resources).
            return Ok(());
        };
        self.containers
            .update_resources(id, oci_resources(&r).to_string())
            .await?;
        Ok(())
    }

    pub(super) async fn reopen_container_log(&self, id: &str) -> Result<(), CriError> {
        Ok(self.containers.reopen_log(id).await?)
    }
}

/// CRI resources as an OCI `linux.resources` object, with only the values
/// kubelet set (zero means "not set" in CRI).
pub(super) fn oci_resources(r: &LinuxContainerResources) -> serde_json::Value {
    let mut cpu = serde_json::Map::new();
    if r.cpu_shares > 0 {
        cpu.insert("shares".into(), r.cpu_shares.into());
    }
    if r.cpu_quota != 0 {
        cpu.insert("quota".into(), r.cpu_quota.into());
    }
    if r.cpu_period > 0 {
        cpu.insert("period".into(), r.cpu_period.into());
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), r.cpuset_cpus.clone().into());
    }
    if !r.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), r.cpuset_mems.clone().into());
    }
    let mut memory = serde_json::Map::new();
    if r.memory_limit_in_bytes > 0 {
        memory.insert("limit".into(), r.memory_limit_in_bytes.into());
    }
    if r.memory_swap_limit_in_bytes > 0 {
        memory.insert("swap".into(), r.memory_swap_limit_in_bytes.into());
    }
    let mut out = serde_json::Map::new();
    if !cpu.is_empty() {
        out.insert("cpu".into(), cpu.into());
    }
    if !memory.is_empty() {
        out.insert("memory".into(), memory.into());
    }
    if !r.hugepage_limits.is_empty() {
        let limits: Vec<_> = r
            .hugepage_limits
            .iter()
            .map(|h| serde_json::json!({"pageSize": h.page_size, "limit": h.limit}))
            .collect();
        out.insert("hugepageLimits".into(), limits.into());
    }
    if !r.unified.is_empty() {
        out.insert(
            "unified".into(),
            serde_json::to_value(&r.unified).unwrap_or_default(),
        );
    }
    out.into()
}

/// CRI filter semantics: every given criterion must hold; ids match by
/// prefix (as containerd's truncated ids); labels must all be equal.
fn matches(r: &ContainerRecord, filter: Option<&ContainerFilter>) -> bool {
    let Some(f) = filter else { return true };
    if !f.id.is_empty() && !r.id.starts_with(&f.id) {
        return false;
    }
    if !f.pod_sandbox_id.is_empty() && !r.sandbox_id.starts_with(&f.pod_sandbox_id) {
        return false;
    }
    if let Some(state) = &f.state {
        if cri_state(r.state) as i32 != state.state {
            return false;
        }
    }
    f.label_selector
        .iter()
        .all(|(k, v)| r.labels.get(k) == Some(v))
}

pub(super) fn cri_state(state: ContainerState) -> CriState {
    match state {
        ContainerState::Created => CriState::ContainerCreated,
        ContainerState::Running => CriState::ContainerRunning,
        ContainerState::Exited => CriState::ContainerExited,
    }
}

fn cri_metadata(r: &ContainerRecord) -> ContainerMetadata {
    ContainerMetadata {
        name: r.name.clone(),
        attempt: r.attempt,
    }
}

fn image_spec(r: &ContainerRecord) -> ImageSpec {
    ImageSpec {
        image: r.image.clone(),
        annotations: Default::default(),
        ..Default::default()
    }
}

fn cri_container(r: &ContainerRecord) -> Container {
    Container {
        id: r.id.clone(),
        pod_sandbox_id: r.sandbox_id.clone(),
        metadata: Some(cri_metadata(r)),
        image: Some(image_spec(r)),
        image_ref: r.image_ref.clone(),
        state: cri_state(r.state) as i32,
        created_at: r.created_at_ns,
        labels: r.labels.clone().into_iter().collect(),
        annotations: r.annotations.clone().into_iter().collect(),
        ..Default::default()
    }
}

pub(super) fn cri_status(r: &ContainerRecord) -> ContainerStatus {
    let (reason, message) = match r.state {
        // kubelet shows a container that was created but never ran and
        // whose VM went away with this reason.
        ContainerState::Exited if r.reason.is_empty() => ("Error".to_owned(), r.message.clone()),
        _ => (r.reason.clone(), r.message.clone()),
    };
    ContainerStatus {
        id: r.id.clone(),
        metadata: Some(cri_metadata(r)),
        state: cri_state(r.state) as i32,
        created_at: r.created_at_ns,
        started_at: r.started_at_ns,
        finished_at: r.finished_at_ns,
        exit_code: r.exit_code,
        image: Some(image_spec(r)),
        image_ref: r.image_ref.clone(),
        reason,
        message,
        labels: r.labels.clone().into_iter().collect(),
        annotations: r.annotations.clone().into_iter().collect(),
        mounts: r
            .mounts
            .iter()
            .map(|m| Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                selinux_relabel: m.selinux_relabel,
                propagation: m.propagation,
                ..Default::default()
            })
            .collect(),
        log_path: r
            .log_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        user: r.user.as_ref().map(|u| ContainerUser {
            linux: Some(LinuxContainerUser {
                uid: u.uid.into(),
                gid: u.gid.into(),
                supplemental_groups: u.groups.iter().map(|&g| g.into()).collect(),
            }),
        }),
        ..Default::default()
    }
}

/// Nanoseconds now, for responses that carry a timestamp.
pub(super) fn timestamp() -> i64 {
    now_ns()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::ContainerStateValue;

    fn record(id: &str, sandbox: &str, state: ContainerState) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            sandbox_id: sandbox.into(),
            name: "c".into(),
            attempt: 1,
            image: "busybox".into(),
            image_id: "sha256:1".into(),
            image_ref: "sha256:1".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            annotations: Default::default(),
            log_path: Some("/var/log/pods/x/c/1.log".into()),
            tty: false,
            stdin: false,
            stdin_once: false,
            state,
            created_at_ns: 1,
            started_at_ns: 2,
            finished_at_ns: 3,
            exit_code: 7,
            reason: "Error".into(),
            message: String::new(),
            mounts: Vec::new(),
            layer_dir: "/l".into(),
            share_dir: "/s".into(),
            process_json: "{}".into(),
            username: String::new(),
            gid_from_passwd: false,
            group: String::new(),
            strict_supplemental_groups: false,
            user: None,
            stop_signal: 15,
        }
    }

    #[test]
    fn filters_by_id_sandbox_state_and_labels() {
        let r = record("abcdef", "pod123", ContainerState::Running);
        assert!(matches(&r, None));
        let f = |id: &str, pod: &str, state: Option<CriState>, app: Option<&str>| ContainerFilter {
            id: id.into(),
            pod_sandbox_id: pod.into(),
            state: state.map(|s| ContainerStateValue { state: s as i32 }),
            label_selector: app
                .map(|a| [("app".to_string(), a.to_string())].into())
                .unwrap_or_default(),
        };
        assert!(matches(&r, Some(&f("abc", "", None, None))));
        assert!(!matches(&r, Some(&f("abd", "", None, None))));
        assert!(matches(&r, Some(&f("", "pod1", None, None))));
        assert!(!matches(&r, Some(&f("", "pod2", None, None))));
        assert!(matches(
            &r,
            Some(&f("", "", Some(CriState::ContainerRunning), None))
        ));
        assert!(!matches(
            &r,
            Some(&f("", "", Some(CriState::ContainerExited), None))
        ));
        assert!(matches(&r, Some(&f("", "", None, Some("web")))));
        assert!(!matches(&r, Some(&f("", "", None, Some("db")))));
    }

    #[test]
    fn status_carries_what_kubelet_reads() {
        let s = cri_status(&record("id1", "pod", ContainerState::Exited));
        assert_eq!(s.state, CriState::ContainerExited as i32);
        assert_eq!(s.exit_code, 7);
        assert_eq!(s.reason, "Error");
        assert_eq!((s.created_at, s.started_at, s.finished_at), (1, 2, 3));
        assert_eq!(s.log_path, "/var/log/pods/x/c/1.log");
        assert_eq!(s.image.unwrap().image, "busybox");
        assert_eq!(s.image_ref, "sha256:1");
        assert_eq!(s.metadata.unwrap().attempt, 1);
    }

    #[test]
    fn resources_carry_only_what_is_set() {
        let r = LinuxContainerResources {
            cpu_quota: 50_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        };
        assert_eq!(
            oci_resources(&r),
            serde_json::json!({
                "cpu": {"quota": 50_000, "period": 100_000},
                "memory": {"limit": 64 << 20}
            })
        );
        assert_eq!(oci_resources(&Default::default()), serde_json::json!({}));
    }
}
