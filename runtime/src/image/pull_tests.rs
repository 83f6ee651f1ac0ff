//! Pull tests against a small in-process registry (HTTP/1.1, one request
//! per connection) serving a test layout; the real registry is exercised in
//! `tests/image_registry.rs`.

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::image::manifest::{Compression, OCI_MANIFEST};
use crate::image::testutil::{LayerBuilder, Layout, TestImage};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Serve,
    Unauthorized,
    TamperBlobs,
    /// Bearer tokens only: `/token` gives `access-1` for a POST of the
    /// refresh token `identity-secret`; everything else wants it.
    IdentityToken,
}

struct Fake {
    host: String,
    blob_gets: Arc<AtomicUsize>,
    token_posts: Arc<AtomicUsize>,
}

async fn fake_registry(dir: PathBuf, manifest: Digest, mode: Mode) -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let blob_gets = Arc::new(AtomicUsize::new(0));
    let token_posts = Arc::new(AtomicUsize::new(0));
    let gets = blob_gets.clone();
    let posts = token_posts.clone();
    let challenge =
        format!("WWW-Authenticate: Bearer realm=\"http://{host}/token\",service=\"fake\"\r\n");
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let (dir, manifest, gets, posts, challenge) = (
                dir.clone(),
                manifest.clone(),
                gets.clone(),
                posts.clone(),
                challenge.clone(),
            );
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                let read_more = |req: &[u8]| match req.windows(4).position(|w| w == b"\r\n\r\n") {
                    None => true,
                    Some(end) => {
                        let head = String::from_utf8_lossy(&req[..end]).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        req.len() < end + 4 + length
                    }
                };
                while read_more(&req) {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&req).into_owned();
                let authorized = text.lines().any(|l| {
                    l.to_lowercase().starts_with("authorization:") && l.ends_with("Bearer access-1")
                });
                let line = String::from_utf8_lossy(&req)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned();
                let mut parts = line.split(' ');
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let path = path.split('?').next().unwrap_or("");
                let blob = |d: &str| {
                    std::fs::read(
                        dir.join("blobs/sha256")
                            .join(d.trim_start_matches("sha256:")),
                    )
                    .ok()
                };
                let unauthorized =
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
                let (status, ctype, mut body, extra) = if mode == Mode::IdentityToken
                    && path == "/token"
                {
                    if method == "POST" {
                        posts.fetch_add(1, Ordering::SeqCst);
                    }
                    let form = text.split("\r\n\r\n").nth(1).unwrap_or("");
                    let fields: Vec<&str> = form.split('&').collect();
                    let good = method == "POST"
                        && [
                            "grant_type=refresh_token",
                            "refresh_token=identity-secret",
                            "service=fake",
                            "scope=repository%3Aapp%3Apull",
                        ]
                        .iter()
                        .all(|f| fields.contains(f));
                    if good {
                        (
                            200,
                            "application/json",
                            br#"{"access_token":"access-1"}"#.to_vec(),
                            String::new(),
                        )
                    } else {
                        (
                            401,
                            "application/json",
                            br#"{"error":"invalid_grant"}"#.to_vec(),
                            String::new(),
                        )
                    }
                } else if mode == Mode::IdentityToken && !authorized {
                    (401, "application/json", unauthorized.to_vec(), challenge)
                } else if path == "/v2/" {
                    (200, "application/json", b"{}".to_vec(), String::new())
                } else if mode == Mode::Unauthorized {
                    (
                        401,
                        "application/json",
                        unauthorized.to_vec(),
                        "WWW-Authenticate: Basic realm=\"fake\"\r\n".into(),
                    )
                } else if let Some(r) = path.split("/manifests/").nth(1) {
                    let d = match r {
                        "latest" => manifest.to_string(),
                        "multi" => std::fs::read_to_string(dir.join("multi")).unwrap_or_default(),
                        other => other.to_owned(),
                    };
                    match blob(&d) {
                        Some(b) => (
                            200,
                            OCI_MANIFEST,
                            b,
                            format!("Docker-Content-Digest: {d}\r\n"),
                        ),
                        None => (
                            404,
                            "application/json",
                            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#
                                .to_vec(),
                            String::new(),
                        ),
                    }
                } else if let Some(d) = path.split("/blobs/").nth(1) {
                    gets.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    match blob(d) {
                        Some(b) => (200, "application/octet-stream", b, String::new()),
                        None => (
                            404,
                            "application/json",
                            br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}"#.to_vec(),
                            String::new(),
                        ),
                    }
                } else {
                    (404, "text/plain", b"no".to_vec(), String::new())
                };
                if mode == Mode::TamperBlobs && path.contains("/blobs/") && !body.is_empty() {
                    let n = body.len() - 1;
                    body[n] ^= 1;
                }
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                if method != "HEAD" {
                    let _ = s.write_all(&body).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Fake {
        host,
        blob_gets,
        token_posts,
    }
}

