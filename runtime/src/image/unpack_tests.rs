use std::os::unix::fs::{FileTypeExt, MetadataExt};

use tar::EntryType;

use super::*;
use crate::image::testutil::{compress, LayerBuilder};

fn unpack(
    data: &[u8],
    c: Compression,
    diff_id: &Digest,
) -> (tempfile::TempDir, Result<u64, UnpackError>) {
    let dir = tempfile::tempdir().unwrap();
    let blob = compress(data, c);
    let r = unpack_layer(&blob[..], c, dir.path(), diff_id);
    (dir, r)
}

fn is_whiteout(p: &Path) -> bool {
    let m = fs::symlink_metadata(p).unwrap();
    m.file_type().is_char_device() && m.rdev() == 0
}

#[test]
fn unpacks_files_links_devices_and_metadata() {
    let (tar, diff_id) = LayerBuilder::new()
        .dir("./bin/")
        .file_owned("bin/su", b"#!", 0o4755, 1000, 1001)
        .link(EntryType::Symlink, "bin/sh", "/bin/busybox")
        .link(EntryType::Link, "bin/su2", "bin/su")
        .device("dev/null", EntryType::Char, 1, 3)
        .device("run/fifo", EntryType::Fifo, 0, 0)
        .file_with_xattrs("bin/ping", &[("security.capability", b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"), ("trusted.overlay.redirect", b"/etc")])
        .finish();
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let (dir, r) = unpack(&tar, c, &diff_id);
        assert_eq!(r.unwrap(), tar.len() as u64);
        let root = dir.path();
        let su = fs::symlink_metadata(root.join("bin/su")).unwrap();
        assert_eq!(
            (su.mode() & 0o7777, su.uid(), su.gid()),
            (0o4755, 1000, 1001)
        );
        assert_eq!(su.mtime(), 1_000_000);
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert_eq!(
            fs::symlink_metadata(root.join("bin/su2")).unwrap().ino(),
            su.ino()
        );
        let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), stat::makedev(1, 3));
        assert!(fs::symlink_metadata(root.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(get_xattr(&root.join("bin/ping"), "security.capability")
            .unwrap()
            .is_some());
        assert_eq!(
            get_xattr(&root.join("bin/ping"), "trusted.overlay.redirect").unwrap(),
            None
        );
        assert_eq!(
            fs::symlink_metadata(root.join("bin")).unwrap().mtime(),
            1_000_000
        );
    }
}

#[test]
fn converts_whiteouts_and_opaque_dirs() {
    let (tar, diff_id) = LayerBuilder::new()
        .dir("etc/")
        .file("etc/.wh.shadow", b"")
        .dir("var/cache/")
        .file("var/cache/.wh..wh..opq", b"")
        .file("var/cache/new", b"n")
        .file("deep/.wh.gone", b"")
        .file(".wh..wh.plnk", b"")
        .finish();
    let (dir, r) = unpack(&tar, Compression::Gzip, &diff_id);
    r.unwrap();
    let root = dir.path();
    assert!(is_whiteout(&root.join("etc/shadow")));
    assert!(is_whiteout(&root.join("deep/gone")));
    assert_eq!(
        get_xattr(&root.join("var/cache"), OVERLAY_OPAQUE_XATTR).unwrap(),
        Some(b"y".to_vec())
    );
    assert!(!root.join("var/cache/.wh..wh..opq").exists());
    assert!(!root.join(".wh..wh.plnk").exists());
    assert_eq!(fs::read(root.join("var/cache/new")).unwrap(), b"n");
}

#[test]
fn later_entries_replace_earlier_ones() {
    let (tar, diff_id) = LayerBuilder::new()
        .file("a", b"old")
        .file("a", b"new")
        .dir("d/")
        .file("d/x", b"")
        .file("d", b"now a file")
        .finish();
    let (dir, r) = unpack(&tar, Compression::None, &diff_id);
    r.unwrap();
    assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"new");
    assert_eq!(fs::read(dir.path().join("d")).unwrap(), b"now a file");
}

#[test]
fn path_escapes_are_rejected() {
    let cases: Vec<(&str, LayerBuilder)> = vec![
        ("dotdot", LayerBuilder::new().file("../evil", b"x")),
        (
            "inner dotdot",
            LayerBuilder::new().file("a/../../evil", b"x"),
        ),
        (
            "through symlink",
            LayerBuilder::new()
                .link(EntryType::Symlink, "etc", "/etc")
                .file("etc/passwd", b"x"),
        ),
        (
            "through relative symlink",
            LayerBuilder::new()
                .link(EntryType::Symlink, "up", "../..")
                .file("up/evil", b"x"),
        ),
        (
            "hardlink out",
            LayerBuilder::new().link(EntryType::Link, "pw", "../../etc/passwd"),
        ),
        (
            "hardlink missing",
            LayerBuilder::new().link(EntryType::Link, "pw", "etc/passwd"),
        ),
        (
            "hardlink through symlink",
            LayerBuilder::new()
                .link(EntryType::Symlink, "e", "/etc")
                .link(EntryType::Link, "pw", "e/passwd"),
        ),
        (
            "whiteout through symlink",
            LayerBuilder::new()
                .link(EntryType::Symlink, "e", "/etc")
                .file("e/.wh.passwd", b""),
        ),
    ];
    for (what, b) in cases {
        let (tar, diff_id) = b.finish();
        let outside = tempfile::tempdir().unwrap();
        let (_dir, r) = unpack(&tar, Compression::None, &diff_id);
        let err = r.expect_err(what);
        assert!(
            matches!(
                err,
                UnpackError::PathEscape(_)
                    | UnpackError::ThroughSymlink(_)
                    | UnpackError::MissingLinkTarget { .. }
            ),
            "{what}: {err}"
        );
        assert!(fs::read_dir(outside.path()).unwrap().next().is_none());
    }
    assert!(!Path::new("/etc/.wh.passwd").exists());
}

#[test]
fn corrupt_archives_and_wrong_diff_ids_are_rejected() {
    let (tar, diff_id) = LayerBuilder::new().file("a", b"hello").finish();
    let (_d, r) = unpack(&tar, Compression::None, &Digest::of(b"other"));
    assert!(matches!(r, Err(UnpackError::DiffIdMismatch { .. })));

    let gz = compress(&tar, Compression::Gzip);
    let dir = tempfile::tempdir().unwrap();
    let r = unpack_layer(&gz[..gz.len() / 2], Compression::Gzip, dir.path(), &diff_id);
    assert!(matches!(r, Err(UnpackError::Corrupt(_))), "{r:?}");

    let dir = tempfile::tempdir().unwrap();
    let r = unpack_layer(
        &b"not gzip at all"[..],
        Compression::Gzip,
        dir.path(),
        &diff_id,
    );
    assert!(matches!(r, Err(UnpackError::Corrupt(_))), "{r:?}");

    let mut bad = tar.clone();
    bad[148] ^= 0x5a; // header checksum
    let dir = tempfile::tempdir().unwrap();
    let r = unpack_layer(&bad[..], Compression::None, dir.path(), &diff_id);
    assert!(r.is_err());
}
