//! Unpacking one layer tar (plain, gzip or zstd) into a directory in the form
//! overlayfs reads as a lower layer: `.wh.<name>` whiteouts become 0/0
//! character devices, `.wh..wh..opq` becomes `trusted.overlay.opaque=y` on
//! its directory. Ownership, permissions, modification times, xattrs, hard
//! links, symlinks and device nodes are kept.
//!
//! Safety rules: an entry whose path contains `..` is refused; no entry is
//! ever written through a symlink (a path whose parent in the layer is a
//! symlink is refused, files are created with `O_NOFOLLOW`); symlink targets
//! are stored verbatim and never followed here; `trusted.*` xattrs from the
//! archive are dropped so an image cannot forge overlayfs metadata.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{self, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{self, Gid, Uid};
use tar::EntryType;

use super::digest::{Digest, HashingReader};
use super::manifest::Compression;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {0:?} escapes the layer root")]
    PathEscape(PathBuf),
    #[error("layer entry {0:?} would be written through a symlink")]
    ThroughSymlink(PathBuf),
    #[error("layer entry {0:?}: a parent is not a directory")]
    NotADirectory(PathBuf),
    #[error("layer hard link {link:?} points to {target:?}, which is not in the layer")]
    MissingLinkTarget { link: PathBuf, target: PathBuf },
    #[error("layer entry {path:?} has unsupported type {kind:?}")]
    EntryType { path: PathBuf, kind: String },
    #[error("corrupt layer archive: {0}")]
    Corrupt(io::Error),
    #[error("layer diff ID mismatch: config says {expected}, content is {actual}")]
    DiffIdMismatch { expected: Digest, actual: Digest },
    #[error("unpacking {path:?}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Io {
        path: path.to_owned(),
        source,
    }
}

fn nix_at(path: &Path) -> impl FnOnce(nix::Error) -> UnpackError + '_ {
    move |e| UnpackError::Io {
        path: path.to_owned(),
        source: io::Error::from(e),
    }
}

/// Unpacks the layer read from `blob` into the empty directory `dest` and
/// checks that the uncompressed content hashes to `diff_id`. Returns the
/// uncompressed size. On error `dest` is left for the caller to remove.
pub fn unpack_layer(
    blob: impl Read,
    compression: Compression,
    dest: &Path,
    diff_id: &Digest,
) -> Result<u64, UnpackError> {
    let buffered = BufReader::with_capacity(256 * 1024, blob);
    let decoded: Box<dyn Read> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(buffered).map_err(UnpackError::Corrupt)?,
        ),
    };
    let mut archive = tar::Archive::new(HashingReader::new(decoded));
    let mut dirs = Vec::new();
    for entry in archive.entries().map_err(UnpackError::Corrupt)? {
        let entry = entry.map_err(UnpackError::Corrupt)?;
        if let Some(dir) = unpack_entry(entry, dest)? {
            dirs.push(dir);
        }
    }
    // Directory times last: creating their children changed them.
    for (path, mtime) in dirs.iter().rev() {
        set_mtime(path, *mtime)?;
    }
    let (actual, size) = archive
        .into_inner()
        .finish()
        .map_err(UnpackError::Corrupt)?;
    if &actual != diff_id {
        return Err(UnpackError::DiffIdMismatch {
            expected: diff_id.clone(),
            actual,
        });
    }
    Ok(size)
}

/// The entry's path relative to the layer root, with `.` and a leading `/`
/// dropped; `..` anywhere is refused.
fn relative(raw: &Path) -> Result<PathBuf, UnpackError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(UnpackError::PathEscape(raw.to_owned()))
            }
        }
    }
    Ok(out)
}

