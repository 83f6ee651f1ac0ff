//! Pod start latency and host memory per pod, over CRI with the daemon's
//! configured driver (qemu here). For N sequential pods, as kubelet starts
//! a pod: RunPodSandbox, then CreateContainer + StartContainer of a busybox
//! container, then the moment its first line reaches its CRI log (median,
//! p95 of each). Then, with all N running, the host PSS of each pod's VM
//! processes (QEMU, vsock backend, virtiofsd), which counts the guest RAM
//! the guest actually touched.
//! `cargo bench -p carapace-e2e --bench pod_start` (pods: PODS, 10; the
//! daemon's log is copied to POD_START_DAEMON_LOG when set).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use carapace_e2e::daemon::{processes_mentioning, Daemon};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, PodSandboxConfig,
    PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
};

fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() {
    let pods: usize = std::env::var("PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let daemon = Daemon::start_with_busybox().await;
        let mut cri = daemon.runtime().await;
        let logs = tempfile::tempdir().expect("log directory");
        let mut latencies = Vec::new();
        let mut container_starts = Vec::new();
        let mut first_output = Vec::new();
        let mut ids = Vec::new();
        for i in 0..pods {
            let config = PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: format!("bench{i}"),
                    uid: format!("bench-uid-{i}"),
                    namespace: "bench".into(),
                    attempt: 0,
                }),
                labels: HashMap::new(),
                log_directory: logs.path().display().to_string(),
                ..Default::default()
            };
            let start = Instant::now();
            let id = cri
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: String::new(),
                })
                .await
                .expect("RunPodSandbox")
                .into_inner()
                .pod_sandbox_id;
            latencies.push(start.elapsed());
            let log_path = format!("c{i}.log");
            let created = Instant::now();
            let container = cri
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: id.clone(),
                    config: Some(ContainerConfig {
                        metadata: Some(ContainerMetadata {
                            name: "c".into(),
                            attempt: 0,
                        }),
                        image: Some(ImageSpec {
                            image: "docker.io/library/busybox:latest".into(),
                            ..Default::default()
                        }),
                        command: vec!["sh".into(), "-c".into(), "echo up; exec sleep 100000".into()],
                        log_path: log_path.clone(),
                        ..Default::default()
                    }),
                    sandbox_config: None,
                })
                .await
                .expect("CreateContainer")
                .into_inner()
                .container_id;
            cri.start_container(StartContainerRequest {
                container_id: container,
            })
            .await
            .expect("StartContainer");
            container_starts.push(created.elapsed());
            let log = logs.path().join(&log_path);
            while !std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(" stdout F up")
            {
                assert!(start.elapsed() < Duration::from_secs(120), "no output from pod {i}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            first_output.push(start.elapsed());
            ids.push(id);
        }
        // Let the guests settle (the agent idles) before reading memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut pss = Vec::new();
        for id in &ids {
            let dir = daemon.run_dir().join(&id[..16]);
            let kib: u64 = processes_mentioning(&dir).into_iter().map(pss_kib).sum();
            pss.push(kib);
        }
        for id in &ids {
            let _ = cri
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await;
        }
        pss.sort();
        if let Some(path) = std::env::var_os("POD_START_DAEMON_LOG") {
            std::fs::write(path, daemon.log()).expect("writing the daemon log");
        }
        for (what, figures) in [
            ("RunPodSandbox", &mut latencies),
            ("CreateContainer + StartContainer", &mut container_starts),
            ("pod start to the container's first log line", &mut first_output),
        ] {
            figures.sort();
            println!(
                "{what} over {pods} sequential pods: median {} ms, p95 {} ms, min {} ms, max {} ms",
                percentile(figures, 0.5).as_millis(),
                percentile(figures, 0.95).as_millis(),
                figures[0].as_millis(),
                figures[pods - 1].as_millis()
            );
        }
        println!(
            "host PSS per running pod with one idle container (VM processes, incl. touched guest RAM): median {} MiB, max {} MiB",
            pss[pods / 2] / 1024,
            pss[pods - 1] / 1024
        );
    });
}