fn test_image(dir: &std::path::Path) -> (Layout, TestImage) {
    let mut l = Layout::new(dir);
    let tar = LayerBuilder::new().file("bin/sh", b"sh").finish().0;
    let img = l.image(None, &[(tar, Compression::Gzip)], &["sh"]);
    (l, img)
}

fn puller(root: &std::path::Path, insecure: &str) -> Arc<Puller> {
    let store = Arc::new(ImageStore::open(root).unwrap());
    let config = RegistryConfig {
        insecure: vec![insecure.to_owned()],
        ..Default::default()
    };
    Arc::new(Puller::new(store, config))
}

#[tokio::test]
async fn concurrent_pulls_share_one_download() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, img) = test_image(&tmp.path().join("layout"));
    let fake = fake_registry(layout.dir.clone(), img.manifest.clone(), Mode::Serve).await;
    let p = puller(&tmp.path().join("store"), &fake.host);
    let r = ImageRef::parse(&format!("{}/app:latest", fake.host)).unwrap();
    let (a, b, c) = tokio::join!(
        p.pull(&r, &Credentials::Anonymous),
        p.pull(&r, &Credentials::Anonymous),
        p.pull(&r, &Credentials::Anonymous)
    );
    let id = a.unwrap().id;
    assert_eq!((b.unwrap().id, c.unwrap().id), (id.clone(), id.clone()));
    assert_eq!(id, img.config);
    assert_eq!(
        fake.blob_gets.load(Ordering::SeqCst),
        2,
        "config and layer fetched once"
    );
    assert_eq!(p.stats().joined.load(Ordering::Relaxed), 2);
    assert!(p.inflight.lock().unwrap().is_empty());

    // A caller that gives up does not cancel the pull for the others.
    let r2 = ImageRef::parse(&format!("{}/app@{}", fake.host, img.manifest)).unwrap();
    let p2 = p.clone();
    let r2b = r2.clone();
    let abandoned = tokio::spawn(async move { p2.pull(&r2b, &Credentials::Anonymous).await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    abandoned.abort();
    let rec = p.pull(&r2, &Credentials::Anonymous).await.unwrap();
    assert!(rec.repo_digests.contains(&r2.to_string()));
}

#[tokio::test]
async fn an_index_resolves_to_linux_amd64() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, img) = test_image(&tmp.path().join("layout"));
    let size = |d: &Digest| {
        std::fs::metadata(layout.dir.join("blobs/sha256").join(d.hex()))
            .unwrap()
            .len()
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::image::manifest::OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": Digest::of(b"arm").to_string(), "size": 3,
             "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": OCI_MANIFEST, "digest": img.manifest.to_string(), "size": size(&img.manifest),
             "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    });
    let index_digest = layout.blob(&serde_json::to_vec(&index).unwrap());
    std::fs::write(layout.dir.join("multi"), index_digest.to_string()).unwrap();
    let fake = fake_registry(layout.dir.clone(), img.manifest.clone(), Mode::Serve).await;
    let p = puller(&tmp.path().join("store"), &fake.host);
    let r = ImageRef::parse(&format!("{}/app:multi", fake.host)).unwrap();
    let rec = p.pull(&r, &Credentials::Anonymous).await.unwrap();
    assert_eq!(rec.id, img.config);
    assert_eq!(rec.manifest, img.manifest);
    assert_eq!(rec.index, Some(index_digest.clone()));
    assert_eq!(
        rec.repo_digests,
        vec![format!("{}/app@{index_digest}", fake.host)]
    );
}

