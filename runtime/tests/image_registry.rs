//! The image service against a real registry: Debian's `docker-registry`
//! on a free localhost port, the busybox demo image (built by the same code
//! as `cargo xtask busybox-image`) pushed with `skopeo`. These tests fail,
//! never skip, when the registry or skopeo cannot run.

#[path = "../../xtask/src/oci_image.rs"]
#[allow(dead_code)]
mod oci_image;
#[path = "support/registry.rs"]
mod registry;

use registry::Registry;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use carapace::image::pull::Puller;
use carapace::image::registry::RegistryConfig;
use carapace::image::{rootfs, CriImageService, ImageStore};
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::{
    AuthConfig, ImageFilter, ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ListImagesRequest,
    PullImageRequest, RemoveImageRequest,
};
use tonic::{Code, Request};

fn busybox_layout(dir: &Path) -> PathBuf {
    oci_image::build(dir)
        .expect("building the busybox layout")
        .0
}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

fn pull_req(image: &str) -> Request<PullImageRequest> {
    Request::new(PullImageRequest {
        image: spec(image),
        ..Default::default()
    })
}

fn service(root: &Path, config: RegistryConfig) -> (Arc<Puller>, CriImageService) {
    let store = Arc::new(ImageStore::open(root).unwrap());
    let puller = Arc::new(Puller::new(store, config));
    (puller.clone(), CriImageService::new(puller))
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_list_status_rootfs_and_remove_through_the_image_service() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    reg.push(&busybox_layout(tmp.path()), "library/busybox");
    let host = reg.host();
    let config = RegistryConfig {
        insecure: vec![host.clone()],
        ..Default::default()
    };
    let root = tmp.path().join("store");
    let (puller, svc) = service(&root, config);
    let name = format!("{host}/library/busybox:latest");

    // Two concurrent pulls download once.
    let (a, b) = tokio::join!(
        svc.pull_image(pull_req(&name)),
        svc.pull_image(pull_req(&name))
    );
    let id = a.unwrap().into_inner().image_ref;
    assert_eq!(b.unwrap().into_inner().image_ref, id);
    assert!(id.starts_with("sha256:"));
    assert_eq!(
        puller.stats().blobs_downloaded.load(Ordering::Relaxed),
        2,
        "config and layer, once"
    );
    assert_eq!(puller.stats().joined.load(Ordering::Relaxed), 1);
    // Pulling again only checks the manifest.
    svc.pull_image(pull_req(&format!("{host}/library/busybox")))
        .await
        .unwrap();
    assert_eq!(puller.stats().blobs_downloaded.load(Ordering::Relaxed), 2);
    // An identity token for a registry that asks for no token: nothing to
    // exchange, the pull goes on anonymously (the exchange itself is
    // tested against a token-only registry in the pull unit tests).
    let mut req = pull_req(&name);
    req.get_mut().auth = Some(AuthConfig {
        identity_token: "refresh".into(),
        ..Default::default()
    });
    assert_eq!(
        svc.pull_image(req).await.unwrap().into_inner().image_ref,
        id
    );

    let list = svc
        .list_images(Request::new(ListImagesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.images.len(), 1);
    let img = &list.images[0];
    assert_eq!(img.id, id);
    assert_eq!(img.repo_tags, vec![name.clone()]);
    assert_eq!(img.repo_digests.len(), 1);
    assert!(img.repo_digests[0].starts_with(&format!("{host}/library/busybox@sha256:")));
    assert!(img.size > 1_000_000, "busybox is in there: {}", img.size);
    let filtered = |f: &str| ListImagesRequest {
        filter: Some(ImageFilter { image: spec(f) }),
    };
    assert_eq!(
        svc.list_images(Request::new(filtered(&name)))
            .await
            .unwrap()
            .into_inner()
            .images
            .len(),
        1
    );
    assert_eq!(
        svc.list_images(Request::new(filtered("other:1")))
            .await
            .unwrap()
            .into_inner()
            .images
            .len(),
        0
    );

    let status = |image: &str, verbose| {
        Request::new(ImageStatusRequest {
            image: spec(image),
            verbose,
        })
    };
    for by in [
        name.as_str(),
        id.as_str(),
        &img.repo_digests[0],
        &id["sha256:".len()..][..12],
    ] {
        let st = svc
            .image_status(status(by, false))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            st.image.as_ref().map(|i| i.id.as_str()),
            Some(id.as_str()),
            "by {by}"
        );
    }
    let st = svc
        .image_status(status(&name, true))
        .await
        .unwrap()
        .into_inner();
    assert!(st.info["info"].contains("layerDirs"));
    let st = svc
        .image_status(status("docker.io/library/nothing:here", false))
        .await
        .unwrap()
        .into_inner();
    assert!(
        st.image.is_none(),
        "unknown image: empty answer, not an error"
    );

    let fs = svc
        .image_fs_info(Request::new(ImageFsInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    let usage = &fs.image_filesystems[0];
    assert_eq!(
        usage.fs_id.as_ref().unwrap().mountpoint,
        root.display().to_string()
    );
    assert!(usage.used_bytes.unwrap().value > 2_000_000);
    assert!(usage.inodes_used.unwrap().value > 10);

    // The pulled image becomes a working root filesystem.
    let store = puller.store();
    let target = tmp.path().join("rootfs");
    let cdir = tmp.path().join("ctr");
    rootfs::prepare(store, "c1", &name, &cdir, &target).unwrap();
    let out = Command::new("chroot")
        .arg(&target)
        .args([
            "/bin/sh",
            "-c",
            "echo hello from $(cat /etc/passwd | head -c 4)",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello from root",
        "{out:?}"
    );
    rootfs::teardown(store, "c1", &cdir, &target).await.unwrap();

    // Remove, twice.
    for _ in 0..2 {
        svc.remove_image(Request::new(RemoveImageRequest { image: spec(&name) }))
            .await
            .unwrap();
    }
    assert!(svc
        .list_images(Request::new(ListImagesRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .images
        .is_empty());
    assert_eq!(count(&root.join("blobs/sha256")), 0);
    assert_eq!(count(&root.join("layers/sha256")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pulls_get_proper_codes_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    reg.push(&busybox_layout(tmp.path()), "library/busybox");
    let host = reg.host();
    let root = tmp.path().join("store");
    let (_, svc) = service(
        &root,
        RegistryConfig {
            insecure: vec![host.clone()],
            ..Default::default()
        },
    );
    fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Status {
        r.unwrap_err()
    }

    let e = code(svc.pull_image(pull_req("Not/A Valid//Ref")).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = code(svc.pull_image(pull_req("")).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = code(
        svc.pull_image(pull_req(&format!("{host}/library/busybox:nope")))
            .await,
    );
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = code(
        svc.pull_image(pull_req(&format!("{host}/library/absent:latest")))
            .await,
    );
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = code(
        svc.remove_image(Request::new(RemoveImageRequest { image: None }))
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument);

    // Not listed as insecure: HTTPS to a plain HTTP registry fails clearly.
    let (_, strict) = service(&tmp.path().join("strict"), RegistryConfig::default());
    let e = code(
        strict
            .pull_image(pull_req(&format!("{host}/library/busybox:latest")))
            .await,
    );
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("insecure"), "{e}");

    assert!(svc
        .list_images(Request::new(ListImagesRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .images
        .is_empty());
    for d in ["blobs/sha256", "layers/sha256", "images", "tmp"] {
        assert_eq!(count(&root.join(d)), 0, "{d} is empty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_go_through_a_mirror_under_the_same_repository_path() {
    let tmp = tempfile::tempdir().unwrap();
    let mirror = Registry::start();
    mirror.push(&busybox_layout(tmp.path()), "library/busybox");
    let dead = format!(
        "127.0.0.1:{}",
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let config = RegistryConfig::from_toml(&format!(
        r#"
        insecure = ["{live}"]
        [mirrors."registry.example.invalid"]
        endpoints = ["http://{dead}", "http://{}"]
        [mirrors."{live}"]
        endpoints = ["http://{dead}"]
        [mirrors."nofallback.example.invalid"]
        endpoints = ["http://{dead}"]
        fallback = false
        "#,
        mirror.host(),
        live = mirror.host(),
    ))
    .unwrap();
    let (puller, svc) = service(&tmp.path().join("store"), config);

    let name = "registry.example.invalid/library/busybox:latest";
    let id = svc
        .pull_image(pull_req(name))
        .await
        .unwrap()
        .into_inner()
        .image_ref;
    let rec = puller.store().get(&id).unwrap();
    assert_eq!(
        rec.repo_tags,
        vec![name.to_owned()],
        "recorded under the upstream name, like containerd"
    );

    // A dead mirror falls back to the registry itself.
    let upstream = format!("{}/library/busybox:latest", mirror.host());
    assert_eq!(
        svc.pull_image(pull_req(&upstream))
            .await
            .unwrap()
            .into_inner()
            .image_ref,
        id
    );

    let e = svc
        .pull_image(pull_req(
            "nofallback.example.invalid/library/busybox:latest",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains(&dead), "names the mirror tried: {e}");
}
