use std::sync::Arc;

use super::*;
use crate::image::import::{import_layout, ImportError};
use crate::image::manifest::Compression;
use crate::image::testutil::{LayerBuilder, Layout};

fn base_layer() -> Vec<u8> {
    LayerBuilder::new()
        .dir("bin/")
        .file("bin/sh", b"shell")
        .file("etc/passwd", b"root")
        .finish()
        .0
}

fn top_layer() -> Vec<u8> {
    LayerBuilder::new()
        .file("etc/.wh.passwd", b"")
        .file("app", b"app")
        .finish()
        .0
}

fn count(dir: &Path) -> usize {
    fs::read_dir(dir).unwrap().count()
}

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    layout: Layout,
    store: Arc<ImageStore>,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let layout = Layout::new(&tmp.path().join("layout"));
    let store = Arc::new(ImageStore::open(&root).unwrap());
    Env {
        _tmp: tmp,
        root,
        layout,
        store,
    }
}

#[tokio::test]
async fn import_records_and_shares_layers() {
    let mut e = env();
    let a = e.layout.image(
        Some("docker.io/library/app:1"),
        &[
            (base_layer(), Compression::Gzip),
            (top_layer(), Compression::Zstd),
        ],
        &["sh"],
    );
    let b = e.layout.image(
        Some("app:2"),
        &[(base_layer(), Compression::Gzip)],
        &["true"],
    );
    let recs = import_layout(&e.store, &e.layout.dir, None).await.unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(
        count(&e.root.join("layers/sha256")),
        2,
        "the base layer is unpacked once"
    );

    let ra = e.store.get("app:1").unwrap();
    assert_eq!(ra.id, a.config);
    assert_eq!(ra.repo_tags, vec!["docker.io/library/app:1"]);
    assert_eq!(
        ra.repo_digests,
        vec![format!("docker.io/library/app@{}", a.manifest)]
    );
    assert_eq!(ra.config.cmd, vec!["sh"]);
    assert_eq!(ra.config.user, "1000");
    assert!(ra.size > 0);
    assert_eq!(e.store.get(&a.config.to_string()).unwrap().id, a.config);
    assert_eq!(e.store.get(a.config.hex()).unwrap().id, a.config);
    assert_eq!(e.store.get(&ra.repo_digests[0]).unwrap().id, a.config);
    assert_eq!(e.store.get("docker.io/library/app:2").unwrap().id, b.config);
    assert!(e.store.get("app:3").is_none());

    let r = e.store.resolve("app:1").unwrap();
    assert_eq!(r.layer_dirs.len(), 2);
    assert_eq!(fs::read(r.layer_dirs[0].join("bin/sh")).unwrap(), b"shell");
    assert!(r.layer_dirs[1].join("app").is_file());

    // Reload from disk.
    drop(e.store);
    let store = ImageStore::open(&e.root).unwrap();
    assert!(store.load_warnings().is_empty());
    assert_eq!(store.get("app:1").unwrap(), ra);
    assert_eq!(store.list().len(), 2);
}

#[tokio::test]
async fn import_from_tar_and_retag_moves_the_tag() {
    let mut e = env();
    let a = e.layout.image(
        Some("app:latest"),
        &[(base_layer(), Compression::None)],
        &["a"],
    );
    let tar = e.root.parent().unwrap().join("layout.tar");
    e.layout.tar(&tar);
    import_layout(&e.store, &tar, None).await.unwrap();
    assert_eq!(e.store.get("app").unwrap().id, a.config);

    let other = tempfile::tempdir().unwrap();
    let mut l2 = Layout::new(other.path());
    let b = l2.image(
        Some("app:latest"),
        &[(top_layer(), Compression::Gzip)],
        &["b"],
    );
    import_layout(&e.store, other.path(), None).await.unwrap();
    assert_eq!(e.store.get("app").unwrap().id, b.config);
    let old = e.store.get(&a.config.to_string()).unwrap();
    assert!(old.repo_tags.is_empty(), "the tag moved to the new image");
    assert_eq!(old.repo_digests.len(), 1);
    assert_eq!(count(&e.root.join("tmp")), 0);
}

#[tokio::test]
async fn tampered_content_is_rejected_and_nothing_is_left() {
    let mut e = env();
    let img = e.layout.image(
        Some("app:1"),
        &[
            (base_layer(), Compression::Gzip),
            (top_layer(), Compression::Gzip),
        ],
        &["sh"],
    );
    let blob = e
        .layout
        .dir
        .join("blobs/sha256")
        .join(img.layers[1].0.hex());
    let mut data = fs::read(&blob).unwrap();
    let n = data.len();
    data[n - 10] ^= 0xff;
    fs::write(&blob, &data).unwrap();
    let err = import_layout(&e.store, &e.layout.dir, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImportError::Blob(BlobError::DigestMismatch { .. })),
        "{err}"
    );
    for d in ["blobs/sha256", "layers/sha256", "images", "tmp"] {
        assert_eq!(count(&e.root.join(d)), 0, "{d} is empty");
    }
    assert!(e.store.list().is_empty());
}

