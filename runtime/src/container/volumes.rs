//! Host paths of a container's CRI mounts (volumes, kubelet's /etc/hosts,
//! service account tokens...) made visible in the guest: each is
//! bind-mounted under the container's directory in the pod's virtio-fs
//! share, and the agent binds it from there into the container.
//!
//! The host paths come from kubelet, which the daemon trusts; what the
//! container later writes into a read-write volume stays inside that
//! volume's directory. Read-only mounts are made read-only on the host
//! already, so a guest cannot write through them whatever it asks
//! virtiofsd. That holds for the volume's own mount: mounts below it keep
//! their flags, the non-recursive read-only CRI asks for (recursive
//! read-only is refused, see `spec::check_mounts`).

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{self, MntFlags, MsFlags};

use super::record::MountRecord;

/// Errors preparing a mount.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("mount {container_path}: host path {host_path:?} {what}: {source}")]
    Io {
        container_path: String,
        host_path: String,
        what: &'static str,
        source: io::Error,
    },
}

/// Where mount number `index` of a container appears in its share dir.
pub fn share_target(share_dir: &Path, index: usize) -> PathBuf {
    share_dir.join("mounts").join(index.to_string())
}

/// Binds every mount's host path to its target under `share_dir`. A
/// missing host path is created as a directory (as containerd does).
/// On error, what was already bound is undone.
pub fn bind_all(share_dir: &Path, mounts: &[MountRecord]) -> Result<(), VolumeError> {
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = bind(&share_target(share_dir, i), m) {
            unbind_all(share_dir, i);
            return Err(e);
        }
    }
    Ok(())
}

fn bind(target: &Path, m: &MountRecord) -> Result<(), VolumeError> {
    let err = |what: &'static str| {
        move |source: io::Error| VolumeError::Io {
            container_path: m.container_path.clone(),
            host_path: m.host_path.clone(),
            what,
            source,
        }
    };
    let source = Path::new(&m.host_path);
    let meta = match std::fs::metadata(source) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(source).map_err(err("cannot be created"))?;
            std::fs::metadata(source).map_err(err("cannot be read"))?
        }
        Err(e) => return Err(err("cannot be read")(e)),
    };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(err("has no place in the pod share"))?;
    }
    if meta.is_dir() {
        std::fs::create_dir_all(target).map_err(err("has no place in the pod share"))?;
    } else {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map_err(err("has no place in the pod share"))?;
    }
    mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err("cannot be bound")(e.into()))?;
    if m.readonly {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            let _ = mount::umount2(target, MntFlags::MNT_DETACH);
            return Err(err("cannot be made read-only")(e.into()));
        }
    }
    Ok(())
}

/// Undoes the binds of the first `count` mounts and removes their targets.
/// Idempotent: absent targets are fine.
pub fn unbind_all(share_dir: &Path, count: usize) {
    for i in 0..count {
        let target = share_target(share_dir, i);
        // Detach: a busy mount (virtiofsd may hold it open) goes away once
        // released rather than failing the removal.
        let _ = mount::umount2(&target, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&target).or_else(|_| std::fs::remove_file(&target));
    }
    let _ = std::fs::remove_dir(share_dir.join("mounts"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn rec(container_path: &str, host: &Path, readonly: bool) -> MountRecord {
        MountRecord {
            container_path: container_path.into(),
            host_path: host.display().to_string(),
            readonly,
            selinux_relabel: false,
            propagation: 0,
        }
    }

    #[test]
    fn directories_and_files_are_bound_and_undone() {
        assert!(is_root(), "mount tests run as root");
        let host = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let vol = host.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("a"), b"data").unwrap();
        let file = host.path().join("hosts");
        std::fs::write(&file, b"127.0.0.1 localhost\n").unwrap();
        let missing = host.path().join("new/dir");
        let mounts = [
            rec("/data", &vol, false),
            rec("/etc/hosts", &file, true),
            rec("/cache", &missing, false),
        ];
        bind_all(share.path(), &mounts).unwrap();
        let t0 = share_target(share.path(), 0);
        assert_eq!(std::fs::read(t0.join("a")).unwrap(), b"data");
        std::fs::write(t0.join("b"), b"from guest").unwrap();
        assert_eq!(std::fs::read(vol.join("b")).unwrap(), b"from guest");
        let t1 = share_target(share.path(), 1);
        assert_eq!(
            std::fs::read_to_string(&t1).unwrap(),
            "127.0.0.1 localhost\n"
        );
        let ro = std::fs::write(&t1, b"x").unwrap_err();
        assert_eq!(ro.raw_os_error(), Some(libc::EROFS));
        assert!(missing.is_dir());
        unbind_all(share.path(), mounts.len());
        assert!(!share.path().join("mounts").exists());
        // The host's data is untouched.
        assert_eq!(std::fs::read(vol.join("a")).unwrap(), b"data");
        assert!(file.is_file());
    }

    #[test]
    fn a_failed_bind_undoes_the_earlier_ones() {
        assert!(is_root(), "mount tests run as root");
        let host = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let vol = host.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        // A host path under a regular file cannot be created.
        let file = host.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let mounts = [
            rec("/ok", &vol, false),
            rec("/bad", &file.join("sub"), false),
        ];
        let err = bind_all(share.path(), &mounts).unwrap_err();
        assert!(err.to_string().contains("/bad"), "{err}");
        assert!(!share_target(share.path(), 0).exists());
    }
}
