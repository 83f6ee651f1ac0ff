//! What the daemon records about a pod sandbox.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::vm::VmHandle;

/// The pod's identity as kubelet gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
}

impl PodMeta {
    /// The name under which the sandbox is reserved: one sandbox per
    /// (name, namespace, uid, attempt), as containerd does.
    pub fn reserved_name(&self) -> String {
        format!(
            "{}_{}_{}_{}",
            self.name, self.namespace, self.uid, self.attempt
        )
    }
}

/// Lifecycle state as CRI sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    Ready,
    NotReady,
}

/// The size of the pod's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSize {
    pub vcpus: u8,
    pub mem_mib: u32,
}

/// One pod sandbox, as stored on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub meta: PodMeta,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub runtime_handler: String,
    pub log_directory: String,
    pub hostname: String,
    /// Nanoseconds since the Unix epoch.
    pub created_at_ns: i64,
    pub state: SandboxState,
    /// Why the sandbox is not ready, when it is not.
    pub reason: Option<String>,
    pub size: VmSize,
    pub run_dir: PathBuf,
    /// The VM's processes while it runs; `None` once stopped.
    pub vm: Option<VmHandle>,
    /// Guest paths of the files the agent wrote for the pod.
    #[serde(default)]
    pub files: SandboxFiles,
    /// The host cgroup holding the VM's processes, when there is one.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The pod's network until CNI DEL succeeded; `None` for a pod without
    /// a network (no CNI config and `network.required = false`).
    #[serde(default)]
    pub network: Option<crate::network::PodNetwork>,
}

impl SandboxRecord {
    /// The host directory shared with the guest over virtio-fs.
    pub fn share_dir(&self) -> PathBuf {
        self.run_dir.join("shared")
    }
}

/// Guest paths of the pod's hostname, resolv.conf and hosts files and of
/// its `/dev/shm` (empty when the agent made none), as the agent's
/// SetupSandbox answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxFiles {
    pub hostname: String,
    pub resolv_conf: String,
    pub hosts: String,
    /// Empty in the records of pods whose agent predates it: their
    /// containers keep a `/dev/shm` of their own.
    #[serde(default)]
    pub shm: String,
}
