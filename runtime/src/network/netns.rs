//! Pod network namespaces, created and pinned by the daemon.
//!
//! A namespace is created by a short-lived thread that unshares its network
//! namespace and bind-mounts `/proc/thread-self/ns/net` onto a file in the
//! configured directory (as `ip netns add` does). The bind mount keeps the
//! namespace alive after the thread exits, across daemon restarts, until
//! [`remove`] unmounts it.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;

use super::NetworkError;

/// Where the namespace of pod `id` is pinned under `dir`.
pub fn path(dir: &Path, id: &str) -> PathBuf {
    dir.join(id)
}

/// Creates a new network namespace pinned at `path`. Fails if `path`
/// exists.
pub fn create(path: &Path) -> Result<(), NetworkError> {
    let io = |what: String| move |source| NetworkError::Io { what, source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))?;
    let target = path.to_owned();
    // unshare(2) changes only the calling thread's namespace: a fresh
    // thread does it, so no thread of the runtime ever leaves the host's.
    let result = std::thread::spawn(move || -> nix::Result<()> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .join()
    .unwrap_or(Err(nix::Error::EIO));
    if let Err(e) = result {
        let _ = std::fs::remove_file(path);
        return Err(NetworkError::Netns {
            what: format!("creating network namespace {}", path.display()),
            source: e,
        });
    }
    Ok(())
}

/// Unmounts and deletes the namespace file; a missing file is not an error.
pub fn remove(path: &Path) -> Result<(), NetworkError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::ENOENT) | Err(nix::Error::EINVAL) => {}
        Err(e) => {
            return Err(NetworkError::Netns {
                what: format!("unmounting {}", path.display()),
                source: e,
            })
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetworkError::Io {
            what: format!("removing {}", path.display()),
            source,
        }),
    }
}

/// Runs `f` on a new thread that has entered the namespace at `path`.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, NetworkError> + Send + 'static,
) -> Result<T, NetworkError> {
    let file = std::fs::File::open(path).map_err(|source| NetworkError::Io {
        what: format!("opening network namespace {}", path.display()),
        source,
    })?;
    let what = format!("entering network namespace {}", path.display());
    std::thread::spawn(move || {
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetworkError::Netns { what, source })?;
        f()
    })
    .join()
    .unwrap_or_else(|_| {
        Err(NetworkError::Netns {
            what: "a thread in the pod network namespace panicked".into(),
            source: nix::Error::EIO,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn create_pins_a_new_namespace_and_remove_is_idempotent() {
        assert!(nix::unistd::geteuid().is_root(), "netns tests run as root");
        let dir = tempfile::tempdir().unwrap();
        let ns = path(dir.path(), "pod1");
        create(&ns).unwrap();
        let host = inode(Path::new("/proc/self/ns/net"));
        assert_ne!(inode(&ns), host, "a new namespace, not the host's");
        assert!(
            create(&ns).is_err(),
            "an existing namespace is not replaced"
        );
        let inside = run_in(&ns, || Ok(inode(Path::new("/proc/thread-self/ns/net")))).unwrap();
        assert_eq!(inside, inode(&ns));
        assert_eq!(inode(Path::new("/proc/thread-self/ns/net")), host);
        remove(&ns).unwrap();
        assert!(!ns.exists());
        remove(&ns).unwrap();
    }
}
