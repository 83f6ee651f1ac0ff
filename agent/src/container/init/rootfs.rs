//! The container's root filesystem, set up inside its new mount namespace:
//! propagation cut from the agent, the rootfs bind-mounted onto itself, the
//! spec's mounts (procfs, sysfs, /dev tmpfs, devpts, shm, mqueue, volumes)
//! resolved inside the rootfs, the default device nodes, hostname and
//! sysctls, masked and read-only paths, then `pivot_root` and, if asked, a
//! read-only root.
//!
//! Everything before `pivot_root` addresses paths under the rootfs, so the
//! whole sequence runs against the [`Syscall`] test double on a plain
//! directory.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag};
use serde::{Deserialize, Serialize};

use super::syscall::Syscall;

/// Errors setting up the root filesystem; each names the step and path.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{op} {path}: {source}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("too many levels of symbolic links resolving {0} in the rootfs")]
    SymlinkLoop(PathBuf),
    #[error("mount of {destination}: {reason}")]
    BadMount {
        destination: PathBuf,
        reason: String,
    },
}

type Result<T> = std::result::Result<T, RootfsError>;

fn sys<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> RootfsError + 'a {
    move |source| RootfsError::Sys {
        op,
        path: path.to_owned(),
        source,
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// What the container init needs to build the root filesystem.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RootfsConfig {
    pub rootfs: PathBuf,
    pub mounts: Vec<oci_spec::runtime::Mount>,
    pub devices: Vec<oci_spec::runtime::LinuxDevice>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub readonly: bool,
    pub hostname: Option<String>,
    pub sysctl: BTreeMap<String, String>,
    /// `linux.rootfsPropagation`; rslave when unset.
    pub propagation: Option<String>,
    /// The terminal's slave device (agent-side path), bound on /dev/console.
    pub console: Option<PathBuf>,
}

/// Resolves `path` as if `root` were `/`: symbolic links (absolute ones
/// relative to `root`) and `..` never lead outside `root`. Components that
/// do not exist yet are taken literally.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf> {
    fn components(p: &Path) -> Vec<OsString> {
        p.components()
            .filter_map(|c| match c {
                Component::ParentDir => Some("..".into()),
                Component::Normal(n) => Some(n.to_owned()),
                _ => None,
            })
            .collect()
    }
    let mut resolved = PathBuf::new(); // relative to root
    let mut todo: VecDeque<OsString> = components(path).into();
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&c);
        let full = root.join(&candidate);
        match std::fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(RootfsError::SymlinkLoop(path.to_owned()));
                }
                let target = std::fs::read_link(&full).map_err(io("readlink", &full))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for comp in components(&target).into_iter().rev() {
                    todo.push_front(comp);
                }
            }
            _ => resolved = candidate,
        }
    }
    Ok(root.join(resolved))
}

/// Flags and data from fstab-style options.
#[derive(Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub propagation: MsFlags,
    pub data: Vec<String>,
    pub bind: bool,
    pub recursive: bool,
}

pub fn parse_options(options: &[String]) -> MountOptions {
    let mut o = MountOptions {
        flags: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: Vec::new(),
        bind: false,
        recursive: false,
    };
    for opt in options {
        let (set, clear, prop) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty(), MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty(), MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty(), MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty(), MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty(), MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty(), MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty(), MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty(), MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty(), MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty(), MsFlags::empty()),
            "bind" => {
                o.bind = true;
                continue;
            }
            "rbind" => {
                o.bind = true;
                o.recursive = true;
                continue;
            }
            "private" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_PRIVATE),
            "rprivate" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            ),
            "shared" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SHARED),
            "rshared" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SHARED | MsFlags::MS_REC,
            ),
            "slave" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SLAVE),
            "rslave" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
            ),
            "unbindable" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_UNBINDABLE),
            "runbindable" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
            ),
            other => {
                o.data.push(other.to_owned());
                continue;
            }
        };
        o.flags = (o.flags | set) - clear;
        o.propagation |= prop;
    }
    o
}

fn propagation_flags(name: Option<&str>) -> std::result::Result<MsFlags, String> {
    Ok(match name.unwrap_or("rslave") {
        "" | "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "private" => MsFlags::MS_PRIVATE,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        other => return Err(format!("unknown rootfs propagation {other:?}")),
    })
}

fn create_dir_all(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(io("mkdir", path))
}

/// Creates an empty file to bind a non-directory on (and its parents).
fn create_file(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(()),
        Err(_) => std::fs::File::create(path)
            .map(drop)
            .map_err(io("create", path)),
    }
}

