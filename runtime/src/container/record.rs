//! What the daemon records about a container.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Lifecycle state as CRI sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
}

/// A CRI mount of the container, as requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub container_path: String,
    pub host_path: String,
    pub readonly: bool,
    pub selinux_relabel: bool,
    /// CRI `MountPropagation`.
    pub propagation: i32,
}

/// A process's uid, primary gid and supplementary groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// One container, as stored on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    pub name: String,
    pub attempt: u32,
    /// The image as the request named it.
    pub image: String,
    /// The image ID (config digest).
    pub image_id: String,
    /// The image's repo digest when known, else its ID (CRI `image_ref`).
    pub image_ref: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Absolute path of the CRI log file; `None` when kubelet asked for none.
    pub log_path: Option<PathBuf>,
    pub tty: bool,
    pub stdin: bool,
    pub stdin_once: bool,
    pub state: ContainerState,
    /// Nanoseconds since the Unix epoch; 0 until it happened.
    pub created_at_ns: i64,
    pub started_at_ns: i64,
    pub finished_at_ns: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub mounts: Vec<MountRecord>,
    /// The container's writable layer on the host (`upper/`, `work/`).
    pub layer_dir: PathBuf,
    /// The container's directory in the pod's virtio-fs share (its
    /// `rootfs/` mount point and volume bind targets).
    pub share_dir: PathBuf,
    /// The container's OCI `process` (JSON) that execs start from.
    pub process_json: String,
    /// The user name the agent resolves, when the spec named one.
    #[serde(default)]
    pub username: String,
    /// Whether the agent takes the gid from the container's /etc/passwd
    /// (a numeric user without a group); execs ask for the same.
    #[serde(default)]
    pub gid_from_passwd: bool,
    /// The group the agent sets (a name or a decimal gid), when the spec
    /// has one it must resolve; execs ask for the same.
    #[serde(default)]
    pub group: String,
    /// SupplementalGroupsPolicy Strict, for execs too.
    #[serde(default)]
    pub strict_supplemental_groups: bool,
    /// The identity the agent gave the container's process, when it said.
    #[serde(default)]
    pub user: Option<ProcessIdentity>,
    /// The signal that stops it (the image's StopSignal), as a number.
    pub stop_signal: u32,
}

impl ContainerRecord {
    /// The name under which the container is reserved: one per (name,
    /// attempt) in a sandbox, as containerd does.
    pub fn reserved_name(&self) -> String {
        reserved_name(&self.sandbox_id, &self.name, self.attempt)
    }
}

pub fn reserved_name(sandbox_id: &str, name: &str, attempt: u32) -> String {
    format!("{name}_{sandbox_id}_{attempt}")
}
