//! SetupSandbox: the pod-wide state of the guest (hostname, DNS and hosts
//! files, virtio-fs shares, the pod's `/dev/shm`, sysctls). Everything is
//! validated before the first change.

use std::path::{Path, PathBuf};

use carapace_agent_api::v1::{SetupSandboxRequest, SetupSandboxResponse};
use carapace_agent_api::{POD_SHM_DIR, SANDBOX_FILES_DIR};
use nix::mount::MsFlags;

/// Errors of sandbox setup.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounting virtio-fs tag {tag:?} on {path}: {source}")]
    Mount {
        tag: String,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("mounting the pod's /dev/shm tmpfs on {path}: {source}")]
    ShmMount { path: PathBuf, source: nix::Error },
    #[error("setting the hostname: {0}")]
    Hostname(nix::Error),
}

impl SandboxError {
    pub fn code(&self) -> tonic::Code {
        match self {
            SandboxError::Invalid(_) => tonic::Code::InvalidArgument,
            _ => tonic::Code::Internal,
        }
    }
}

/// A sysctl name: dotted (or slashed) lowercase words, nothing that could
/// leave /proc/sys.
pub fn validate_sysctl_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key.split(['.', '/']).all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("invalid sysctl name {key:?}"))
    }
}

fn validate_hostname(name: &str) -> Result<(), String> {
    if carapace_agent_api::is_valid_hostname(name) {
        Ok(())
    } else {
        Err(format!("invalid hostname {name:?}"))
    }
}

fn validate(req: &SetupSandboxRequest) -> Result<(), SandboxError> {
    let invalid = SandboxError::Invalid;
    validate_hostname(&req.hostname).map_err(invalid)?;
    for fs in &req.shared_filesystems {
        if fs.tag.is_empty() || fs.tag.len() > 36 {
            return Err(invalid(format!("invalid virtio-fs tag {:?}", fs.tag)));
        }
        if !crate::container::is_clean_absolute(Path::new(&fs.mount_point)) || fs.mount_point == "/"
        {
            return Err(invalid(format!(
                "mount point {:?} must be an absolute path without '..'",
                fs.mount_point
            )));
        }
    }
    for key in req.sysctls.keys() {
        validate_sysctl_key(key).map_err(invalid)?;
    }
    Ok(())
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| mp == wanted)
}

/// The pod's `/dev/shm`: containerd's sandbox tmpfs (64 MiB, world-writable
/// with the sticky bit, no set-id programs, devices or executables).
const POD_SHM_FLAGS: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);
const POD_SHM_OPTIONS: &str = "mode=1777,size=65536k";

/// Mounts the pod's `/dev/shm` tmpfs on `path` (created if missing), unless
/// something is mounted there already: a repeated SetupSandbox must not
/// hide what the containers already share.
fn mount_shm(path: &Path) -> Result<(), SandboxError> {
    if is_mount_point(path) {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(|source| SandboxError::Io {
        op: "creating",
        path: path.to_owned(),
        source,
    })?;
    nix::mount::mount(
        Some("shm"),
        path,
        Some("tmpfs"),
        POD_SHM_FLAGS,
        Some(POD_SHM_OPTIONS),
    )
    .map_err(|source| SandboxError::ShmMount {
        path: path.to_owned(),
        source,
    })?;
    tracing::info!("mounted the pod's /dev/shm on {}", path.display());
    Ok(())
}

fn write_file(dir: &Path, name: &str, content: &str) -> Result<String, SandboxError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| SandboxError::Io { op, path, source }
    };
    std::fs::write(&tmp, content).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("renaming", &path))?;
    Ok(path.to_string_lossy().into_owned())
}