const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

const DEV_SYMLINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
    ("/proc/kcore", "core"),
];

/// Builds the root filesystem and pivots into it. On return the process's
/// root and working directory are the container's `/`.
pub fn setup(sc: &dyn Syscall, cfg: &RootfsConfig) -> Result<()> {
    let rootfs = &cfg.rootfs;
    let propagation =
        propagation_flags(cfg.propagation.as_deref()).map_err(|reason| RootfsError::BadMount {
            destination: "/".into(),
            reason,
        })?;
    // Nothing mounted from here on may reach the agent's namespace.
    sc.mount(None, Path::new("/"), None, propagation, None)
        .map_err(sys("set propagation of", Path::new("/")))?;
    // pivot_root needs the new root to be a mount point.
    sc.mount(
        Some(rootfs),
        rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .map_err(sys("bind-mount rootfs", rootfs))?;

    let mut dev_is_tmpfs = false;
    for m in &cfg.mounts {
        mount_one(sc, rootfs, m)?;
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs") {
            dev_is_tmpfs = true;
        }
    }
    if dev_is_tmpfs {
        create_default_devices(sc, rootfs)?;
    }
    for d in &cfg.devices {
        create_device(sc, rootfs, d)?;
    }
    if let Some(console) = &cfg.console {
        let target = resolve_in_root(rootfs, Path::new("/dev/console"))?;
        create_file(&target)?;
        sc.mount(Some(console), &target, None, MsFlags::MS_BIND, None)
            .map_err(sys("bind terminal on", &target))?;
    }
    if let Some(name) = &cfg.hostname {
        sc.sethostname(name)
            .map_err(sys("sethostname", Path::new(name)))?;
    }
    for (key, value) in &cfg.sysctl {
        let path = rootfs.join("proc/sys").join(key.replace('.', "/"));
        std::fs::write(&path, value).map_err(io("write sysctl", &path))?;
    }
    for p in &cfg.masked_paths {
        mask_path(sc, rootfs, Path::new(p))?;
    }
    for p in &cfg.readonly_paths {
        readonly_path(sc, rootfs, Path::new(p))?;
    }

    sc.chdir(rootfs).map_err(sys("chdir", rootfs))?;
    sc.pivot_root(Path::new("."), Path::new("."))
        .map_err(sys("pivot_root", rootfs))?;
    // The old root is now stacked under "."; cut it loose and drop it.
    sc.mount(
        None,
        Path::new("."),
        None,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None,
    )
    .map_err(sys("set propagation of old root", Path::new("/")))?;
    sc.umount2(Path::new("."), MntFlags::MNT_DETACH)
        .map_err(sys("unmount old root", Path::new("/")))?;
    sc.chdir(Path::new("/"))
        .map_err(sys("chdir", Path::new("/")))?;
    if cfg.readonly {
        sc.mount(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )
        .map_err(sys("remount read-only", Path::new("/")))?;
    }
    Ok(())
}

fn mount_one(sc: &dyn Syscall, rootfs: &Path, m: &oci_spec::runtime::Mount) -> Result<()> {
    let dest_in_spec = m.destination();
    if !dest_in_spec.is_absolute() {
        return Err(RootfsError::BadMount {
            destination: dest_in_spec.clone(),
            reason: "destination is not absolute".into(),
        });
    }
    let dest = resolve_in_root(rootfs, dest_in_spec)?;
    let opts = parse_options(m.options().as_deref().unwrap_or(&[]));
    let typ = m.typ().as_deref().unwrap_or("");
    let data = opts.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    if opts.bind || typ == "bind" {
        let source = m.source().as_deref().ok_or_else(|| RootfsError::BadMount {
            destination: dest_in_spec.clone(),
            reason: "bind mount without a source".into(),
        })?;
        let meta = std::fs::metadata(source).map_err(io("stat bind source", source))?;
        if meta.is_dir() {
            create_dir_all(&dest)?;
        } else {
            create_file(&dest)?;
        }
        let mut flags = MsFlags::MS_BIND;
        if opts.recursive {
            flags |= MsFlags::MS_REC;
        }
        sc.mount(Some(source), &dest, None, flags, None)
            .map_err(sys("bind-mount", &dest))?;
        // Bind mounts take their flags only on a remount.
        if !opts.flags.is_empty() {
            sc.mount(
                None,
                &dest,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | opts.flags,
                None,
            )
            .map_err(sys("remount", &dest))?;
        }
    } else {
        create_dir_all(&dest)?;
        // Only cgroup v2 exists in the guest.
        let fstype = if typ == "cgroup" { "cgroup2" } else { typ };
        if fstype.is_empty() {
            return Err(RootfsError::BadMount {
                destination: dest_in_spec.clone(),
                reason: "no filesystem type".into(),
            });
        }
        let source = m.source().clone().unwrap_or_else(|| PathBuf::from(fstype));
        sc.mount(Some(&source), &dest, Some(fstype), opts.flags, data)
            .map_err(sys("mount", &dest))?;
    }
    if !opts.propagation.is_empty() {
        sc.mount(None, &dest, None, opts.propagation, None)
            .map_err(sys("set propagation of", &dest))?;
    }
    Ok(())
}