/// Makes sure every directory of `rel` (all components when `include_last`,
/// all but the last otherwise) exists under `dest` as a real directory.
fn ensure_dirs(dest: &Path, rel: &Path, include_last: bool) -> Result<(), UnpackError> {
    let comps: Vec<_> = rel.components().collect();
    let n = if include_last {
        comps.len()
    } else {
        comps.len().saturating_sub(1)
    };
    let mut p = dest.to_path_buf();
    for c in &comps[..n] {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(UnpackError::ThroughSymlink(rel.to_owned()))
            }
            Ok(_) => return Err(UnpackError::NotADirectory(rel.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&p).map_err(io_at(&p))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).map_err(io_at(&p))?;
            }
            Err(e) => return Err(io_at(&p)(e)),
        }
    }
    Ok(())
}

/// Removes whatever is at `path` unless both it and the new entry are directories.
fn clear(path: &Path, new_is_dir: bool) -> Result<bool, UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && new_is_dir => Ok(true),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map(|_| false).map_err(io_at(path)),
        Ok(_) => fs::remove_file(path).map(|_| false).map_err(io_at(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_at(path)(e)),
    }
}

struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn meta_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, UnpackError> {
    let h = entry.header();
    let corrupt = UnpackError::Corrupt;
    let mut m = Meta {
        uid: h.uid().map_err(corrupt)? as u32,
        gid: h.gid().map_err(corrupt)? as u32,
        mode: h.mode().map_err(corrupt)? & 0o7777,
        mtime: h.mtime().map_err(corrupt)? as i64,
        xattrs: Vec::new(),
    };
    if let Some(exts) = entry.pax_extensions().map_err(corrupt)? {
        for ext in exts {
            let ext = ext.map_err(corrupt)?;
            let Ok(key) = ext.key() else { continue };
            let parse = |v: &[u8]| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
            };
            match key {
                "uid" => m.uid = parse(ext.value_bytes()).unwrap_or(m.uid),
                "gid" => m.gid = parse(ext.value_bytes()).unwrap_or(m.gid),
                k => {
                    if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                        if !name.starts_with("trusted.") {
                            m.xattrs.push((name.to_owned(), ext.value_bytes().to_vec()));
                        }
                    }
                }
            }
        }
    }
    Ok(m)
}

