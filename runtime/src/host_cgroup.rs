//! The host cgroup of a pod's VM: kubelet creates a cgroup per pod
//! (`PodSandboxConfig.linux.cgroup_parent`, cgroupfs driver) and accounts
//! and limits the pod through it, so the VM's processes (QEMU, its vsock
//! backend, virtiofsd) must live inside it. They go into a leaf
//! `carapace-<id>` under the pod's cgroup (cgroup v2 allows processes only
//! in leaves once controllers are enabled below).
//!
//! Only the unified (v2) hierarchy is supported. On a v1 or hybrid host the
//! VM's processes stay in the daemon's cgroup, with a warning: kubelet then
//! cannot account them to the pod.

use std::io;
use std::path::{Component, Path, PathBuf};

/// Errors placing a VM in its pod's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup_parent {0:?} is not a plain path below the cgroup root")]
    InvalidParent(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Whether `root` is a cgroup v2 (unified) hierarchy.
pub fn is_unified(root: &Path) -> bool {
    root.join("cgroup.controllers").is_file()
}

/// The leaf cgroup for sandbox `id` under `parent`, created; `None` when
/// kubelet gave no parent or the host has no unified hierarchy.
pub fn create(root: &Path, parent: &str, id: &str) -> Result<Option<PathBuf>, CgroupError> {
    if parent.is_empty() {
        return Ok(None);
    }
    let relative = Path::new(parent.trim_start_matches('/'));
    if !relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(CgroupError::InvalidParent(parent.to_owned()));
    }
    if !is_unified(root) {
        tracing::warn!(
            root = %root.display(),
            "no cgroup v2 hierarchy: the pod VM's processes stay in the daemon's cgroup"
        );
        return Ok(None);
    }
    let path = root
        .join(relative)
        .join(format!("carapace-{}", &id[..id.len().min(16)]));
    std::fs::create_dir_all(&path).map_err(|source| CgroupError::Io {
        what: "creating",
        path: path.clone(),
        source,
    })?;
    Ok(Some(path))
}

/// Moves process `pid` into the cgroup at `path`.
pub fn add(path: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = path.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(|source| CgroupError::Io {
        what: "writing",
        path: procs,
        source,
    })
}

/// Removes the cgroup (its processes must have exited). Idempotent. A
/// process killed a moment ago may still be leaving it (`EBUSY`): retried
/// for up to two seconds.
pub fn remove(path: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "removing the pod VM's cgroup: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_under_the_parent_on_v2_only() {
        let root = tempfile::tempdir().unwrap();
        let id = "0123456789abcdef0123";
        // Not unified: nothing is created.
        assert_eq!(create(root.path(), "/kubepods/pod1", id).unwrap(), None);
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory").unwrap();
        assert_eq!(create(root.path(), "", id).unwrap(), None);
        let leaf = create(root.path(), "/kubepods/burstable/pod1", id)
            .unwrap()
            .unwrap();
        assert_eq!(
            leaf,
            root.path()
                .join("kubepods/burstable/pod1/carapace-0123456789abcdef")
        );
        assert!(leaf.is_dir());
        add(&leaf, 42).unwrap();
        assert_eq!(
            std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap(),
            "42"
        );
        std::fs::remove_file(leaf.join("cgroup.procs")).unwrap();
        remove(&leaf);
        assert!(!leaf.exists());
        remove(&leaf);
    }

    #[test]
    fn parents_that_leave_the_root_are_refused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "").unwrap();
        for bad in ["../etc", "/kubepods/../../x"] {
            assert!(
                matches!(
                    create(root.path(), bad, "abc"),
                    Err(CgroupError::InvalidParent(_))
                ),
                "{bad}"
            );
        }
    }
}
