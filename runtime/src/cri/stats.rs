//! ContainerStats, ListContainerStats, PodSandboxStats and
//! ListPodSandboxStats: CPU, memory and process figures from the agent
//! (the guest's cgroups), the writable layer's use from the host, the pod
//! interface's traffic from the pod's network namespace. The same samples
//! feed ListPodSandboxMetrics (`metrics`).

use std::collections::HashMap;
use std::path::Path;

use k8s_cri::v1::{
    ContainerAttributes, ContainerMetadata, ContainerMetrics, ContainerStats, ContainerStatsFilter,
    CpuUsage, FilesystemIdentifier, FilesystemUsage, LinuxPodSandboxStats, MemoryUsage,
    NetworkInterfaceUsage, NetworkUsage, PodSandboxAttributes, PodSandboxMetrics, PodSandboxStats,
    PodSandboxStatsFilter, ProcessUsage, UInt64Value,
};

use super::metrics::{self, ContainerSample};
use super::sandbox_status::cri_metadata;
use super::{CriError, CriService};
use crate::container::{ContainerRecord, ContainerState};
use crate::network::counters::{self, InterfaceCounters};
use crate::sandbox::{SandboxRecord, SandboxState};

/// The previous CPU sample of each container, for usage_nano_cores.
#[derive(Debug, Default)]
pub struct CpuSamples(std::sync::Mutex<HashMap<String, (i64, u64)>>);

impl CpuSamples {
    /// Cores used since the previous sample of `id` (in billionths), if
    /// there was one.
    fn rate(&self, id: &str, at_ns: i64, usage_ns: u64) -> Option<u64> {
        let mut samples = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let previous = samples.insert(id.to_owned(), (at_ns, usage_ns));
        let (then, used) = previous?;
        let elapsed = u64::try_from(at_ns.checked_sub(then)?).ok()?;
        if elapsed == 0 {
            return None;
        }
        let delta = usage_ns.checked_sub(used)?;
        Some(((u128::from(delta) * 1_000_000_000) / u128::from(elapsed)) as u64)
    }

    fn forget_except(&self, live: &[String]) {
        let mut samples = self.0.lock().unwrap_or_else(|e| e.into_inner());
        samples.retain(|id, _| live.contains(id));
    }
}

fn value(v: u64) -> Option<UInt64Value> {
    Some(UInt64Value { value: v })
}

/// Bytes and inodes used under `dir` (not following symlinks).
fn disk_usage(dir: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut inodes = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            inodes += 1;
            bytes += meta.len();
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    (bytes, inodes)
}

/// The pod interface's counters, when the pod has a network and they can
/// be read.
async fn pod_interface(record: &SandboxRecord) -> Option<InterfaceCounters> {
    let netns = record.network.as_ref()?.netns.clone();
    let read = tokio::task::spawn_blocking(move || counters::pod_interface(&netns)).await;
    match read {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            tracing::debug!(sandbox = %record.id, error = %e, "no network counters");
            None
        }
        Err(_) => None,
    }
}

fn network_usage(c: InterfaceCounters) -> NetworkUsage {
    let interface = NetworkInterfaceUsage {
        name: c.name,
        rx_bytes: value(c.rx_bytes),
        rx_errors: value(c.rx_errors),
        tx_bytes: value(c.tx_bytes),
        tx_errors: value(c.tx_errors),
    };
    NetworkUsage {
        timestamp: super::container::timestamp(),
        default_interface: Some(interface.clone()),
        interfaces: vec![interface],
    }
}

