//! RunPodSandbox, StopPodSandbox, RemovePodSandbox.

use k8s_cri::v1::{
    LinuxContainerResources, NamespaceMode, PodSandboxConfig, RunPodSandboxRequest,
    RunPodSandboxResponse,
};

use std::collections::BTreeMap;

use k8s_cri::v1::Protocol;
use serde_json::{json, Value};

use super::{CriError, CriService};
use crate::config::VmConfig;
use crate::sandbox::{NewSandbox, PodMeta, VmSize};

const MIB: i64 = 1024 * 1024;

impl CriService {
    pub(super) async fn run_pod_sandbox(
        &self,
        request: RunPodSandboxRequest,
    ) -> Result<RunPodSandboxResponse, CriError> {
        let config = request
            .config
            .ok_or_else(|| CriError::InvalidArgument("RunPodSandbox: config is required".into()))?;
        let new = new_sandbox(config, request.runtime_handler, &self.sandboxes.config().vm)?;
        let sandboxes = self.sandboxes.clone();
        // Its own task: a kubelet that stops waiting (its deadline) drops
        // this call, and a sandbox cut short halfway would keep its name
        // reserved and its VM running without a record. Finished, it is a
        // sandbox kubelet finds in ListPodSandbox and removes.
        let id = tokio::spawn(async move { sandboxes.run(new).await })
            .await
            .map_err(|e| CriError::Internal(format!("RunPodSandbox: {e}")))??;
        Ok(RunPodSandboxResponse { pod_sandbox_id: id })
    }

    /// Kills the pod's containers that still run, then stops its VM.
    pub(super) async fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        require_id(id)?;
        self.containers.stop_sandbox(id).await?;
        Ok(self.sandboxes.stop(id).await?)
    }

    /// Removes the pod's containers, then the pod.
    pub(super) async fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        require_id(id)?;
        self.containers.remove_sandbox(id).await?;
        Ok(self.sandboxes.remove(id).await?)
    }
}

/// An empty id is a malformed request, not an unknown sandbox.
pub(super) fn require_id(id: &str) -> Result<(), CriError> {
    if id.is_empty() {
        return Err(CriError::InvalidArgument("pod sandbox id is empty".into()));
    }
    Ok(())
}

fn new_sandbox(
    config: PodSandboxConfig,
    runtime_handler: String,
    vm: &VmConfig,
) -> Result<NewSandbox, CriError> {
    let cni_capability_args = cni_capability_args(&config);
    let meta = config
        .metadata
        .ok_or_else(|| CriError::InvalidArgument("pod sandbox metadata is required".into()))?;
    for (field, value) in [
        ("name", &meta.name),
        ("uid", &meta.uid),
        ("namespace", &meta.namespace),
    ] {
        if value.is_empty() {
            return Err(CriError::InvalidArgument(format!(
                "pod sandbox metadata.{field} is empty"
            )));
        }
    }
    let linux = config.linux.unwrap_or_default();
    let namespaces = linux
        .security_context
        .as_ref()
        .and_then(|sc| sc.namespace_options.clone())
        .unwrap_or_default();
    if namespaces.network == NamespaceMode::Node as i32 {
        return Err(CriError::InvalidArgument(
            "host network pods cannot run in a VM: use a runc RuntimeClass for hostNetwork pods"
                .into(),
        ));
    }
    if namespaces.pid == NamespaceMode::Node as i32 || namespaces.ipc == NamespaceMode::Node as i32
    {
        return Err(CriError::InvalidArgument(
            "host PID or IPC namespaces cannot be shared with a VM-isolated pod".into(),
        ));
    }
    Ok(NewSandbox {
        cni_capability_args,
        meta: PodMeta {
            name: meta.name,
            uid: meta.uid,
            namespace: meta.namespace,
            attempt: meta.attempt,
        },
        labels: config.labels.into_iter().collect(),
        annotations: config.annotations.into_iter().collect(),
        runtime_handler,
        log_directory: config.log_directory,
        hostname: config.hostname,
        resolv_conf: config
            .dns_config
            .as_ref()
            .map(resolv_conf)
            .unwrap_or_default(),
        sysctls: linux.sysctls.clone().into_iter().collect(),
        cgroup_parent: linux.cgroup_parent.clone(),
        size: vm_size(linux.resources.as_ref(), vm),
    })
}