/// Unpacks one entry; returns the directory and its mtime for directories.
fn unpack_entry<R: Read>(
    mut entry: tar::Entry<'_, R>,
    dest: &Path,
) -> Result<Option<(PathBuf, i64)>, UnpackError> {
    let raw = entry.path().map_err(UnpackError::Corrupt)?.into_owned();
    let rel = relative(&raw)?;
    let kind = entry.header().entry_type();
    let name = rel.file_name().map(|n| n.to_string_lossy().into_owned());
    let path = dest.join(&rel);

    if let Some(name) = name.as_deref().filter(|n| n.starts_with(WHITEOUT_PREFIX)) {
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        ensure_dirs(dest, parent_rel, true)?;
        let parent = dest.join(parent_rel);
        if name == OPAQUE_MARKER {
            set_xattr(&parent, OVERLAY_OPAQUE_XATTR, b"y")?;
        } else if !name.starts_with(".wh..wh.") {
            let target = parent.join(&name[WHITEOUT_PREFIX.len()..]);
            clear(&target, false)?;
            stat::mknod(&target, SFlag::S_IFCHR, Mode::empty(), 0).map_err(nix_at(&target))?;
        }
        return Ok(None);
    }

    let meta = meta_of(&mut entry)?;
    if rel.as_os_str().is_empty() {
        // The layer root itself ("./"): only a directory makes sense.
        if kind == EntryType::Directory {
            chown_chmod(dest, &meta, true)?;
            return Ok(Some((dest.to_owned(), meta.mtime)));
        }
        return Err(UnpackError::PathEscape(raw));
    }
    ensure_dirs(dest, &rel, false)?;

    match kind {
        EntryType::Directory => {
            if !clear(&path, true)? {
                fs::create_dir(&path).map_err(io_at(&path))?;
            }
            chown_chmod(&path, &meta, true)?;
            set_xattrs(&path, &meta.xattrs)?;
            return Ok(Some((path, meta.mtime)));
        }
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            clear(&path, false)?;
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io_at(&path))?;
            io::copy(&mut entry, &mut f).map_err(UnpackError::Corrupt)?;
            chown_chmod(&path, &meta, true)?;
            set_xattrs(&path, &meta.xattrs)?;
        }
        EntryType::Symlink => {
            let target = entry
                .link_name()
                .map_err(UnpackError::Corrupt)?
                .ok_or_else(|| UnpackError::Corrupt(io::Error::other("symlink without target")))?;
            clear(&path, false)?;
            std::os::unix::fs::symlink(&target, &path).map_err(io_at(&path))?;
            chown_chmod(&path, &meta, false)?;
        }
        EntryType::Link => {
            let target = entry
                .link_name()
                .map_err(UnpackError::Corrupt)?
                .ok_or_else(|| {
                    UnpackError::Corrupt(io::Error::other("hard link without target"))
                })?;
            let target_rel = relative(&target)?;
            ensure_dirs(dest, &target_rel, false)?;
            let src = dest.join(&target_rel);
            if fs::symlink_metadata(&src).is_err() || target_rel.as_os_str().is_empty() {
                return Err(UnpackError::MissingLinkTarget {
                    link: rel,
                    target: target_rel,
                });
            }
            if src != path {
                clear(&path, false)?;
                fs::hard_link(&src, &path).map_err(io_at(&path))?;
            }
            return Ok(None);
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let h = entry.header();
            let major = h.device_major().map_err(UnpackError::Corrupt)?.unwrap_or(0);
            let minor = h.device_minor().map_err(UnpackError::Corrupt)?.unwrap_or(0);
            let flag = match kind {
                EntryType::Char => SFlag::S_IFCHR,
                EntryType::Block => SFlag::S_IFBLK,
                _ => SFlag::S_IFIFO,
            };
            clear(&path, false)?;
            let dev = stat::makedev(major.into(), minor.into());
            stat::mknod(&path, flag, Mode::from_bits_truncate(0o600), dev)
                .map_err(nix_at(&path))?;
            chown_chmod(&path, &meta, true)?;
        }
        EntryType::XGlobalHeader => return Ok(None),
        other => {
            return Err(UnpackError::EntryType {
                path: rel,
                kind: format!("{other:?}"),
            })
        }
    }
    set_mtime(&path, meta.mtime)?;
    Ok(None)
}

/// Owner first (chown clears set-id bits), then the mode; symlinks have no mode.
fn chown_chmod(path: &Path, meta: &Meta, chmod: bool) -> Result<(), UnpackError> {
    unistd::fchownat(
        AT_FDCWD,
        path,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(nix_at(path))?;
    if chmod {
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode)).map_err(io_at(path))?;
    }
    Ok(())
}

fn set_mtime(path: &Path, mtime: i64) -> Result<(), UnpackError> {
    let t = TimeSpec::new(mtime, 0);
    stat::utimensat(AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(nix_at(path))
}

fn set_xattrs(path: &Path, xattrs: &[(String, Vec<u8>)]) -> Result<(), UnpackError> {
    for (name, value) in xattrs {
        match set_xattr(path, name, value) {
            Err(UnpackError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOTSUP) => {
                tracing::warn!(path = %path.display(), xattr = %name, "xattr not supported here, dropped");
            }
            r => r?,
        }
    }
    Ok(())
}

/// Sets an xattr on `path` itself (never through a symlink).
pub(crate) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<(), UnpackError> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io_at(path)(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let cname = CString::new(name)
        .map_err(|e| io_at(path)(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: both strings are NUL-terminated and outlive the call; `value`
    // is a valid buffer of the length passed.
    let rc = unsafe {
        libc::lsetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io_at(path)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Reads an xattr of `path` itself; `None` when absent.
#[cfg(test)]
pub(crate) fn get_xattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    let cname = CString::new(name)?;
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated; `buf` is writable for its length.
    let n = unsafe {
        libc::lgetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
