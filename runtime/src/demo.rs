//! `carapace demo`: a CRI client doing what kubelet does for a one-shot
//! pod (run the sandbox, create and start a container, wait for it, read
//! its CRI log, clean up), against a running daemon. It shows the whole
//! path working without kubelet or crictl on the machine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, DnsConfig, ImageSpec, PodSandboxConfig, PodSandboxMetadata,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// What the demo pod runs.
pub struct DemoPod {
    pub image: String,
    pub command: Vec<String>,
    pub timeout: Duration,
}

/// A CRI client on a unix socket.
pub async fn connect(socket: &Path) -> anyhow::Result<RuntimeServiceClient<Channel>> {
    let path = socket.to_owned();
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .with_context(|| format!("connecting to the CRI socket {}", socket.display()))?;
    Ok(RuntimeServiceClient::new(channel))
}

/// Runs the pod, prints the container's log lines (content only), cleans
/// up, and returns the container's exit code.
pub async fn run(socket: &Path, pod: DemoPod) -> anyhow::Result<i32> {
    let mut cri = connect(socket).await?;
    let logs = tempfile::Builder::new()
        .prefix("carapace-demo-logs-")
        .tempdir()
        .context("creating the log directory")?;
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "demo".into(),
            uid: format!("demo-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "demo".into(),
        log_directory: logs.path().display().to_string(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        ..Default::default()
    };
    let started = Instant::now();
    let pod_id = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    eprintln!(
        "pod sandbox {} ready in {:.2}s (its own VM)",
        &pod_id[..12],
        started.elapsed().as_secs_f64()
    );
    let result = run_container(&mut cri, &pod_id, &config, logs.path(), &pod).await;
    let cleanup = async {
        cri.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .context("StopPodSandbox")?;
        cri.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .context("RemovePodSandbox")?;
        anyhow::Ok(())
    };
    cleanup.await?;
    eprintln!("pod sandbox stopped and removed");
    result
}

async fn run_container(
    cri: &mut RuntimeServiceClient<Channel>,
    pod_id: &str,
    pod_config: &PodSandboxConfig,
    logs: &Path,
    pod: &DemoPod,
) -> anyhow::Result<i32> {
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "hello".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: pod.image.clone(),
            ..Default::default()
        }),
        command: pod.command.clone(),
        log_path: "hello.log".into(),
        labels: HashMap::from([("app".to_string(), "demo".to_string())]),
        ..Default::default()
    };
    let id = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.to_owned(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .context("StartContainer")?;
    let deadline = Instant::now() + pod.timeout;
    let status = loop {
        let status = cri
            .container_status(ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            })
            .await
            .context("ContainerStatus")?
            .into_inner()
            .status
            .context("ContainerStatus without a status")?;
        if status.state == ContainerState::ContainerExited as i32 {
            break status;
        }
        if Instant::now() >= deadline {
            bail!("the container did not exit within {:?}", pod.timeout);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log_path: PathBuf = logs.join("hello.log");
    let log = std::fs::read_to_string(&log_path)
        .with_context(|| format!("reading the container log {}", log_path.display()))?;
    eprintln!("--- container log ({}) ---", log_path.display());
    for line in log.lines() {
        // `<time> <stream> <tag> <content>`: show the content.
        println!("{}", line.splitn(4, ' ').nth(3).unwrap_or(""));
    }
    eprintln!(
        "--- container exited with code {} ({}) ---",
        status.exit_code, status.reason
    );
    Ok(status.exit_code)
}
