//! Pulling images from OCI / Docker v2 registries with `oci-client`.
//!
//! Mirrors are tried first (see [`super::registry`]); the request's
//! credentials go to the image's own registry only, never to a mirror.
//! Manifests, configs and layers are verified by digest before they enter the
//! store. Concurrent pulls of the same reference (with the same credentials)
//! share one download; concurrent pulls of different references that share
//! blobs or layers download and unpack each of them once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::Digest as _;

use super::blobs::BlobError;
use super::digest::Digest;
use super::manifest::{self, Descriptor, Document, ManifestError, MANIFEST_TYPES};
use super::reference::ImageRef;
use super::registry::{Endpoint, RegistryConfig};
use super::store::{Commit, Hold, ImageRecord, ImageStore, StoreError};

/// Layers downloaded at once per pull.
const PARALLEL_BLOBS: usize = 3;

/// Why a pull failed; each kind maps to one gRPC code. Cloneable so that
/// every caller of a shared pull gets the result.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PullError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    InvalidContent(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Store(String),
}

/// Credentials for the image's registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    /// A registry (bearer) token, sent as is.
    RegistryToken(String),
    /// An OAuth2 refresh token, exchanged for an access token at the
    /// registry's token service first (see [`super::identity_token`]).
    IdentityToken(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Self::RegistryToken(_) => f.write_str("RegistryToken(<redacted>)"),
            Self::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

impl Credentials {
    /// Distinguishes credentials in the single-flight key without keeping them.
    fn fingerprint(&self) -> String {
        let s = match self {
            Self::Anonymous => String::new(),
            Self::Basic { username, password } => format!("b\0{username}\0{password}"),
            Self::RegistryToken(t) => format!("t\0{t}"),
            Self::IdentityToken(t) => format!("i\0{t}"),
        };
        hex::encode(&sha2::Sha256::digest(s.as_bytes())[..8])
    }
}

/// Counters for observing pulls.
#[derive(Debug, Default)]
pub struct PullStats {
    /// Blobs fetched from a registry (manifests not counted).
    pub blobs_downloaded: AtomicU64,
    pub bytes_downloaded: AtomicU64,
    /// Pulls that joined one already in progress.
    pub joined: AtomicU64,
}

type SharedPull = Shared<BoxFuture<'static, Result<ImageRecord, PullError>>>;

pub struct Puller {
    store: Arc<ImageStore>,
    config: RegistryConfig,
    inflight: Mutex<HashMap<String, SharedPull>>,
    stats: PullStats,
}

impl Puller {
    pub fn new(store: Arc<ImageStore>, config: RegistryConfig) -> Self {
        Self {
            store,
            config,
            inflight: Mutex::default(),
            stats: PullStats::default(),
        }
    }

    pub fn stats(&self) -> &PullStats {
        &self.stats
    }

    pub fn store(&self) -> &Arc<ImageStore> {
        &self.store
    }

    /// Pulls `image` into the store and returns its record. The pull runs on
    /// its own task: a caller that goes away does not cancel it for others.
    pub async fn pull(
        self: &Arc<Self>,
        image: &ImageRef,
        creds: &Credentials,
    ) -> Result<ImageRecord, PullError> {
        let key = format!("{image}|{}", creds.fingerprint());
        let fut = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = inflight.get(&key) {
                self.stats.joined.fetch_add(1, Ordering::Relaxed);
                f.clone()
            } else {
                let this = self.clone();
                let (image, creds, k) = (image.clone(), creds.clone(), key.clone());
                let task = tokio::spawn(async move {
                    let r = this.pull_uncached(&image, &creds).await;
                    this.inflight
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&k);
                    r
                });
                let f = async move {
                    task.await
                        .unwrap_or_else(|e| Err(PullError::Store(format!("pull task failed: {e}"))))
                }
                .boxed()
                .shared();
                inflight.insert(key, f.clone());
                f
            }
        };
        fut.await
    }

    async fn pull_uncached(
        &self,
        image: &ImageRef,
        creds: &Credentials,
    ) -> Result<ImageRecord, PullError> {
        let endpoints = self.config.endpoints(image.registry());
        let client = self.client();
        let mut last = None;
        for ep in &endpoints {
            // The request's credentials go to the image's own registry only.
            let auth = if ep.mirror {
                Ok(RegistryAuth::Anonymous)
            } else {
                self.auth_for(ep, image, creds).await
            };
            let result = match auth {
                Ok(auth) => self.pull_from(&client, ep, image, &auth).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(rec) => {
                    tracing::info!(image = %image, host = %ep.host, id = %rec.id, "pulled image");
                    return Ok(rec);
                }
                Err(e) => {
                    if let Err(gc) = self.store.gc().await {
                        tracing::warn!(error = %gc, "cleaning up after a failed pull");
                    }
                    if ep.mirror {
                        tracing::warn!(image = %image, mirror = %ep.host, error = %e, "mirror failed, trying the next host");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            PullError::NotFound(format!("no registry host to pull {image} from"))
        }))
    }

    /// What oci-client sends to `ep` for `creds`: an identity token is
    /// exchanged for an access token first.
    async fn auth_for(
        &self,
        ep: &Endpoint,
        image: &ImageRef,
        creds: &Credentials,
    ) -> Result<RegistryAuth, PullError> {
        Ok(match creds {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Credentials::RegistryToken(t) => RegistryAuth::Bearer(t.clone()),
            Credentials::IdentityToken(t) => {
                let scheme = if ep.plain_http { "http" } else { "https" };
                let plain = self.config.plain_http_hosts();
                let base = format!("{scheme}://{}", ep.host);
                super::identity_token::access_token(&base, image.repository(), t, |h| {
                    plain.iter().any(|p| p == h)
                })
                .await
                .map_err(|e| match e {
                    PullError::Unauthenticated(m) => {
                        PullError::Unauthenticated(format!("pulling {image}: {m}"))
                    }
                    other => other,
                })?
                .map_or(RegistryAuth::Anonymous, RegistryAuth::Bearer)
            }
        })
    }

    fn client(&self) -> Client {
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.config.plain_http_hosts()),
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        })
    }

    async fn pull_from(
        &self,
        client: &Client,
        ep: &Endpoint,
        image: &ImageRef,
        auth: &RegistryAuth,
    ) -> Result<ImageRecord, PullError> {
        let ctx = Ctx { client, ep, image };
        let reference = image.on_host(&ep.host);
        let mut hold = self.store.hold();
        let (bytes, top) = ctx.manifest(&reference, auth, image.digest()).await?;
        let (index, mdesc_digest, mbytes) =
            match manifest::parse_document(&bytes, "").map_err(|e| ctx.invalid(e))? {
                Document::Manifest(_) => (None, top, bytes),
                Document::Index(i) => {
                    let d = manifest::select_platform(&i)
                        .map_err(|e| ctx.unsupported(e))?
                        .digest
                        .clone();
                    let r = reference.clone_with_digest(d.to_string());
                    let (b, got) = ctx.manifest(&r, auth, Some(&d)).await?;
                    hold.add(&top);
                    self.store
                        .blobs()
                        .put_bytes(&top, &bytes)
                        .map_err(|e| ctx.blob(e))?;
                    (Some(top), got, b)
                }
            };
        let Document::Manifest(m) =
            manifest::parse_document(&mbytes, "").map_err(|e| ctx.invalid(e))?
        else {
            return Err(ctx.invalid("an image index points to another index"));
        };
        hold.add(&mdesc_digest);
        self.store
            .blobs()
            .put_bytes(&mdesc_digest, &mbytes)
            .map_err(|e| ctx.blob(e))?;

        self.fetch_blob(&ctx, &reference, &m.config, &mut hold)
            .await?;
        let config_bytes = self
            .store
            .blobs()
            .read(&m.config.digest)
            .map_err(|e| ctx.blob(e))?;
        let config = manifest::parse_config(&config_bytes).map_err(|e| ctx.invalid(e))?;
        manifest::check_image(&m, &config).map_err(|e| ctx.unsupported(e))?;
        for l in &m.layers {
            hold.add(&l.digest);
        }
        for d in &config.diff_ids {
            hold.add(d);
        }
        let fetches: Vec<_> = m
            .layers
            .iter()
            .map(|l| self.fetch_layer(&ctx, &reference, l))
            .collect();
        futures_util::stream::iter(fetches)
            .buffer_unordered(PARALLEL_BLOBS)
            .try_collect::<Vec<()>>()
            .await?;
        let commit = Commit {
            name: Some(image.clone()),
            index,
            manifest_size: mbytes.len() as u64,
            manifest_digest: mdesc_digest,
            config_digest: m.config.digest.clone(),
            manifest: m,
            config,
        };
        let rec = self.store.commit(commit).await.map_err(|e| match e {
            StoreError::Unpack { .. } | StoreError::Manifest(_) => ctx.invalid(e),
            other => PullError::Store(format!("storing {image}: {other}")),
        })?;
        drop(hold);
        Ok(rec)
    }

    async fn fetch_layer(
        &self,
        ctx: &Ctx<'_>,
        reference: &Reference,
        desc: &Descriptor,
    ) -> Result<(), PullError> {
        let mut hold = self.store.hold();
        self.fetch_blob(ctx, reference, desc, &mut hold).await
    }

    /// Downloads one blob unless stored; one download per digest at a time.
    async fn fetch_blob(
        &self,
        ctx: &Ctx<'_>,
        reference: &Reference,
        desc: &Descriptor,
        hold: &mut Hold,
    ) -> Result<(), PullError> {
        hold.add(&desc.digest);
        let _guard = self
            .store
            .locks
            .lock(&format!("blob:{}", desc.digest))
            .await;
        if self.store.blobs().contains(&desc.digest) {
            return Ok(());
        }
        let od = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.to_string(),
            size: desc.size as i64,
            ..Default::default()
        };
        let stream = ctx
            .client
            .pull_blob_stream(reference, &od)
            .await
            .map_err(|e| ctx.registry(e))?;
        let n = self
            .store
            .blobs()
            .put_stream(&desc.digest, Some(desc.size), stream.stream)
            .await
            .map_err(|e| ctx.blob(e))?;
        self.stats.blobs_downloaded.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_downloaded.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// One pull attempt against one host, for error messages.
