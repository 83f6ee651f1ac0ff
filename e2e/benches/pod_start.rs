//! Pod start latency and host memory per pod, over CRI with the daemon's
//! configured driver (qemu here). For N sequential pods, as kubelet starts
//! a pod: RunPodSandbox, then CreateContainer + StartContainer of a busybox
//! container, then the moment its first line reaches its CRI log (median,
//! p95 of each, and of the three calls together). Then, with all N
//! running, the host PSS of each pod's VM processes (QEMU, vsock backend,
//! virtiofsd), split into the guest RAM the guest touched and the rest.
//! `cargo bench -p carapace-e2e --bench pod_start` (pods: PODS, 10; the
//! daemon's log and the pods' consoles are copied to POD_START_DAEMON_LOG
//! when set; FREE_PAGE_REPORTING=0 or 1 sets its `vm.free_page_reporting`; WARM_POOL=n sets
//! the daemon's `vm.warm_pool` (else its default), and the first
//! pod then waits until the first warm VM is ready, as on a node whose
//! pool filled long before its pods came; the next pods come one after
//! the other, each while the replacement of the previous one boots).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use carapace_e2e::daemon::{processes_mentioning, Daemon};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, PodSandboxConfig,
    PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
};

/// A process's proportional set size in KiB: guest RAM, QEMU's TCG
/// translation buffer, and everything else. Guest RAM is the VM's shared
/// memfd (`memory-backend-memfd`), mapped by QEMU and by the vhost-user
/// backends it hands the memory table to; PSS splits each touched page
/// between them. The translation buffer is QEMU's one anonymous
/// read-write-execute mapping (TCG only; it does not exist under KVM).
#[derive(Default, Clone, Copy)]
struct Pss {
    guest_ram: u64,
    tcg: u64,
    other: u64,
}

fn pss_kib(pid: i32) -> Pss {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut pss = Pss::default();
    let mut kind = 0;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Pss:") {
            let kib: u64 = kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            match kind {
                1 => pss.guest_ram += kib,
                2 => pss.tcg += kib,
                _ => pss.other += kib,
            }
        } else if line.split_whitespace().next().is_some_and(|f| {
            f.contains('-') && f.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        }) {
            // A mapping's header: range perms offset dev inode [path].
            let fields: Vec<&str> = line.split_whitespace().collect();
            kind = if line.contains("/memfd:mem") {
                1
            } else if fields.get(1) == Some(&"rwxp") && fields.len() == 5 {
                2
            } else {
                0
            };
        }
    }
    pss
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
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
        // TCG_CACHE_MIB: the daemon's vm.tcg_translation_cache_mib;
        // FREE_PAGE_REPORTING=0|1: its vm.free_page_reporting;
        // WARM_POOL: its vm.warm_pool.
        let mut vm_lines = String::new();
        if let Ok(mib) = std::env::var("TCG_CACHE_MIB") {
            vm_lines.push_str(&format!("tcg_translation_cache_mib = {mib}\n"));
        }
        if let Ok(on) = std::env::var("FREE_PAGE_REPORTING") {
            vm_lines.push_str(&format!("free_page_reporting = {}\n", on == "1"));
        }
        let warm_pool: u8 = std::env::var("WARM_POOL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(carapace::config::VmConfig::default().warm_pool);
        vm_lines.push_str(&format!("warm_pool = {warm_pool}\n"));
        let daemon = Daemon::start_with_busybox_vm(&vm_lines).await;
        if warm_pool > 0 {
            // A node's pool is full long before its pods come: the first
            // pod does not wait for the daemon's first warm boot.
            let deadline = Instant::now() + Duration::from_secs(120);
            while !daemon.log().contains("warm VM ready") {
                assert!(Instant::now() < deadline, "no warm VM:\n{}", daemon.log());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
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
        // Per pod, and the non-guest part per process name.
        let mut pss = Vec::new();
        let mut by_process: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for id in &ids {
            let dir = daemon.run_dir().join(&id[..16]);
            let mut pod = Pss::default();
            for pid in processes_mentioning(&dir) {
                let p = pss_kib(pid);
                pod.guest_ram += p.guest_ram;
                pod.tcg += p.tcg;
                pod.other += p.other;
                by_process.entry(comm(pid)).or_default().push(p.tcg + p.other);
            }
            pss.push(pod);
        }
        if let Some(path) = std::env::var_os("POD_START_DAEMON_LOG") {
            let mut log = daemon.log();
            for id in &ids {
                let console = daemon.run_dir().join(&id[..16]).join("console.log");
                log.push_str(&format!("--- console of pod {id} ---\n"));
                log.push_str(&std::fs::read_to_string(console).unwrap_or_default());
            }
            std::fs::write(path, log).expect("writing the daemon log");
        }
        for id in &ids {
            let _ = cri
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await;
        }
        let totals: Vec<Duration> = latencies
            .iter()
            .zip(&container_starts)
            .map(|(run, create_start)| *run + *create_start)
            .collect();
        for (what, figures) in [
            ("RunPodSandbox", &mut latencies),
            ("CreateContainer + StartContainer", &mut container_starts),
            ("pod start: RunPodSandbox + CreateContainer + StartContainer", &mut totals.clone()),
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
        let median = |mut v: Vec<u64>| {
            v.sort();
            v[v.len() / 2] / 1024
        };
        println!(
            "host PSS per running pod with one idle container (the VM's processes): median {} MiB in all = {} MiB guest RAM the guest touched + {} MiB besides guest RAM (max {} MiB), of which {} MiB TCG translation buffer",
            median(pss.iter().map(|p| p.guest_ram + p.tcg + p.other).collect()),
            median(pss.iter().map(|p| p.guest_ram).collect()),
            median(pss.iter().map(|p| p.tcg + p.other).collect()),
            pss.iter().map(|p| p.tcg + p.other).max().unwrap_or(0) / 1024,
            median(pss.iter().map(|p| p.tcg).collect()),
        );
        for (process, kib) in by_process {
            println!("  besides guest RAM, {process}: median {} MiB", median(kib));
        }
    });
}
