//! The CRI ImageService over the image store: PullImage, ListImages,
//! ImageStatus, RemoveImage, ImageFsInfo.
//!
//! RemoveImage follows containerd: the image and all its names are removed
//! even while containers use it; the layers those containers' root
//! filesystems use stay (held by their leases) until the containers' root
//! filesystems are torn down.

use std::sync::Arc;

use base64::Engine as _;
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::{
    AuthConfig, FilesystemIdentifier, FilesystemUsage, Image, ImageFsInfoRequest,
    ImageFsInfoResponse, ImageSpec, ImageStatusRequest, ImageStatusResponse, Int64Value,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse, UInt64Value,
};
use tonic::{Request, Response, Status};

use super::{rpc, CriError};
use crate::image::pull::{Credentials, PullError, Puller};
use crate::image::reference::ImageRef;
use crate::image::store::{ImageRecord, ImageStore, StoreError};

impl From<PullError> for CriError {
    fn from(e: PullError) -> Self {
        match e {
            PullError::NotFound(m) => Self::NotFound(m),
            PullError::Unauthenticated(m) => Self::Unauthenticated(m),
            PullError::PermissionDenied(m) => Self::PermissionDenied(m),
            PullError::Unavailable(m) => Self::Unavailable(m),
            PullError::InvalidContent(m) => Self::DataLoss(m),
            PullError::Unsupported(m) => Self::FailedPrecondition(m),
            PullError::Store(m) => Self::Internal(m),
        }
    }
}

impl From<StoreError> for CriError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => Self::NotFound(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// The ImageService: serve it with
/// `ImageServiceServer::new(CriImageService::new(puller))`.
pub struct CriImageService {
    puller: Arc<Puller>,
}

impl CriImageService {
    pub fn new(puller: Arc<Puller>) -> Self {
        Self { puller }
    }

    fn store(&self) -> &Arc<ImageStore> {
        self.puller.store()
    }

    async fn pull(&self, req: PullImageRequest) -> Result<PullImageResponse, CriError> {
        let spec = image_name(req.image.as_ref())?;
        let image = ImageRef::parse(spec).map_err(|e| CriError::InvalidArgument(e.to_string()))?;
        let creds = credentials(req.auth.as_ref())?;
        let rec = self.puller.pull(&image, &creds).await?;
        Ok(PullImageResponse {
            image_ref: rec.id.to_string(),
        })
    }

    fn list(&self, req: ListImagesRequest) -> ListImagesResponse {
        let wanted = req
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.is_empty());
        let images = match wanted {
            Some(w) => self
                .store()
                .get(&w)
                .into_iter()
                .map(|r| to_cri(&r))
                .collect(),
            None => self.store().list().iter().map(to_cri).collect(),
        };
        ListImagesResponse { images }
    }

    fn status(&self, req: ImageStatusRequest) -> Result<ImageStatusResponse, CriError> {
        let spec = image_name(req.image.as_ref())?;
        let Some(rec) = self.store().get(spec) else {
            return Ok(ImageStatusResponse::default());
        };
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            let layer_dirs: Vec<String> = rec
                .layers
                .iter()
                .map(|l| self.store().layer_dir(&l.diff_id).display().to_string())
                .collect();
            let v = serde_json::json!({ "record": rec, "layerDirs": layer_dirs });
            info.insert("info".to_owned(), v.to_string());
        }
        Ok(ImageStatusResponse {
            image: Some(to_cri(&rec)),
            info,
        })
    }

    async fn remove(&self, req: RemoveImageRequest) -> Result<RemoveImageResponse, CriError> {
        let spec = image_name(req.image.as_ref())?;
        if let Some(rec) = self.store().remove(spec).await? {
            tracing::info!(image = %spec, id = %rec.id, "removed image");
        }
        Ok(RemoveImageResponse {})
    }

    async fn fs_info(&self) -> Result<ImageFsInfoResponse, CriError> {
        let u = self.store().usage().await?;
        Ok(ImageFsInfoResponse {
            image_filesystems: vec![FilesystemUsage {
                timestamp: u.timestamp_nanos,
                fs_id: Some(FilesystemIdentifier {
                    mountpoint: self.store().root().display().to_string(),
                }),
                used_bytes: Some(UInt64Value { value: u.bytes }),
                inodes_used: Some(UInt64Value { value: u.inodes }),
            }],
            container_filesystems: Vec::new(),
        })
    }
}