#[tokio::test]
async fn wrong_diff_id_is_rejected_and_nothing_is_left() {
    let mut e = env();
    e.layout.image_with_diff_ids(
        Some("app:1"),
        &[(base_layer(), Compression::Gzip)],
        &["sh"],
        Some(vec![Digest::of(b"not the layer")]),
    );
    let err = import_layout(&e.store, &e.layout.dir, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ImportError::Store(StoreError::Unpack {
                source: UnpackError::DiffIdMismatch { .. },
                ..
            })
        ),
        "{err}"
    );
    for d in ["blobs/sha256", "layers/sha256", "images", "tmp"] {
        assert_eq!(count(&e.root.join(d)), 0, "{d} is empty");
    }
}

#[tokio::test]
async fn corrupt_records_are_skipped_on_reload() {
    let mut e = env();
    let a = e
        .layout
        .image(Some("app:1"), &[(base_layer(), Compression::Gzip)], &["sh"]);
    import_layout(&e.store, &e.layout.dir, None).await.unwrap();
    fs::write(
        e.root
            .join("images")
            .join(format!("{}.json", "b".repeat(64))),
        b"{ half a record",
    )
    .unwrap();
    let store = ImageStore::open(&e.root).unwrap();
    assert_eq!(
        store.load_warnings().len(),
        1,
        "{:?}",
        store.load_warnings()
    );
    assert_eq!(store.get("app:1").unwrap().id, a.config);
}

#[tokio::test]
async fn remove_collects_unshared_content_and_respects_leases() {
    let mut e = env();
    let a = e.layout.image(
        Some("app:1"),
        &[
            (base_layer(), Compression::Gzip),
            (top_layer(), Compression::Gzip),
        ],
        &["sh"],
    );
    let b = e
        .layout
        .image(Some("app:2"), &[(base_layer(), Compression::Gzip)], &["sh"]);
    import_layout(&e.store, &e.layout.dir, None).await.unwrap();
    e.store
        .add_lease("ctr-1", &[a.layers[1].1.clone()])
        .unwrap();

    assert_eq!(e.store.remove("app:1").await.unwrap().unwrap().id, a.config);
    assert!(
        e.store.remove("app:1").await.unwrap().is_none(),
        "idempotent"
    );
    assert!(e.store.get(&a.config.to_string()).is_none());
    assert!(
        e.store.layer_dir(&a.layers[0].1).is_dir(),
        "shared with app:2"
    );
    assert!(
        e.store.layer_dir(&a.layers[1].1).is_dir(),
        "leased by ctr-1"
    );
    assert!(
        !e.store.blobs().contains(&a.layers[1].0),
        "blob no image uses is gone"
    );

    e.store.remove_lease("ctr-1").unwrap();
    e.store.gc().await.unwrap();
    assert!(!e.store.layer_dir(&a.layers[1].1).exists());

    e.store
        .remove(&b.config.to_string())
        .await
        .unwrap()
        .unwrap();
    for d in ["blobs/sha256", "layers/sha256", "images", "tmp"] {
        assert_eq!(count(&e.root.join(d)), 0, "{d} is empty");
    }
    let u = e.store.usage().await.unwrap();
    assert!(u.inodes >= 8 && u.bytes > 0);
}

#[tokio::test]
async fn concurrent_unpacks_of_one_layer_unpack_once() {
    let mut e = env();
    let img = e
        .layout
        .image(None, &[(base_layer(), Compression::Gzip)], &["sh"]);
    let desc = Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        digest: img.layers[0].0.clone(),
        size: 0,
        platform: None,
        annotations: Default::default(),
    };
    let blob = fs::read(e.layout.dir.join("blobs/sha256").join(desc.digest.hex())).unwrap();
    e.store.blobs().put_bytes(&desc.digest, &blob).unwrap();
    let (x, y) = tokio::join!(
        e.store.unpack_once(&desc, &img.layers[0].1),
        e.store.unpack_once(&desc, &img.layers[0].1)
    );
    x.unwrap();
    y.unwrap();
    assert_eq!(count(&e.root.join("layers/sha256")), 1);
    assert_eq!(count(&e.root.join("tmp")), 0);
}