/// Applies the request. Shares already mounted at their mount point are
/// left as they are, so a repeated call is harmless.
pub fn setup(req: &SetupSandboxRequest) -> Result<SetupSandboxResponse, SandboxError> {
    validate(req)?;
    let dir = Path::new(SANDBOX_FILES_DIR);
    std::fs::create_dir_all(dir).map_err(|source| SandboxError::Io {
        op: "creating",
        path: dir.to_owned(),
        source,
    })?;
    let mut resp = SetupSandboxResponse::default();
    if !req.hostname.is_empty() {
        nix::unistd::sethostname(&req.hostname).map_err(SandboxError::Hostname)?;
        resp.hostname_path = write_file(dir, "hostname", &format!("{}\n", req.hostname))?;
    }
    if !req.resolv_conf.is_empty() {
        resp.resolv_conf_path = write_file(dir, "resolv.conf", &req.resolv_conf)?;
    }
    if !req.hosts.is_empty() {
        resp.hosts_path = write_file(dir, "hosts", &req.hosts)?;
    }
    for fs in &req.shared_filesystems {
        let path = PathBuf::from(&fs.mount_point);
        if is_mount_point(&path) {
            continue;
        }
        std::fs::create_dir_all(&path).map_err(|source| SandboxError::Io {
            op: "creating",
            path: path.clone(),
            source,
        })?;
        // Not nosuid: the containers' root filesystems live on the share
        // (as submounts, which inherit these flags), and their set-id
        // programs must work as under runc. nodev: the guest has no device
        // cgroup, so a device node in an image must not open guest devices.
        nix::mount::mount(
            Some(fs.tag.as_str()),
            &path,
            Some("virtiofs"),
            MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|source| SandboxError::Mount {
            tag: fs.tag.clone(),
            path: path.clone(),
            source,
        })?;
        tracing::info!("mounted virtio-fs {:?} on {}", fs.tag, path.display());
    }
    mount_shm(Path::new(POD_SHM_DIR))?;
    resp.shm_path = POD_SHM_DIR.to_owned();
    let mut keys: Vec<_> = req.sysctls.iter().collect();
    keys.sort();
    for (key, value) in keys {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        std::fs::write(&path, value).map_err(|source| SandboxError::Io {
            op: "writing sysctl",
            path,
            source,
        })?;
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use carapace_agent_api::v1::SharedFilesystem;

    #[test]
    fn sysctl_names_stay_in_proc_sys() {
        for ok in [
            "net.ipv4.ip_forward",
            "kernel.shm_rmid_forced",
            "net/core/somaxconn",
        ] {
            assert!(validate_sysctl_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            "net..x",
            "../../etc/passwd",
            "net.ipv4.ip forward",
            "/abs",
        ] {
            assert!(validate_sysctl_key(bad).is_err(), "{bad}");
        }
    }

    /// Detaches a test mount, also when the test fails.
    struct Unmount<'a>(&'a Path);

    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            while nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
        }
    }

    /// The mountinfo lines of mounts on `path`.
    fn mounts_on(path: &Path) -> Vec<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(&*path.to_string_lossy()))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn pod_shm_is_a_restricted_tmpfs_mounted_once() {
        assert!(nix::unistd::geteuid().is_root(), "mount tests run as root");
        let dir = tempfile::tempdir().unwrap();
        let shm = dir.path().join("run/shm");
        let _unmount = Unmount(&shm);
        mount_shm(&shm).unwrap();
        let lines = mounts_on(&shm);
        assert_eq!(lines.len(), 1, "{lines:?}");
        // Per-mount options, then (after " - ") type, source, super options.
        let (mount, fs) = lines[0].split_once(" - ").unwrap();
        let flags: Vec<&str> = mount.split(' ').nth(5).unwrap().split(',').collect();
        for want in ["rw", "nosuid", "nodev", "noexec"] {
            assert!(flags.contains(&want), "{want} missing: {}", lines[0]);
        }
        let fs: Vec<&str> = fs.split(' ').collect();
        assert_eq!(&fs[..2], ["tmpfs", "shm"]);
        let super_opts: Vec<&str> = fs[2].split(',').collect();
        assert!(super_opts.contains(&"size=65536k"), "{}", lines[0]);
        // (tmpfs does not list its default mode, 1777: stat tells.)
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&shm).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o1777);

        // A second setup keeps the first tmpfs and what is in it.
        std::fs::write(shm.join("x"), "shared").unwrap();
        mount_shm(&shm).unwrap();
        assert_eq!(mounts_on(&shm).len(), 1);
        assert_eq!(std::fs::read_to_string(shm.join("x")).unwrap(), "shared");
    }

    #[test]
    fn bad_requests_change_nothing() {
        let bad = [
            SetupSandboxRequest {
                hostname: "bad host".into(),
                ..Default::default()
            },
            SetupSandboxRequest {
                shared_filesystems: vec![SharedFilesystem {
                    tag: "pod".into(),
                    mount_point: "/run/../etc".into(),
                }],
                ..Default::default()
            },
            SetupSandboxRequest {
                sysctls: [("../x".to_owned(), "1".to_owned())].into(),
                ..Default::default()
            },
        ];
        for req in bad {
            assert!(matches!(validate(&req), Err(SandboxError::Invalid(_))));
        }
    }
}
