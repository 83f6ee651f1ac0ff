//! The container's mounts: the defaults, the CRI bind mounts and the pod's
//! files, and the masked and read-only path lists.

use std::collections::BTreeSet;

use carapace_agent_api::v1::NamespaceMode;
use k8s_cri::v1 as cri;
use serde_json::{json, Value};

use super::{invalid, SpecError, SpecInput};

/// A container path as the mount logic compares it: absolute, no `..`, no
/// `.` or empty components, no trailing slash.
fn clean_path(field: &str, path: &str) -> Result<String, SpecError> {
    if !path.starts_with('/') {
        return Err(invalid(field, format!("{path:?} is not an absolute path")));
    }
    if path.contains('\0') {
        return Err(invalid(field, format!("{path:?} contains a NUL byte")));
    }
    let mut clean = String::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(invalid(field, format!("{path:?} contains \"..\"")));
        }
        clean.push('/');
        clean.push_str(part);
    }
    if clean.is_empty() {
        clean.push('/');
    }
    Ok(clean)
}

/// Number of components, for containerd's mount order.
fn depth(path: &str) -> usize {
    path.matches('/').count()
}

/// A mount the container gets from outside its image.
struct BindMount {
    destination: String,
    source: String,
    readonly: bool,
    propagation: &'static str,
    /// Flags the bind must have whatever its source's.
    flags: &'static [&'static str],
}

/// The default mounts (containerd's, without /run, with cgroup2).
fn default_mounts(privileged: bool) -> Vec<Value> {
    let sys_mode = if privileged { "rw" } else { "ro" };
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", sys_mode]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup2", "source": "cgroup2",
               "options": ["nosuid", "noexec", "nodev", "relatime", sys_mode]}),
    ]
}

/// The spec's mounts and the rootfs propagation they need.
pub(super) fn mounts(
    input: &SpecInput,
    sc: &cri::LinuxContainerSecurityContext,
    ipc_mode: NamespaceMode,
) -> Result<(Vec<Value>, Option<&'static str>), SpecError> {
    let mut binds = Vec::new();
    for (i, m) in input.mounts.iter().enumerate() {
        let destination = clean_path(&format!("mounts[{i}].container_path"), &m.container_path)?;
        if destination == "/" {
            return Err(invalid(
                format!("mounts[{i}].container_path"),
                "cannot mount over the container's root",
            ));
        }
        let source = clean_path(&format!("mounts[{i}] guest source"), &m.guest_source)?;
        let propagation = match cri::MountPropagation::try_from(m.propagation) {
            Ok(cri::MountPropagation::PropagationPrivate) => "rprivate",
            Ok(cri::MountPropagation::PropagationHostToContainer) => "rslave",
            Ok(cri::MountPropagation::PropagationBidirectional) => "rshared",
            Err(_) => {
                return Err(invalid(
                    format!("mounts[{i}].propagation"),
                    format!("unknown mount propagation {}", m.propagation),
                ))
            }
        };
        binds.push(BindMount {
            destination,
            source,
            readonly: m.readonly,
            propagation,
            flags: &[],
        });
    }
    let files = &input.sandbox_files;
    for (destination, source) in [
        ("/etc/hostname", &files.hostname),
        ("/etc/hosts", &files.hosts),
        ("/etc/resolv.conf", &files.resolv_conf),
    ] {
        if source.is_empty() || binds.iter().any(|b| b.destination == destination) {
            continue;
        }
        let source = clean_path(&format!("sandbox file for {destination}"), source)?;
        binds.push(BindMount {
            destination: destination.to_owned(),
            source,
            readonly: sc.readonly_rootfs,
            propagation: "rprivate",
            flags: &[],
        });
    }
    // The pod's /dev/shm for a container in the pod's IPC namespace, so
    // that POSIX shared memory is shared as System V IPC is (containerd
    // binds the sandbox's, writable even with a read-only rootfs). A
    // container with an IPC namespace of its own keeps the default tmpfs.
    let shm_supplied = binds.iter().any(|b| b.destination == "/dev/shm");
    if ipc_mode == NamespaceMode::Pod && !files.shm.is_empty() && !shm_supplied {
        binds.push(BindMount {
            destination: "/dev/shm".to_owned(),
            source: clean_path("sandbox /dev/shm", &files.shm)?,
            readonly: false,
            propagation: "rprivate",
            flags: &["nosuid", "nodev", "noexec"],
        });
    }
    // Parents before children, so that no mount hides another.
    binds.sort_by_key(|b| depth(&b.destination));

    let supplied: BTreeSet<&str> = binds.iter().map(|b| b.destination.as_str()).collect();
    let dev_supplied = supplied.contains("/dev");
    let mut out: Vec<Value> = default_mounts(sc.privileged)
        .into_iter()
        .filter(|m| {
            let dest = m["destination"].as_str().unwrap_or_default();
            !(supplied.contains(dest) || dev_supplied && dest.starts_with("/dev/"))
        })
        .collect();
    let mut rootfs_propagation = None;
    for b in &binds {
        match b.propagation {
            "rshared" => rootfs_propagation = Some("rshared"),
            "rslave" if rootfs_propagation.is_none() => rootfs_propagation = Some("rslave"),
            _ => {}
        }
        let mut options = vec!["rbind", b.propagation];
        options.extend(b.flags);
        options.push(if b.readonly { "ro" } else { "rw" });
        out.push(json!({
            "destination": b.destination,
            "type": "bind",
            "source": b.source,
            "options": options,
        }));
    }
    Ok((out, rootfs_propagation))
}

/// CRI's masked or read-only paths, or containerd's defaults when it sends
/// none.
pub(super) fn path_list(
    field: &str,
    given: &[String],
    defaults: &[&str],
) -> Result<Vec<String>, SpecError> {
    if given.is_empty() {
        return Ok(defaults.iter().map(|p| p.to_string()).collect());
    }
    given.iter().map(|p| clean_path(field, p)).collect()
}
