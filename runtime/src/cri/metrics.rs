//! ListMetricDescriptors and ListPodSandboxMetrics: the figures of the
//! stats calls as Prometheus metrics with cAdvisor's names, which kubelet
//! serves on `/metrics/cadvisor` when its `PodAndContainerStatsFromCRI`
//! feature gate is on.
//!
//! Each metric family is one row of a table ([`CONTAINER`], [`NETWORK`]):
//! its descriptor and the function that reads its value from a sample, so
//! a metric cannot be sent without its descriptor or with other labels.
//! CRI values are whole numbers: seconds are truncated, as CRI-O does.
//! Metrics carry no timestamp: they are read when asked for, not cached.

use carapace_agent_api::v1::ContainerStatsResponse as AgentStats;
use k8s_cri::v1::{Metric, MetricDescriptor, MetricType, UInt64Value};

use crate::network::counters::InterfaceCounters;

/// The labels of every metric, as cAdvisor and CRI-O name them: the
/// container's ID, name and image; for the pod's own metrics the sandbox
/// ID, `POD` and nothing. Kubelet adds namespace, pod and container.
pub const BASE_LABELS: [&str; 3] = ["id", "name", "image"];

/// What a container's metrics are read from.
#[derive(Debug, Clone, Default)]
pub struct ContainerSample {
    /// The agent's figures (the guest's cgroup), when it answered.
    pub agent: Option<AgentStats>,
    /// Bytes and inodes used by the writable layer.
    pub layer_bytes: u64,
    pub layer_inodes: u64,
    /// When the container started, in nanoseconds since the epoch.
    pub started_at_ns: i64,
}

/// How a sample gives the value of a label.
pub type LabelValue<S> = fn(&S) -> String;