impl CriService {
    fn container_stats_of(&self, r: &ContainerRecord, sample: &ContainerSample) -> ContainerStats {
        let now = super::container::timestamp();
        let attributes = Some(ContainerAttributes {
            id: r.id.clone(),
            metadata: Some(ContainerMetadata {
                name: r.name.clone(),
                attempt: r.attempt,
            }),
            labels: r.labels.clone().into_iter().collect(),
            annotations: r.annotations.clone().into_iter().collect(),
        });
        let writable_layer = Some(FilesystemUsage {
            timestamp: now,
            fs_id: Some(FilesystemIdentifier {
                mountpoint: r.layer_dir.display().to_string(),
            }),
            used_bytes: value(sample.layer_bytes),
            inodes_used: value(sample.layer_inodes),
        });
        let Some(s) = &sample.agent else {
            return ContainerStats {
                attributes,
                writable_layer,
                ..Default::default()
            };
        };
        let at = s.timestamp_unix_nanos;
        let cpu = s.cpu.as_ref().map(|c| {
            let usage_ns = c.usage_usec.saturating_mul(1000);
            CpuUsage {
                timestamp: at,
                usage_core_nano_seconds: value(usage_ns),
                usage_nano_cores: self.cpu_samples.rate(&r.id, at, usage_ns).and_then(value),
            }
        });
        let memory = s.memory.as_ref().map(|m| MemoryUsage {
            timestamp: at,
            working_set_bytes: value(m.working_set_bytes),
            available_bytes: (m.limit_bytes > 0)
                .then(|| m.limit_bytes.saturating_sub(m.working_set_bytes))
                .and_then(value),
            usage_bytes: value(m.usage_bytes),
            rss_bytes: value(m.anon_bytes),
            page_faults: None,
            major_page_faults: None,
        });
        ContainerStats {
            attributes,
            cpu,
            memory,
            writable_layer,
            ..Default::default()
        }
    }

    /// What one container record's stats and metrics are read from: the
    /// agent's figures while the container lives in a ready pod, the
    /// writable layer always.
    async fn sample_for(&self, r: &ContainerRecord) -> ContainerSample {
        let agent = if r.state == ContainerState::Exited {
            None
        } else {
            self.containers.stats(&r.id).await.ok()
        };
        let upper = r.layer_dir.join("upper");
        let (layer_bytes, layer_inodes) = tokio::task::spawn_blocking(move || disk_usage(&upper))
            .await
            .unwrap_or_default();
        ContainerSample {
            agent,
            layer_bytes,
            layer_inodes,
            started_at_ns: r.started_at_ns,
        }
    }

    async fn stats_for(&self, r: &ContainerRecord) -> ContainerStats {
        let sample = self.sample_for(r).await;
        self.container_stats_of(r, &sample)
    }

    pub(super) async fn container_stats(&self, id: &str) -> Result<ContainerStats, CriError> {
        let r = self.containers.record(id).await?;
        Ok(self.stats_for(&r).await)
    }

    pub(super) async fn list_container_stats(
        &self,
        filter: Option<ContainerStatsFilter>,
    ) -> Result<Vec<ContainerStats>, CriError> {
        let records = self.containers.list().await;
        self.cpu_samples
            .forget_except(&records.iter().map(|r| r.id.clone()).collect::<Vec<_>>());
        let mut out = Vec::new();
        for r in records {
            if let Some(f) = &filter {
                if !f.id.is_empty() && !r.id.starts_with(&f.id) {
                    continue;
                }
                if !f.pod_sandbox_id.is_empty() && !r.sandbox_id.starts_with(&f.pod_sandbox_id) {
                    continue;
                }
                if !f
                    .label_selector
                    .iter()
                    .all(|(k, v)| r.labels.get(k) == Some(v))
                {
                    continue;
                }
            }
            // Kubelet asks for the stats of running containers.
            if r.state == ContainerState::Running {
                out.push(self.stats_for(&r).await);
            }
        }
        Ok(out)
    }