struct Ctx<'a> {
    client: &'a Client,
    ep: &'a Endpoint,
    image: &'a ImageRef,
}

impl Ctx<'_> {
    /// Fetches a manifest and verifies its digest (and the expected one).
    async fn manifest(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
        expected: Option<&Digest>,
    ) -> Result<(Vec<u8>, Digest), PullError> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(r, auth, MANIFEST_TYPES)
            .await
            .map_err(|e| self.registry(e))?;
        let actual = Digest::of(&bytes);
        if let Some(want) = expected {
            if want != &actual {
                return Err(self.blob(BlobError::DigestMismatch {
                    expected: want.clone(),
                    actual,
                }));
            }
        }
        Ok((bytes.to_vec(), actual))
    }

    fn prefix(&self) -> String {
        if self.ep.mirror {
            format!("pulling {} from mirror {}", self.image, self.ep.host)
        } else {
            format!("pulling {}", self.image)
        }
    }

    fn invalid(&self, e: impl std::fmt::Display) -> PullError {
        PullError::InvalidContent(format!(
            "{}: registry {} sent invalid content: {e}",
            self.prefix(),
            self.ep.host
        ))
    }

    fn unsupported(&self, e: ManifestError) -> PullError {
        PullError::Unsupported(format!("{}: {e}", self.prefix()))
    }

    fn blob(&self, e: BlobError) -> PullError {
        match e {
            BlobError::Io { .. } => PullError::Store(format!("{}: {e}", self.prefix())),
            BlobError::Download { ref source, .. } if is_digest_error(source.as_ref()) => {
                self.invalid(e)
            }
            BlobError::Download { .. } => PullError::Unavailable(format!("{}: {e}", self.prefix())),
            _ => self.invalid(e),
        }
    }

    fn registry(&self, e: OciDistributionError) -> PullError {
        let p = self.prefix();
        let host = &self.ep.host;
        let not_found = || PullError::NotFound(format!("{p}: not found on {host}"));
        let unauth = || {
            PullError::Unauthenticated(format!(
                "{p}: registry {host} requires credentials, or refused the ones given (check the pod's imagePullSecrets)"
            ))
        };
        let denied = || {
            PullError::PermissionDenied(format!(
                "{p}: registry {host} denied access to {}",
                self.image.repository()
            ))
        };
        match e {
            OciDistributionError::RegistryError { envelope, .. } => {
                let code = envelope.errors.first().map(|e| &e.code);
                match code {
                    Some(
                        OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound,
                    ) => not_found(),
                    Some(OciErrorCode::Unauthorized) => unauth(),
                    Some(OciErrorCode::Denied) => denied(),
                    Some(OciErrorCode::Toomanyrequests) => PullError::Unavailable(format!(
                        "{p}: registry {host} is rate limiting: {envelope}"
                    )),
                    _ => PullError::InvalidContent(format!(
                        "{p}: registry {host} answered: {envelope}"
                    )),
                }
            }
            OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => unauth(),
            OciDistributionError::ServerError { code, message, .. } => match code {
                404 => not_found(),
                401 => unauth(),
                403 => denied(),
                _ => PullError::Unavailable(format!(
                    "{p}: registry {host} answered HTTP {code}: {}",
                    message.trim()
                )),
            },
            OciDistributionError::RequestError(re) => {
                let hint = if self.ep.plain_http {
                    String::new()
                } else {
                    format!(" (if {host} serves plain HTTP, list it as an insecure registry)")
                };
                PullError::Unavailable(format!(
                    "{p}: cannot reach registry {host}: {}{hint}",
                    error_chain(&re)
                ))
            }
            OciDistributionError::DigestError(_)
            | OciDistributionError::ManifestParsingError(_)
            | OciDistributionError::VersionedParsingError(_)
            | OciDistributionError::ManifestEncodingError(_)
            | OciDistributionError::SpecViolationError(_)
            | OciDistributionError::UnsupportedSchemaVersionError(_)
            | OciDistributionError::UnsupportedMediaTypeError(_) => self.invalid(e),
            other => PullError::Unavailable(format!("{p}: registry {host}: {other}")),
        }
    }
}

/// oci-client verifies streamed blobs too; its verdict arrives as an I/O error.
fn is_digest_error(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    e.downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
#[path = "pull_tests.rs"]
mod tests;