#[tokio::test]
async fn registry_errors_map_to_kinds_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, img) = test_image(&tmp.path().join("layout"));
    let root = tmp.path().join("store");

    let fake = fake_registry(layout.dir.clone(), img.manifest.clone(), Mode::Unauthorized).await;
    let p = puller(&root, &fake.host);
    let r = ImageRef::parse(&format!("{}/app:latest", fake.host)).unwrap();
    let creds = Credentials::Basic {
        username: "u".into(),
        password: "wrong".into(),
    };
    assert!(matches!(
        p.pull(&r, &creds).await,
        Err(PullError::Unauthenticated(_))
    ));

    let fake = fake_registry(layout.dir.clone(), img.manifest.clone(), Mode::TamperBlobs).await;
    let p = puller(&root, &fake.host);
    let r = ImageRef::parse(&format!("{}/app:latest", fake.host)).unwrap();
    let e = p.pull(&r, &Credentials::Anonymous).await.unwrap_err();
    assert!(matches!(e, PullError::InvalidContent(_)), "{e}");
    let msg = e.to_string().to_lowercase();
    assert!(
        msg.contains("digest") && msg.contains("invalid content"),
        "{e}"
    );

    let fake = fake_registry(layout.dir.clone(), img.manifest.clone(), Mode::Serve).await;
    let p = puller(&root, &fake.host);
    let wrong = format!("{}/app@{}", fake.host, Digest::of(b"other"));
    let e = p
        .pull(&ImageRef::parse(&wrong).unwrap(), &Credentials::Anonymous)
        .await
        .unwrap_err();
    assert!(matches!(e, PullError::NotFound(_)), "{e}");

    for d in ["blobs/sha256", "layers/sha256", "images", "tmp"] {
        assert_eq!(
            std::fs::read_dir(root.join(d)).unwrap().count(),
            0,
            "{d} is empty"
        );
    }
}

#[tokio::test]
async fn an_identity_token_is_exchanged_for_an_access_token() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, img) = test_image(&tmp.path().join("layout"));
    let root = tmp.path().join("store");
    let fake = fake_registry(
        layout.dir.clone(),
        img.manifest.clone(),
        Mode::IdentityToken,
    )
    .await;
    let p = puller(&root, &fake.host);
    let r = ImageRef::parse(&format!("{}/app:latest", fake.host)).unwrap();

    // Without a token, or with a refused one: Unauthenticated, nothing kept.
    let e = p.pull(&r, &Credentials::Anonymous).await.unwrap_err();
    assert!(matches!(e, PullError::Unauthenticated(_)), "{e}");
    let wrong = Credentials::IdentityToken("stale".into());
    let e = p.pull(&r, &wrong).await.unwrap_err();
    assert!(
        matches!(&e, PullError::Unauthenticated(m) if m.contains("refused the identity token")),
        "{e}"
    );
    assert!(!e.to_string().contains("stale"), "{e}");
    for d in ["blobs/sha256", "images"] {
        assert_eq!(std::fs::read_dir(root.join(d)).unwrap().count(), 0, "{d}");
    }

    let creds = Credentials::IdentityToken("identity-secret".into());
    let rec = p.pull(&r, &creds).await.unwrap();
    assert_eq!(rec.id, img.config);
    assert_eq!(fake.token_posts.load(Ordering::SeqCst), 2);
    assert!(!format!("{creds:?}").contains("secret"));
}

#[test]
fn credentials_fingerprints_differ_and_redact() {
    let a = Credentials::Basic {
        username: "u".into(),
        password: "p1".into(),
    };
    let b = Credentials::Basic {
        username: "u".into(),
        password: "p2".into(),
    };
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert_eq!(
        Credentials::Anonymous.fingerprint(),
        Credentials::Anonymous.fingerprint()
    );
    assert!(!format!("{a:?}").contains("p1"));
}