/// One metric family.
pub struct Family<S> {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricType,
    /// A label beyond [`BASE_LABELS`]: its key, and its value for a sample.
    pub extra: Option<(&'static str, LabelValue<S>)>,
    /// The value for a sample; `None` leaves the metric out.
    pub value: fn(&S) -> Option<u64>,
}

const MICROS: u64 = 1_000_000;

fn cpu(s: &ContainerSample) -> Option<&carapace_agent_api::v1::CpuStats> {
    s.agent.as_ref()?.cpu.as_ref()
}

fn memory(s: &ContainerSample) -> Option<&carapace_agent_api::v1::MemoryStats> {
    s.agent.as_ref()?.memory.as_ref()
}

fn io(s: &ContainerSample) -> Option<&carapace_agent_api::v1::IoStats> {
    s.agent.as_ref()?.io.as_ref()
}

/// A family with the base labels only.
const fn plain<S>(
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    value: fn(&S) -> Option<u64>,
) -> Family<S> {
    Family {
        name,
        help,
        kind,
        extra: None,
        value,
    }
}

/// The metrics of each running container.
pub const CONTAINER: &[Family<ContainerSample>] = &[
    Family {
        name: "container_cpu_usage_seconds_total",
        help: "Cumulative cpu time consumed in seconds.",
        kind: MetricType::Counter,
        extra: Some(("cpu", |_| "total".into())),
        value: |s| Some(cpu(s)?.usage_usec / MICROS),
    },
    plain(
        "container_cpu_user_seconds_total",
        "Cumulative user cpu time consumed in seconds.",
        MetricType::Counter,
        |s| Some(cpu(s)?.user_usec / MICROS),
    ),
    plain(
        "container_cpu_system_seconds_total",
        "Cumulative system cpu time consumed in seconds.",
        MetricType::Counter,
        |s| Some(cpu(s)?.system_usec / MICROS),
    ),
    plain(
        "container_cpu_cfs_throttled_periods_total",
        "Number of throttled period intervals.",
        MetricType::Counter,
        |s| Some(cpu(s)?.nr_throttled),
    ),
    plain(
        "container_cpu_cfs_throttled_seconds_total",
        "Total time duration the container has been throttled.",
        MetricType::Counter,
        |s| Some(cpu(s)?.throttled_usec / MICROS),
    ),
    plain(
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed.",
        MetricType::Gauge,
        |s| Some(memory(s)?.usage_bytes),
    ),
    plain(
        "container_memory_working_set_bytes",
        "Current working set in bytes.",
        MetricType::Gauge,
        |s| Some(memory(s)?.working_set_bytes),
    ),
    plain(
        "container_memory_rss",
        "Size of RSS in bytes.",
        MetricType::Gauge,
        |s| Some(memory(s)?.anon_bytes),
    ),
    plain(
        "container_memory_cache",
        "Number of bytes of page cache memory.",
        MetricType::Gauge,
        |s| Some(memory(s)?.file_bytes),
    ),
    plain(
        "container_spec_memory_limit_bytes",
        "Memory limit for the container, 0 when unlimited.",
        MetricType::Gauge,
        |s| Some(memory(s)?.limit_bytes),
    ),
    plain(
        "container_oom_events_total",
        "Count of out of memory events observed for the container.",
        MetricType::Counter,
        |s| Some(memory(s)?.oom_kills),
    ),
    plain(
        "container_processes",
        "Number of processes running inside the container.",
        MetricType::Gauge,
        |s| Some(s.agent.as_ref()?.pids.as_ref()?.current),
    ),
    plain(
        "container_fs_reads_bytes_total",
        "Cumulative count of bytes read.",
        MetricType::Counter,
        |s| Some(io(s)?.read_bytes),
    ),
    plain(
        "container_fs_writes_bytes_total",
        "Cumulative count of bytes written.",
        MetricType::Counter,
        |s| Some(io(s)?.write_bytes),
    ),
    plain(
        "container_fs_reads_total",
        "Cumulative count of reads completed.",
        MetricType::Counter,
        |s| Some(io(s)?.read_ops),
    ),
    plain(
        "container_fs_writes_total",
        "Cumulative count of writes completed.",
        MetricType::Counter,
        |s| Some(io(s)?.write_ops),
    ),
    plain(
        "container_fs_usage_bytes",
        "Number of bytes that are consumed by the container's writable layer.",
        MetricType::Gauge,
        |s| Some(s.layer_bytes),
    ),
    plain(
        "container_start_time_seconds",
        "Start time of the container since unix epoch in seconds.",
        MetricType::Gauge,
        |s| u64::try_from(s.started_at_ns / 1_000_000_000).ok(),
    ),
];

/// A counter of the pod interface's traffic, labelled with its name.
const fn traffic(
    name: &'static str,
    help: &'static str,
    value: fn(&InterfaceCounters) -> Option<u64>,
) -> Family<InterfaceCounters> {
    Family {
        name,
        help,
        kind: MetricType::Counter,
        extra: Some(("interface", |c| c.name.clone())),
        value,
    }
}

/// The pod's own metrics: its interface's traffic.
pub const NETWORK: &[Family<InterfaceCounters>] = &[
    traffic(
        "container_network_receive_bytes_total",
        "Cumulative count of bytes received.",
        |c| Some(c.rx_bytes),
    ),
    traffic(
        "container_network_receive_packets_total",
        "Cumulative count of packets received.",
        |c| Some(c.rx_packets),
    ),
    traffic(
        "container_network_receive_packets_dropped_total",
        "Cumulative count of packets dropped while receiving.",
        |c| Some(c.rx_dropped),
    ),
    traffic(
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving.",
        |c| Some(c.rx_errors),
    ),
    traffic(
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted.",
        |c| Some(c.tx_bytes),
    ),
    traffic(
        "container_network_transmit_packets_total",
        "Cumulative count of packets transmitted.",
        |c| Some(c.tx_packets),
    ),
    traffic(
        "container_network_transmit_packets_dropped_total",
        "Cumulative count of packets dropped while transmitting.",
        |c| Some(c.tx_dropped),
    ),
    traffic(
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting.",
        |c| Some(c.tx_errors),
    ),
];

fn descriptor<S>(f: &Family<S>) -> MetricDescriptor {
    let mut label_keys: Vec<String> = BASE_LABELS.iter().map(|k| (*k).to_owned()).collect();
    label_keys.extend(f.extra.map(|(key, _)| key.to_owned()));
    MetricDescriptor {
        name: f.name.into(),
        help: f.help.into(),
        label_keys,
    }
}

/// Every metric's descriptor.
pub fn descriptors() -> Vec<MetricDescriptor> {
    let containers = CONTAINER.iter().map(descriptor);
    containers.chain(NETWORK.iter().map(descriptor)).collect()
}

/// The metrics of `families` for `sample`, labelled with `base` (the
/// values of [`BASE_LABELS`]).
pub fn metrics_of<S>(families: &[Family<S>], sample: &S, base: &[&str; 3]) -> Vec<Metric> {
    families
        .iter()
        .filter_map(|f| {
            let value = (f.value)(sample)?;
            let mut label_values: Vec<String> = base.iter().map(|v| (*v).to_owned()).collect();
            label_values.extend(f.extra.map(|(_, of)| of(sample)));
            Some(Metric {
                name: f.name.into(),
                timestamp: 0,
                metric_type: f.kind as i32,
                label_values,
                value: Some(UInt64Value { value }),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_agent_api::v1::{CpuStats, IoStats, MemoryStats, PidsStats};
    use std::collections::{HashMap, HashSet};

    fn full_sample() -> ContainerSample {
        ContainerSample {
            agent: Some(AgentStats {
                timestamp_unix_nanos: 5,
                cpu: Some(CpuStats {
                    usage_usec: 7_900_000,
                    user_usec: 5_000_000,
                    system_usec: 2_900_000,
                    nr_throttled: 3,
                    throttled_usec: 1_000_000,
                }),
                memory: Some(MemoryStats {
                    usage_bytes: 4096,
                    working_set_bytes: 2048,
                    anon_bytes: 1024,
                    file_bytes: 512,
                    limit_bytes: 1 << 20,
                    oom_kills: 1,
                }),
                pids: Some(PidsStats {
                    current: 2,
                    limit: 0,
                }),
                io: Some(IoStats {
                    read_bytes: 10,
                    write_bytes: 20,
                    read_ops: 1,
                    write_ops: 2,
                }),
            }),
            layer_bytes: 99,
            layer_inodes: 3,
            started_at_ns: 1_700_000_000_500_000_000,
        }
    }

    #[test]
    fn names_are_unique_and_every_metric_matches_its_descriptor() {
        let descriptors = descriptors();
        let by_name: HashMap<_, _> = descriptors.iter().map(|d| (d.name.clone(), d)).collect();
        assert_eq!(by_name.len(), descriptors.len(), "duplicate names");
        let eth0 = InterfaceCounters {
            name: "eth0".into(),
            ..Default::default()
        };
        let mut seen = HashSet::new();
        let all = metrics_of(CONTAINER, &full_sample(), &["c1", "app", "busybox"])
            .into_iter()
            .chain(metrics_of(NETWORK, &eth0, &["pod1", "POD", ""]));
        for m in all {
            let d = by_name.get(&m.name).unwrap_or_else(|| panic!("{}", m.name));
            assert_eq!(m.label_values.len(), d.label_keys.len(), "{}", m.name);
            assert!(d.label_keys.starts_with(&BASE_LABELS.map(String::from)));
            seen.insert(m.name);
        }
        // A full sample gives every family.
        assert_eq!(seen.len(), descriptors.len());
    }

    #[test]
    fn values_and_labels_come_from_the_sample() {
        let metrics = metrics_of(CONTAINER, &full_sample(), &["c1", "app", "busybox"]);
        let get = |name: &str| metrics.iter().find(|m| m.name == name).unwrap();
        let cpu = get("container_cpu_usage_seconds_total");
        assert_eq!(cpu.value.as_ref().unwrap().value, 7, "whole seconds");
        assert_eq!(cpu.metric_type, MetricType::Counter as i32);
        assert_eq!(cpu.label_values, ["c1", "app", "busybox", "total"]);
        let ws = get("container_memory_working_set_bytes");
        assert_eq!(ws.value.as_ref().unwrap().value, 2048);
        assert_eq!(ws.metric_type, MetricType::Gauge as i32);
        assert_eq!(ws.label_values, ["c1", "app", "busybox"]);
        assert_eq!(
            get("container_start_time_seconds")
                .value
                .as_ref()
                .unwrap()
                .value,
            1_700_000_000
        );
        assert_eq!(
            get("container_fs_usage_bytes")
                .value
                .as_ref()
                .unwrap()
                .value,
            99
        );

        let eth0 = InterfaceCounters {
            name: "eth0".into(),
            rx_bytes: 1234,
            tx_errors: 2,
            ..Default::default()
        };
        let net = metrics_of(NETWORK, &eth0, &["pod1", "POD", ""]);
        let rx = net
            .iter()
            .find(|m| m.name == "container_network_receive_bytes_total")
            .unwrap();
        assert_eq!(rx.value.as_ref().unwrap().value, 1234);
        assert_eq!(rx.label_values, ["pod1", "POD", "", "eth0"]);
    }

    #[test]
    fn without_the_agent_only_the_hosts_figures_remain() {
        let sample = ContainerSample {
            agent: None,
            layer_bytes: 5,
            layer_inodes: 1,
            started_at_ns: 2_000_000_000,
        };
        let mut names: Vec<_> = metrics_of(CONTAINER, &sample, &["c", "n", "i"])
            .into_iter()
            .map(|m| m.name)
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["container_fs_usage_bytes", "container_start_time_seconds"]
        );
    }
}
