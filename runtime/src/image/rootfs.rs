//! A container's root filesystem on the host: an overlay of the image's
//! unpacked layers (read-only lower dirs, top layer first) with a
//! per-container writable upper dir, mounted at a target path (inside the
//! pod's virtio-fs share). The container holds a lease on its layers so
//! that removing the image does not pull them from under it.
//!
//! The classic `mount(2)` takes all lower dirs in one option string limited
//! to a page (4095 bytes); longer stacks are mounted with the new mount API
//! (`fsopen`/`fsconfig` with one `lowerdir+` per layer, Linux 6.8+), which
//! has no such limit.
//!
//! Host code must never follow symlinks inside a mounted root filesystem:
//! they are the container's, and may point anywhere.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{self, MntFlags, MsFlags};

use super::fsutil;
use super::store::{ImageStore, StoreError};

/// Longest option string `mount(2)` accepts (one page, NUL included).
const MOUNT_DATA_MAX: usize = 4095;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("mounting the overlay root filesystem at {target} ({layers} layers): {source}{hint}")]
    Mount {
        target: PathBuf,
        layers: usize,
        source: io::Error,
        hint: &'static str,
    },
}

fn io_at<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A prepared root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootfs {
    /// Where the merged root filesystem is mounted.
    pub target: PathBuf,
    /// The container's writable layer.
    pub upper: PathBuf,
    pub layers: usize,
}

/// Mounts the root filesystem of container `owner` from `image` at `target`,
/// with its writable layer under `container_dir` (`upper/`, `work/`; same
/// filesystem). Preparing a root filesystem that is already mounted at
/// `target` is a no-op.
pub fn prepare(
    store: &ImageStore,
    owner: &str,
    image: &str,
    container_dir: &Path,
    target: &Path,
) -> Result<Rootfs, RootfsError> {
    let img = store.resolve(image)?;
    let diff_ids: Vec<_> = img
        .record
        .layers
        .iter()
        .map(|l| l.diff_id.clone())
        .collect();
    store.add_lease(owner, &diff_ids)?;
    let result = mount_overlay(&img.layer_dirs, container_dir, target);
    if result.is_err() {
        let _ = store.remove_lease(owner);
    }
    result
}

fn mount_overlay(
    layer_dirs: &[PathBuf],
    container_dir: &Path,
    target: &Path,
) -> Result<Rootfs, RootfsError> {
    // The writable layer can hold set-id files: root only.
    fs::create_dir_all(container_dir).map_err(io_at("creating", container_dir))?;
    fs::set_permissions(container_dir, fs::Permissions::from_mode(0o700))
        .map_err(io_at("restricting", container_dir))?;
    let upper = container_dir.join("upper");
    let work = container_dir.join("work");
    let mut lowers: Vec<PathBuf> = layer_dirs.iter().rev().cloned().collect();
    if lowers.is_empty() {
        // An image without layers: overlay needs one lower dir.
        let empty = container_dir.join("empty");
        fs::create_dir_all(&empty).map_err(io_at("creating", &empty))?;
        lowers.push(empty);
    }
    for d in [&upper, &work, &target.to_path_buf()] {
        fs::create_dir_all(d).map_err(io_at("creating", d))?;
    }
    let rootfs = Rootfs {
        target: target.to_owned(),
        upper: upper.clone(),
        layers: layer_dirs.len(),
    };
    if is_mountpoint(target)? {
        return Ok(rootfs);
    }
    let lowerdir = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let data = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    let mount_err = |source: io::Error, hint| RootfsError::Mount {
        target: target.to_owned(),
        layers: layer_dirs.len(),
        source,
        hint,
    };
    if data.len() <= MOUNT_DATA_MAX
        && !lowers
            .iter()
            .any(|p| p.as_os_str().as_bytes().contains(&b':'))
    {
        mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|e| mount_err(e.into(), ""))?;
    } else {
        mount_with_fsconfig(&lowers, &upper, &work, target).map_err(|e| {
            mount_err(e, " (a layer stack this long needs the kernel's new mount API with lowerdir+, Linux 6.8 or later)")
        })?;
    }
    Ok(rootfs)
}

/// Unmounts and removes container `owner`'s root filesystem and writable
/// layer, drops its lease and collects layers nothing uses any more.
/// Idempotent: absent pieces are fine.
pub async fn teardown(
    store: &ImageStore,
    owner: &str,
    container_dir: &Path,
    target: &Path,
) -> Result<(), RootfsError> {
    if is_mountpoint(target)? {
        if let Err(e) = mount::umount2(target, MntFlags::empty()) {
            tracing::warn!(target = %target.display(), error = %e, "root filesystem busy, detaching it");
            mount::umount2(target, MntFlags::MNT_DETACH)
                .map_err(|e| io_at("unmounting", target)(e.into()))?;
        }
    }
    match fs::remove_dir(target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at("removing", target)(e)),
    }
    for d in ["upper", "work", "empty"] {
        let p = container_dir.join(d);
        fsutil::remove_all(&p).map_err(io_at("removing", &p))?;
    }
    store.remove_lease(owner)?;
    store.gc().await?;
    Ok(())
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> Result<bool, RootfsError> {
    let path = match fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_at("resolving", path)(e)),
    };
    Ok(mount_points()?.contains(&path))
}

/// Every mount point of this mount namespace (per /proc/self/mountinfo).
pub fn mount_points() -> Result<Vec<PathBuf>, RootfsError> {
    let info = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(info).map_err(io_at("reading", info))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|mp| PathBuf::from(std::ffi::OsString::from_vec(unescape_mountinfo(mp))))
        .collect())
}

/// Undoes the octal escapes (`\040` for a space) of /proc/self/mountinfo.
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Mounts the overlay with fsopen/fsconfig/fsmount/move_mount, one
/// `lowerdir+` call per layer (top layer first).
fn mount_with_fsconfig(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> io::Result<()> {
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

    let fstype = c"overlay";
    // SAFETY: fsopen reads a NUL-terminated string and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fs_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let set = |key: &std::ffi::CStr, value: &Path| -> io::Result<()> {
        let v = cstr(value)?;
        // SAFETY: key and value are NUL-terminated and outlive the call; fs_fd is open.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs_fd.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                v.as_ptr(),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::other(format!(
                "{}={}: {}",
                key.to_string_lossy(),
                value.display(),
                io::Error::last_os_error()
            )));
        }
        Ok(())
    };
    for l in lowers {
        set(c"lowerdir+", l)?;
    }
    set(c"upperdir", upper)?;
    set(c"workdir", work)?;
    // SAFETY: null key/value are what FSCONFIG_CMD_CREATE expects; fs_fd is open.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs_fd.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fsmount takes the configured fs fd and returns a new mount fd or -1.
    let mfd = unsafe { libc::syscall(libc::SYS_fsmount, fs_fd.as_raw_fd(), FSMOUNT_CLOEXEC, 0) };
    if mfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `mfd` is a new descriptor that nothing else owns.
    let mnt_fd = unsafe { OwnedFd::from_raw_fd(mfd as i32) };
    let t = cstr(target)?;
    // SAFETY: the empty string and target are NUL-terminated; mnt_fd is open.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt_fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[path = "rootfs_tests.rs"]
mod tests;