fn create_default_devices(sc: &dyn Syscall, rootfs: &Path) -> Result<()> {
    let dev = rootfs.join("dev");
    for (name, major, minor) in DEFAULT_DEVICES {
        let path = dev.join(name);
        sc.mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(*major, *minor),
        )
        .map_err(sys("mknod", &path))?;
        // mknod is subject to the umask.
        set_mode(&path, 0o666)?;
    }
    for (target, name) in DEV_SYMLINKS {
        let link = dev.join(name);
        match std::os::unix::fs::symlink(target, &link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("symlink", &link)(e)),
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", path))
}

fn create_device(
    sc: &dyn Syscall,
    rootfs: &Path,
    d: &oci_spec::runtime::LinuxDevice,
) -> Result<()> {
    use oci_spec::runtime::LinuxDeviceType;
    let path = resolve_in_root(rootfs, d.path())?;
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(RootfsError::BadMount {
                destination: d.path().clone(),
                reason: "device type 'a' is not a node".into(),
            })
        }
    };
    if let Some(parent) = path.parent() {
        create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(&path);
    let dev = nix::sys::stat::makedev(
        u64::try_from(d.major()).unwrap_or(0),
        u64::try_from(d.minor()).unwrap_or(0),
    );
    let mode = d.file_mode().unwrap_or(0o666);
    sc.mknod(&path, kind, Mode::from_bits_truncate(mode), dev)
        .map_err(sys("mknod", &path))?;
    set_mode(&path, mode)?;
    if d.uid().is_some() || d.gid().is_some() {
        std::os::unix::fs::lchown(&path, d.uid(), d.gid()).map_err(io("chown", &path))?;
    }
    Ok(())
}

/// Hides a path: a directory under an empty read-only tmpfs, anything else
/// under /dev/null. Paths the rootfs does not have are skipped.
fn mask_path(sc: &dyn Syscall, rootfs: &Path, p: &Path) -> Result<()> {
    let path = resolve_in_root(rootfs, p)?;
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(());
    };
    if meta.is_dir() {
        sc.mount(
            Some(Path::new("tmpfs")),
            &path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None,
        )
        .map_err(sys("mask", &path))
    } else {
        sc.mount(
            Some(Path::new("/dev/null")),
            &path,
            None,
            MsFlags::MS_BIND,
            None,
        )
        .map_err(sys("mask", &path))
    }
}

/// Makes a path read-only with a bind mount onto itself.
fn readonly_path(sc: &dyn Syscall, rootfs: &Path, p: &Path) -> Result<()> {
    let path = resolve_in_root(rootfs, p)?;
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(());
    }
    sc.mount(
        Some(&path),
        &path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .map_err(sys("bind read-only path", &path))?;
    sc.mount(
        None,
        &path,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None,
    )
    .map_err(sys("remount read-only", &path))
}

#[cfg(test)]
mod tests {
    use super::super::syscall::{Call, RecordingSyscall};
    use super::*;