fn image_name(spec: Option<&ImageSpec>) -> Result<&str, CriError> {
    match spec.map(|s| s.image.trim()) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(CriError::InvalidArgument(
            "image spec is empty: name an image".into(),
        )),
    }
}

/// The CRI user fields from the image config's `User` (`uid[:gid]` or
/// `name[:group]`), as containerd reports them.
pub fn image_user(user: &str) -> (Option<i64>, String) {
    let u = user.split(':').next().unwrap_or("");
    if u.is_empty() {
        return (None, String::new());
    }
    match u.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, u.to_owned()),
    }
}

fn to_cri(rec: &ImageRecord) -> Image {
    let (uid, username) = image_user(&rec.config.user);
    Image {
        id: rec.id.to_string(),
        repo_tags: rec.repo_tags.clone(),
        repo_digests: rec.repo_digests.clone(),
        size: rec.size,
        uid: uid.map(|value| Int64Value { value }),
        username,
        spec: Some(ImageSpec {
            image: rec.id.to_string(),
            ..Default::default()
        }),
        pinned: rec.pinned,
    }
}

/// Credentials from the CRI AuthConfig: username/password, `auth`
/// (base64 `user:password`), or a registry token.
pub fn credentials(auth: Option<&AuthConfig>) -> Result<Credentials, CriError> {
    let Some(a) = auth else {
        return Ok(Credentials::Anonymous);
    };
    if !a.username.is_empty() {
        return Ok(Credentials::Basic {
            username: a.username.clone(),
            password: a.password.clone(),
        });
    }
    if !a.auth.is_empty() {
        let bad = || {
            CriError::InvalidArgument("auth config: `auth` is not base64 of user:password".into())
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .map_err(|_| bad())?;
        let s = String::from_utf8(raw).map_err(|_| bad())?;
        let (u, p) = s.split_once(':').ok_or_else(bad)?;
        return Ok(Credentials::Basic {
            username: u.to_owned(),
            password: p.to_owned(),
        });
    }
    if !a.registry_token.is_empty() {
        return Ok(Credentials::RegistryToken(a.registry_token.clone()));
    }
    if !a.identity_token.is_empty() {
        return Ok(Credentials::IdentityToken(a.identity_token.clone()));
    }
    Ok(Credentials::Anonymous)
}

#[tonic::async_trait]
impl ImageService for CriImageService {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        rpc("ListImages", async { Ok(self.list(request.into_inner())) }).await
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        rpc("ImageStatus", async { self.status(request.into_inner()) }).await
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        rpc("PullImage", self.pull(request.into_inner())).await
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        rpc("RemoveImage", self.remove(request.into_inner())).await
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        rpc("ImageFsInfo", self.fs_info()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_like_containerd() {
        assert_eq!(image_user(""), (None, String::new()));
        assert_eq!(image_user("1000"), (Some(1000), String::new()));
        assert_eq!(image_user("1000:1000"), (Some(1000), String::new()));
        assert_eq!(image_user("nobody:nogroup"), (None, "nobody".to_owned()));
    }

    #[test]
    fn auth_configs() {
        let a = |f: fn(&mut AuthConfig)| {
            let mut c = AuthConfig::default();
            f(&mut c);
            credentials(Some(&c))
        };
        assert_eq!(credentials(None).unwrap(), Credentials::Anonymous);
        assert_eq!(a(|_| {}).unwrap(), Credentials::Anonymous);
        assert_eq!(
            a(|c| c.auth = "dTpwOnc=".into()).unwrap(),
            Credentials::Basic {
                username: "u".into(),
                password: "p:w".into()
            }
        );
        assert!(matches!(
            a(|c| c.auth = "%%%".into()),
            Err(CriError::InvalidArgument(_))
        ));
        assert_eq!(
            a(|c| c.registry_token = "t".into()).unwrap(),
            Credentials::RegistryToken("t".into())
        );
        assert_eq!(
            a(|c| c.identity_token = "i".into()).unwrap(),
            Credentials::IdentityToken("i".into())
        );
        let s: Status = CriError::Unimplemented("x").into();
        assert_eq!(s.code(), tonic::Code::Unimplemented);
    }
}
