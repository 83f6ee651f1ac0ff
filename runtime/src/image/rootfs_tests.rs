use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use super::*;
use crate::image::import::import_layout;
use crate::image::manifest::Compression;
use crate::image::testutil::{LayerBuilder, Layout};

fn layers() -> Vec<(Vec<u8>, Compression)> {
    vec![
        (
            LayerBuilder::new()
                .file("bin/sh", b"shell")
                .file("etc/passwd", b"root")
                .file("var/cache/old", b"o")
                .finish()
                .0,
            Compression::Gzip,
        ),
        (
            LayerBuilder::new()
                .file("etc/.wh.passwd", b"")
                .dir("var/cache/")
                .file("var/cache/.wh..wh..opq", b"")
                .file("var/cache/new", b"n")
                .finish()
                .0,
            Compression::Zstd,
        ),
    ]
}

#[test]
fn unescapes_mountinfo_paths() {
    assert_eq!(unescape_mountinfo(r"/a\040b\134c"), b"/a b\\c");
    assert_eq!(unescape_mountinfo(r"/x\04"), b"/x\\04");
}

#[tokio::test]
async fn overlay_root_filesystem_lifecycle() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(ImageStore::open(tmp.path().join("store")).unwrap());
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let img = layout.image(Some("app:1"), &layers(), &["sh"]);
    import_layout(&store, &layout.dir, None).await.unwrap();

    let cdir = tmp.path().join("ctr");
    let target = tmp.path().join("share/ctr/rootfs");
    let r = prepare(&store, "ctr", "app:1", &cdir, &target).unwrap();
    assert_eq!(r.layers, 2);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(&cdir).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        fs::metadata(tmp.path().join("store")).unwrap().mode() & 0o777,
        0o700
    );
    assert!(is_mountpoint(&target).unwrap());
    assert_eq!(
        prepare(&store, "ctr", "app:1", &cdir, &target).unwrap(),
        r,
        "idempotent"
    );
    assert_eq!(fs::read(target.join("bin/sh")).unwrap(), b"shell");
    assert!(
        !target.join("etc/passwd").exists(),
        "whiteout hides the lower file"
    );
    assert!(
        !target.join("var/cache/old").exists(),
        "opaque dir hides the lower dir"
    );
    assert!(target.join("var/cache/new").exists());
    fs::write(target.join("written"), b"w").unwrap();
    fs::remove_file(target.join("bin/sh")).unwrap();
    assert_eq!(fs::read(r.upper.join("written")).unwrap(), b"w");
    assert!(fs::symlink_metadata(r.upper.join("bin/sh"))
        .unwrap()
        .file_type()
        .is_char_device());
    assert_eq!(
        fs::read(store.layer_dir(&img.layers[0].1).join("bin/sh")).unwrap(),
        b"shell",
        "lower untouched"
    );

    // Removing the image keeps the layers the container uses.
    store.remove("app:1").await.unwrap().unwrap();
    assert!(store.layer_dir(&img.layers[0].1).is_dir());
    assert!(target.join("var/cache/new").exists());

    teardown(&store, "ctr", &cdir, &target).await.unwrap();
    assert!(!is_mountpoint(&target).unwrap());
    assert!(!target.exists() && !cdir.join("upper").exists() && !cdir.join("work").exists());
    assert!(
        !store.layer_dir(&img.layers[0].1).exists(),
        "collected once unused"
    );
    teardown(&store, "ctr", &cdir, &target).await.unwrap();
}

#[tokio::test]
async fn many_layers_exceeding_the_mount_option_limit() {
    let tmp = tempfile::tempdir().unwrap();
    // A long store path makes 60 layers overflow the 4 KiB option page.
    let root = tmp
        .path()
        .join("a-rather-long-directory-name-for-the-image-store-root".repeat(2));
    let store = Arc::new(ImageStore::open(&root).unwrap());
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let layers: Vec<_> = (0..60)
        .map(|i| {
            (
                LayerBuilder::new()
                    .file(&format!("f{i}"), format!("{i}").as_bytes())
                    .finish()
                    .0,
                Compression::None,
            )
        })
        .collect();
    layout.image(Some("many:1"), &layers, &["sh"]);
    import_layout(&store, &layout.dir, None).await.unwrap();
    let dirs = store.resolve("many:1").unwrap().layer_dirs;
    let len: usize = dirs.iter().map(|d| d.as_os_str().len() + 1).sum();
    assert!(
        len > MOUNT_DATA_MAX,
        "the test must exceed the limit ({len})"
    );

    let cdir = tmp.path().join("ctr");
    let target = tmp.path().join("rootfs");
    let r = prepare(&store, "ctr", "many:1", &cdir, &target).unwrap();
    assert_eq!(r.layers, 60);
    for i in [0, 31, 59] {
        assert_eq!(
            fs::read_to_string(target.join(format!("f{i}"))).unwrap(),
            i.to_string()
        );
    }
    teardown(&store, "ctr", &cdir, &target).await.unwrap();
    assert!(!target.exists());
}

#[tokio::test]
async fn unknown_image_is_an_error_and_leaves_no_lease() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path().join("store")).unwrap();
    let err = prepare(
        &store,
        "c",
        "nope:1",
        &tmp.path().join("c"),
        &tmp.path().join("t"),
    )
    .unwrap_err();
    assert!(
        matches!(err, RootfsError::Store(StoreError::NotFound(_))),
        "{err}"
    );
    assert_eq!(
        fs::read_dir(tmp.path().join("store/leases"))
            .unwrap()
            .count(),
        0
    );
}