    pub(super) async fn pod_sandbox_stats(&self, id: &str) -> Result<PodSandboxStats, CriError> {
        super::sandbox_run::require_id(id)?;
        let sandbox = self
            .sandboxes
            .get(id)
            .ok_or_else(|| CriError::NotFound(format!("pod sandbox {id} not found")))?;
        let record = sandbox.lock().await.record.clone();
        let network = pod_interface(&record).await.map(network_usage);
        let mut containers = Vec::new();
        for r in self.containers.list().await {
            if r.sandbox_id == id && r.state == ContainerState::Running {
                containers.push(self.stats_for(&r).await);
            }
        }
        let now = super::container::timestamp();
        let sum = |f: &dyn Fn(&ContainerStats) -> Option<u64>| -> Option<UInt64Value> {
            let values: Vec<u64> = containers.iter().filter_map(f).collect();
            (!values.is_empty()).then(|| UInt64Value {
                value: values.iter().sum(),
            })
        };
        let cpu = CpuUsage {
            timestamp: now,
            usage_core_nano_seconds: sum(&|c| {
                c.cpu
                    .as_ref()
                    .and_then(|c| c.usage_core_nano_seconds.as_ref())
                    .map(|v| v.value)
            }),
            usage_nano_cores: sum(&|c| {
                c.cpu
                    .as_ref()
                    .and_then(|c| c.usage_nano_cores.as_ref())
                    .map(|v| v.value)
            }),
        };
        let memory = MemoryUsage {
            timestamp: now,
            working_set_bytes: sum(&|c| {
                c.memory
                    .as_ref()
                    .and_then(|m| m.working_set_bytes.as_ref())
                    .map(|v| v.value)
            }),
            usage_bytes: sum(&|c| {
                c.memory
                    .as_ref()
                    .and_then(|m| m.usage_bytes.as_ref())
                    .map(|v| v.value)
            }),
            rss_bytes: sum(&|c| {
                c.memory
                    .as_ref()
                    .and_then(|m| m.rss_bytes.as_ref())
                    .map(|v| v.value)
            }),
            ..Default::default()
        };
        Ok(PodSandboxStats {
            attributes: Some(PodSandboxAttributes {
                id: record.id.clone(),
                metadata: Some(cri_metadata(&record)),
                labels: record.labels.clone().into_iter().collect(),
                annotations: record.annotations.clone().into_iter().collect(),
            }),
            linux: Some(LinuxPodSandboxStats {
                cpu: Some(cpu),
                memory: Some(memory),
                network,
                process: Some(ProcessUsage {
                    timestamp: now,
                    process_count: value(containers.len() as u64),
                }),
                containers,
            }),
            windows: None,
        })
    }

    pub(super) async fn list_pod_sandbox_stats(
        &self,
        filter: Option<PodSandboxStatsFilter>,
    ) -> Result<Vec<PodSandboxStats>, CriError> {
        let mut out = Vec::new();
        for sandbox in self.sandboxes.list() {
            let record = sandbox.lock().await.record.clone();
            if let Some(f) = &filter {
                if !f.id.is_empty() && !record.id.starts_with(&f.id) {
                    continue;
                }
                if !f
                    .label_selector
                    .iter()
                    .all(|(k, v)| record.labels.get(k) == Some(v))
                {
                    continue;
                }
            }
            if record.state == SandboxState::Ready {
                out.push(self.pod_sandbox_stats(&record.id).await?);
            }
        }
        Ok(out)
    }

    /// The metrics of every ready pod: its interface's traffic, and the
    /// metrics of each of its running containers.
    pub(super) async fn list_pod_sandbox_metrics(&self) -> Vec<PodSandboxMetrics> {
        let containers = self.containers.list().await;
        let mut out = Vec::new();
        for sandbox in self.sandboxes.list() {
            let record = sandbox.lock().await.record.clone();
            if record.state != SandboxState::Ready {
                continue;
            }
            let pod_metrics = match pod_interface(&record).await {
                Some(c) => metrics::metrics_of(metrics::NETWORK, &c, &[&record.id, "POD", ""]),
                None => Vec::new(),
            };
            let mut container_metrics = Vec::new();
            for r in &containers {
                if r.sandbox_id != record.id || r.state != ContainerState::Running {
                    continue;
                }
                let sample = self.sample_for(r).await;
                container_metrics.push(ContainerMetrics {
                    container_id: r.id.clone(),
                    metrics: metrics::metrics_of(
                        metrics::CONTAINER,
                        &sample,
                        &[&r.id, &r.name, &r.image],
                    ),
                });
            }
            out.push(PodSandboxMetrics {
                pod_sandbox_id: record.id,
                metrics: pod_metrics,
                container_metrics,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_rate_needs_two_samples() {
        let s = CpuSamples::default();
        assert_eq!(s.rate("a", 1_000_000_000, 0), None);
        // Half a core for one second.
        assert_eq!(s.rate("a", 2_000_000_000, 500_000_000), Some(500_000_000));
        // A counter going backwards (new container, same id) gives none.
        assert_eq!(s.rate("a", 3_000_000_000, 1), None);
        s.forget_except(&[]);
        assert_eq!(s.rate("a", 4_000_000_000, 10), None);
    }

    #[test]
    fn disk_usage_counts_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), vec![0u8; 1000]).unwrap();
        let (bytes, inodes) = disk_usage(dir.path());
        assert_eq!(inodes, 2);
        assert!(bytes >= 1000);
        assert_eq!(disk_usage(&dir.path().join("absent")), (0, 0));
    }
}
