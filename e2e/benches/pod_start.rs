//! Pod start latency and host memory per pod, over CRI with the daemon's
//! configured driver (qemu here). For N sequential pods: RunPodSandbox
//! latency (median, p95), then with all N running, the host PSS of each
//! pod's VM processes (QEMU + vsock backend), which counts the guest RAM the
//! guest actually touched.
//! `cargo bench -p carapace-e2e --bench pod_start` (pods: PODS, 10).
//!
//! Containers do not exist yet, so CreateContainer/StartContainer are not
//! measured; the pod-start figure is RunPodSandbox alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use carapace_e2e::daemon::{processes_mentioning, Daemon};
use k8s_cri::v1::{
    PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest,
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
        let daemon = Daemon::start().await;
        let mut cri = daemon.runtime().await;
        let mut latencies = Vec::new();
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
        latencies.sort();
        pss.sort();
        println!(
            "RunPodSandbox over {pods} sequential pods: median {} ms, p95 {} ms, min {} ms, max {} ms",
            percentile(&latencies, 0.5).as_millis(),
            percentile(&latencies, 0.95).as_millis(),
            latencies[0].as_millis(),
            latencies[pods - 1].as_millis()
        );
        println!(
            "host PSS per running idle pod (VM processes, incl. touched guest RAM): median {} MiB, max {} MiB",
            pss[pods / 2] / 1024,
            pss[pods - 1] / 1024
        );
    });
}
