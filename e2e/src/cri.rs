//! CRI calls the end-to-end tests make again and again, as kubelet makes
//! them: a pod, a busybox container in it, its status until a state.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, PodSandboxConfig, PodSandboxMetadata,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;

use crate::daemon::Daemon;

pub type Cri = RuntimeServiceClient<Channel>;

/// The demo image every [`Daemon::start_with_busybox`] daemon has.
pub const BUSYBOX: &str = "docker.io/library/busybox:latest";

/// A pod named `name` whose logs go to `log_dir`.
pub fn pod_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: format!("{name}-0"),
        log_directory: log_dir.display().to_string(),
        ..Default::default()
    }
}

/// Runs the pod; a failure shows the daemon's log.
pub async fn run_pod(cri: &mut Cri, daemon: &Daemon, config: &PodSandboxConfig) -> String {
    cri.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", daemon.log()))
    .into_inner()
    .pod_sandbox_id
}

/// A busybox container running `cmd`, logging to `log_path` (relative to
/// the pod's log directory; empty for no log).
pub fn busybox(name: &str, cmd: &[&str], log_path: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: log_path.into(),
        labels: [("app".to_string(), name.to_string())].into(),
        ..Default::default()
    }
}

pub async fn create(
    cri: &mut Cri,
    pod: &str,
    config: ContainerConfig,
    pod_config: &PodSandboxConfig,
) -> String {
    cri.create_container(CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: Some(pod_config.clone()),
    })
    .await
    .expect("CreateContainer")
    .into_inner()
    .container_id
}

/// Creates and starts a container; returns once it runs.
pub async fn create_running(
    cri: &mut Cri,
    pod: &str,
    config: ContainerConfig,
    pod_config: &PodSandboxConfig,
) -> String {
    let id = create(cri, pod, config, pod_config).await;
    cri.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("StartContainer");
    wait_state(cri, &id, ContainerState::ContainerRunning).await;
    id
}

/// StopPodSandbox then RemovePodSandbox, as kubelet ends a pod.
pub async fn remove_pod(cri: &mut Cri, pod: &str) {
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("StopPodSandbox");
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("RemovePodSandbox");
}

pub async fn status(cri: &mut Cri, id: &str) -> ContainerStatus {
    cri.container_status(ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .expect("ContainerStatus")
    .into_inner()
    .status
    .expect("a status")
}

/// Waits (up to a minute) until the container's state is `state`.
pub async fn wait_state(cri: &mut Cri, id: &str, state: ContainerState) -> ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(cri, id).await;
        if s.state == state as i32 {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} never reached {state:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