    #[test]
    fn resolution_stays_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("etc/real")).unwrap();
        std::os::unix::fs::symlink("/etc/real", r.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../", r.join("etc/up")).unwrap();
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert_eq!(
            resolve_in_root(r, Path::new("/abs/x")).unwrap(),
            r.join("etc/real/x")
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/etc/up/etc/passwd")).unwrap(),
            r.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/../../tmp")).unwrap(),
            r.join("tmp")
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/new/dir")).unwrap(),
            r.join("new/dir")
        );
        assert!(matches!(
            resolve_in_root(r, Path::new("/loop/x")),
            Err(RootfsError::SymlinkLoop(_))
        ));
    }

    #[test]
    fn parses_mount_options() {
        let opts: Vec<String> = [
            "rbind", "ro", "nosuid", "rw", "rslave", "mode=755", "size=1m",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let o = parse_options(&opts);
        assert!(o.bind && o.recursive);
        assert_eq!(o.flags, MsFlags::MS_NOSUID);
        assert_eq!(o.propagation, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert_eq!(o.data, vec!["mode=755", "size=1m"]);
    }

    fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> oci_spec::runtime::Mount {
        oci_spec::runtime::MountBuilder::default()
            .destination(dest)
            .typ(typ)
            .source(source)
            .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .build()
            .unwrap()
    }

    #[test]
    fn setup_mounts_in_order_and_pivots_last() {
        let root = tempfile::tempdir().unwrap();
        let rootfs = root.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("proc/sys")).unwrap();
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(rootfs.join("etc/secret"), "x").unwrap();
        let volume = root.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        let cfg = RootfsConfig {
            rootfs: rootfs.clone(),
            mounts: vec![
                mount("/proc", "proc", "proc", &[]),
                mount("/dev", "tmpfs", "tmpfs", &["nosuid", "mode=755"]),
                mount("/data", "bind", volume.to_str().unwrap(), &["rbind", "ro"]),
            ],
            masked_paths: vec!["/etc/secret".into(), "/proc".into(), "/absent".into()],
            readonly_paths: vec!["/proc/sys".into()],
            readonly: true,
            hostname: Some("pod".into()),
            ..Default::default()
        };
        let sc = RecordingSyscall::default();
        setup(&sc, &cfg).unwrap();
        let calls = sc.calls.into_inner();

        let mounts: Vec<(PathBuf, MsFlags)> = calls
            .iter()
            .filter_map(|c| match c {
                Call::Mount { target, flags, .. } => Some((target.clone(), *flags)),
                _ => None,
            })
            .collect();
        // Propagation first, then the rootfs bind, the spec mounts in order.
        assert_eq!(mounts[0], ("/".into(), MsFlags::MS_SLAVE | MsFlags::MS_REC));
        assert_eq!(
            mounts[1],
            (rootfs.clone(), MsFlags::MS_BIND | MsFlags::MS_REC)
        );
        assert_eq!(mounts[2].0, rootfs.join("proc"));
        assert_eq!(mounts[3], (rootfs.join("dev"), MsFlags::MS_NOSUID));
        assert_eq!(
            mounts[4],
            (rootfs.join("data"), MsFlags::MS_BIND | MsFlags::MS_REC)
        );
        assert_eq!(
            mounts[5],
            (
                rootfs.join("data"),
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY
            )
        );
        assert!(rootfs.join("data").is_dir());
        // Default devices were created under the tmpfs /dev, with symlinks.
        assert!(calls
            .iter()
            .any(|c| *c == Call::Mknod(rootfs.join("dev/null"), nix::sys::stat::makedev(1, 3))));
        assert_eq!(
            std::fs::read_link(rootfs.join("dev/fd")).unwrap(),
            Path::new("/proc/self/fd")
        );
        // A masked file gets /dev/null, a masked directory a read-only tmpfs.
        assert!(calls.iter().any(|c| matches!(c,
            Call::Mount { source: Some(s), target, .. }
                if s == Path::new("/dev/null") && *target == rootfs.join("etc/secret"))));
        assert!(
            calls.iter().any(|c| matches!(c,
            Call::Mount { fstype: Some(t), target, flags, .. }
                if t == "tmpfs" && *target == rootfs.join("proc") && *flags == MsFlags::MS_RDONLY))
        );
        assert!(calls.contains(&Call::Sethostname("pod".into())));
        // pivot_root, then the old root detached, then the read-only remount.
        let pivot = calls
            .iter()
            .position(|c| matches!(c, Call::PivotRoot(_)))
            .unwrap();
        assert_eq!(calls[pivot - 1], Call::Chdir(rootfs.clone()));
        assert!(calls[pivot..].contains(&Call::Umount(".".into())));
        assert_eq!(
            calls.last().unwrap(),
            &Call::Mount {
                source: None,
                target: "/".into(),
                fstype: None,
                flags: MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                data: None
            }
        );
    }

    #[test]
    fn bind_without_source_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let m = oci_spec::runtime::MountBuilder::default()
            .destination("/x")
            .typ("bind")
            .build()
            .unwrap();
        let cfg = RootfsConfig {
            rootfs: root.path().to_owned(),
            mounts: vec![m],
            ..Default::default()
        };
        let err = setup(&RecordingSyscall::default(), &cfg).unwrap_err();
        assert!(err.to_string().contains("without a source"), "{err}");
    }
}