/// The CNI capability arguments of the pod, as CRI-O and containerd pass
/// them: `portMappings` (those with a host port) and `dns`.
fn cni_capability_args(config: &PodSandboxConfig) -> BTreeMap<String, Value> {
    let mut args = BTreeMap::new();
    let ports: Vec<Value> = config
        .port_mappings
        .iter()
        .filter(|p| p.host_port > 0)
        .map(|p| {
            let protocol = match Protocol::try_from(p.protocol) {
                Ok(Protocol::Udp) => "udp",
                Ok(Protocol::Sctp) => "sctp",
                _ => "tcp",
            };
            let mut m = json!({
                "hostPort": p.host_port,
                "containerPort": p.container_port,
                "protocol": protocol,
            });
            if !p.host_ip.is_empty() {
                m["hostIP"] = p.host_ip.clone().into();
            }
            m
        })
        .collect();
    if !ports.is_empty() {
        args.insert("portMappings".into(), Value::Array(ports));
    }
    if let Some(dns) = &config.dns_config {
        args.insert(
            "dns".into(),
            json!({"servers": dns.servers, "searches": dns.searches, "options": dns.options}),
        );
    }
    args
}

/// /etc/resolv.conf for the pod's DNS config, as kubelet means it.
fn resolv_conf(dns: &k8s_cri::v1::DnsConfig) -> String {
    let mut out = String::new();
    for server in &dns.servers {
        out.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.searches.is_empty() {
        out.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    if !dns.options.is_empty() {
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    out
}

/// The VM's size: the pod's limits (CRI `linux.resources`, the sum of its
/// containers' limits) when given, else the configured defaults; plus the
/// configured memory overhead for the guest kernel and agent.
fn vm_size(resources: Option<&LinuxContainerResources>, vm: &VmConfig) -> VmSize {
    let (mut vcpus, mut mem_mib) = (vm.default_vcpus, vm.default_mem_mib);
    if let Some(r) = resources {
        if r.cpu_quota > 0 && r.cpu_period > 0 {
            let cpus = (r.cpu_quota + r.cpu_period - 1) / r.cpu_period;
            vcpus = u8::try_from(cpus.clamp(1, i64::from(vm.max_vcpus))).unwrap_or(vm.max_vcpus);
        }
        if r.memory_limit_in_bytes > 0 {
            let mib = (r.memory_limit_in_bytes + MIB - 1) / MIB;
            mem_mib = u32::try_from(mib).unwrap_or(u32::MAX);
        }
    }
    VmSize {
        vcpus,
        mem_mib: mem_mib.saturating_add(vm.overhead_mem_mib),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::PodSandboxMetadata;
    use k8s_cri::v1::{LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceOption};

    fn config() -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web".into(),
                uid: "u1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn metadata_is_required_and_complete() {
        let vm = VmConfig::default();
        let mut c = config();
        c.metadata = None;
        assert!(matches!(
            new_sandbox(c, String::new(), &vm),
            Err(CriError::InvalidArgument(_))
        ));
        let mut c = config();
        c.metadata.as_mut().unwrap().uid.clear();
        let err = new_sandbox(c, String::new(), &vm).unwrap_err();
        assert!(err.to_string().contains("uid"), "{err}");
        assert!(new_sandbox(config(), String::new(), &vm).is_ok());
    }

    #[test]
    fn dns_config_becomes_resolv_conf() {
        let dns = k8s_cri::v1::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(&dns),
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        assert_eq!(resolv_conf(&Default::default()), "");
    }

    #[test]
    fn port_mappings_and_dns_become_capability_args() {
        let mut c = config();
        c.port_mappings = vec![
            k8s_cri::v1::PortMapping {
                protocol: Protocol::Udp as i32,
                container_port: 53,
                host_port: 5353,
                host_ip: "127.0.0.1".into(),
            },
            k8s_cri::v1::PortMapping {
                protocol: Protocol::Tcp as i32,
                container_port: 80,
                host_port: 0,
                host_ip: String::new(),
            },
        ];
        let args = cni_capability_args(&c);
        assert_eq!(
            args["portMappings"],
            json!([{"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}])
        );
        assert!(!cni_capability_args(&config()).contains_key("portMappings"));
    }

    #[test]
    fn host_network_is_refused() {
        let mut c = config();
        c.linux = Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let err = new_sandbox(c, String::new(), &VmConfig::default()).unwrap_err();
        assert!(err.to_string().contains("host network"), "{err}");
    }

    #[test]
    fn vm_size_follows_pod_limits_plus_overhead() {
        let vm = VmConfig::default();
        assert_eq!(
            vm_size(None, &vm),
            VmSize {
                vcpus: vm.default_vcpus,
                mem_mib: vm.default_mem_mib + vm.overhead_mem_mib
            }
        );
        let r = LinuxContainerResources {
            cpu_quota: 150_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: 300 * MIB + 1,
            ..Default::default()
        };
        assert_eq!(
            vm_size(Some(&r), &vm),
            VmSize {
                vcpus: 2,
                mem_mib: 301 + vm.overhead_mem_mib
            }
        );
        let huge = LinuxContainerResources {
            cpu_quota: 1_000_000_000,
            cpu_period: 1,
            ..Default::default()
        };
        assert_eq!(vm_size(Some(&huge), &vm).vcpus, vm.max_vcpus);
    }
}
