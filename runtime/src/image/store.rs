//! The image store on disk:
//!
//! ```text
//! <root>/blobs/sha256/<hex>     verified content: manifests, configs, layer blobs
//! <root>/layers/sha256/<hex>/   a layer unpacked once, named by its diff ID
//! <root>/images/<hex>.json      one record per image, named by its config digest
//! <root>/leases/<id>.json       layers a container's root filesystem uses
//! <root>/tmp/                   writes in progress (emptied on open)
//! ```
//!
//! Every rename into `blobs/`, `layers/`, `images/` and `leases/` happens
//! only after the content was verified and synced, so what is there is whole.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::blobs::{BlobError, BlobStore};
use super::digest::Digest;
use super::fsutil;
use super::manifest::{self, ConfigFile, Descriptor, ImageConfig, Manifest, ManifestError};
use super::reference::ImageRef;
use super::unpack::{self, UnpackError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("layer {layer}: {source}")]
    Unpack { layer: Digest, source: UnpackError },
    #[error("image {0:?} not found")]
    NotFound(String),
    #[error("content {0} is missing from the store")]
    MissingContent(Digest),
    #[error("image store task failed: {0}")]
    Task(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One layer of an image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LayerInfo {
    /// Digest of the (compressed) blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar; names the unpacked directory.
    pub diff_id: Digest,
    pub media_type: String,
    pub size: u64,
}

/// What the store knows about one image. The image ID is its config digest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    pub id: Digest,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    /// The linux/amd64 image manifest.
    pub manifest: Digest,
    /// The index it was selected from, when the reference named an index.
    #[serde(default)]
    pub index: Option<Digest>,
    /// Bytes of content: manifest, config and layer blobs.
    pub size: u64,
    /// Bottom layer first.
    pub layers: Vec<LayerInfo>,
    pub config: ImageConfig,
    /// Seconds since the epoch when the record was last written.
    pub updated: u64,
    #[serde(default)]
    pub pinned: bool,
}

/// An image ready to become a root filesystem.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub record: ImageRecord,
    /// Unpacked layer directories, bottom layer first.
    pub layer_dirs: Vec<PathBuf>,
}

/// Disk use of the store.
#[derive(Debug, Clone, Copy)]
pub struct FsUsage {
    pub bytes: u64,
    pub inodes: u64,
    pub timestamp_nanos: i64,
}

/// A verified image to record: its blobs are in the blob store already.
pub(crate) struct Commit {
    pub name: Option<ImageRef>,
    pub index: Option<Digest>,
    pub manifest_digest: Digest,
    pub manifest_size: u64,
    pub manifest: Manifest,
    pub config_digest: Digest,
    pub config: ConfigFile,
}

/// Per-key async mutexes, for download and unpack single-flight.
#[derive(Default)]
pub(crate) struct KeyedLocks {
    map: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    pub(crate) async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, w| w.strong_count() > 0);
            match map.get(key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key.to_owned(), Arc::downgrade(&m));
                    m
                }
            }
        };
        m.lock_owned().await
    }
}

type Holds = Arc<Mutex<HashMap<Digest, usize>>>;

/// Keeps content from garbage collection while an operation uses it.
pub(crate) struct Hold {
    holds: Holds,
    digests: Vec<Digest>,
}

impl Hold {
    pub(crate) fn add(&mut self, d: &Digest) {
        let mut h = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        *h.entry(d.clone()).or_default() += 1;
        self.digests.push(d.clone());
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut h = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        for d in &self.digests {
            if let Some(n) = h.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    h.remove(d);
                }
            }
        }
    }
}

pub struct ImageStore {
    root: PathBuf,
    blobs: BlobStore,
    layers: PathBuf,
    images: PathBuf,
    leases: PathBuf,
    tmp: PathBuf,
    index: RwLock<HashMap<Digest, ImageRecord>>,
    holds: Holds,
    pub(crate) locks: KeyedLocks,
    load_warnings: Vec<String>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.root)
            .finish()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ImageStore {
    /// Opens (creating if needed) the store under `root` and loads its image
    /// records. A record that cannot be read, or whose layers are missing, is
    /// reported (see [`ImageStore::load_warnings`]) and skipped.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let blobs_dir = root.join("blobs/sha256");
        let layers = root.join("layers/sha256");
        let images = root.join("images");
        let leases = root.join("leases");
        let tmp = root.join("tmp");
        fsutil::remove_all(&tmp).map_err(io_at(&tmp))?;
        for d in [&blobs_dir, &layers, &images, &leases, &tmp] {
            fs::create_dir_all(d).map_err(io_at(d))?;
        }
        // Layers hold the images' set-id files and device nodes: no host
        // user but root may reach them.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(io_at(&root))?;
        let mut store = Self {
            blobs: BlobStore::new(blobs_dir, tmp.clone()),
            root,
            layers,
            images,
            leases,
            tmp,
            index: RwLock::default(),
            holds: Holds::default(),
            locks: KeyedLocks::default(),
            load_warnings: Vec::new(),
        };
        store.load()?;
        Ok(store)
    }

    fn load(&mut self) -> Result<(), StoreError> {
        let mut index: HashMap<Digest, ImageRecord> = HashMap::new();
        let rd = fs::read_dir(&self.images).map_err(io_at(&self.images))?;
        for e in rd {
            let path = e.map_err(io_at(&self.images))?.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let rec = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<ImageRecord>(&b).map_err(|e| e.to_string()))
                .and_then(|r| {
                    let missing = r
                        .layers
                        .iter()
                        .find(|l| !self.layer_dir(&l.diff_id).is_dir());
                    match missing {
                        Some(l) => Err(format!("layer {} is not unpacked", l.diff_id)),
                        None => Ok(r),
                    }
                });
            match rec {
                Ok(r) => {
                    index.insert(r.id.clone(), r);
                }
                Err(why) => {
                    let msg = format!("skipping image record {}: {why}", path.display());
                    tracing::error!("{msg}");
                    self.load_warnings.push(msg);
                }
            }
        }
        // A tag names one image; if a crash left it on two, the newer wins.
        let mut owner: HashMap<String, (u64, Digest)> = HashMap::new();
        for r in index.values() {
            for t in &r.repo_tags {
                let e = owner.entry(t.clone()).or_insert((r.updated, r.id.clone()));
                if r.updated > e.0 {
                    *e = (r.updated, r.id.clone());
                }
            }
        }
        for r in index.values_mut() {
            r.repo_tags
                .retain(|t| owner.get(t).is_some_and(|(_, id)| id == &r.id));
        }
        *self.index.get_mut().unwrap_or_else(|e| e.into_inner()) = index;
        Ok(())
    }

    /// Problems found while loading the records (each record was skipped).
    pub fn load_warnings(&self) -> &[String] {
        &self.load_warnings
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Where the layer with this diff ID is (or will be) unpacked.
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.layers.join(diff_id.hex())
    }

    pub(crate) fn hold(&self) -> Hold {
        Hold {
            holds: self.holds.clone(),
            digests: Vec::new(),
        }
    }

    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Digest, ImageRecord>> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Digest, ImageRecord>> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// All images, sorted by ID.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut v: Vec<_> = self.read_index().values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Finds an image by ID (`sha256:<hex>`, `<hex>`, or a unique hex prefix of
    /// at least 4 digits), by tag or by repo digest reference.
    pub fn get(&self, id_or_ref: &str) -> Option<ImageRecord> {
        let s = id_or_ref.trim();
        let index = self.read_index();
        if let Ok(d) = s.parse::<Digest>() {
            return index.get(&d).cloned();
        }
        if let Ok(r) = ImageRef::parse(s) {
            let want = r.to_string();
            let found = index
                .values()
                .find(|rec| rec.repo_tags.contains(&want) || rec.repo_digests.contains(&want));
            if let Some(rec) = found {
                return Some(rec.clone());
            }
        }
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut it = index.keys().filter(|k| k.hex().starts_with(hex));
            if let (Some(k), None) = (it.next(), it.next()) {
                return index.get(k).cloned();
            }
        }
        None
    }

    /// The image and its unpacked layer directories.
    pub fn resolve(&self, id_or_ref: &str) -> Result<ResolvedImage, StoreError> {
        let record = self
            .get(id_or_ref)
            .ok_or_else(|| StoreError::NotFound(id_or_ref.to_owned()))?;
        let layer_dirs = record
            .layers
            .iter()
            .map(|l| self.layer_dir(&l.diff_id))
            .collect();
        Ok(ResolvedImage { record, layer_dirs })
    }

    /// Unpacks a stored layer blob unless already unpacked; concurrent calls
    /// for the same layer unpack once.
    pub(crate) async fn unpack_once(
        &self,
        desc: &Descriptor,
        diff_id: &Digest,
    ) -> Result<(), StoreError> {
        let _guard = self.locks.lock(&format!("layer:{diff_id}")).await;
        let dst = self.layer_dir(diff_id);
        if dst.is_dir() {
            return Ok(());
        }
        if !self.blobs.contains(&desc.digest) {
            return Err(StoreError::MissingContent(desc.digest.clone()));
        }
        let compression = manifest::layer_compression(&desc.media_type)?;
        let blob = self.blobs.path(&desc.digest);
        let tmp_root = self.tmp.clone();
        let layers = self.layers.clone();
        let diff_id = diff_id.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let tmp = tempfile::Builder::new()
                .prefix("layer-")
                .tempdir_in(&tmp_root)
                .map_err(io_at(&tmp_root))?;
            let f = fs::File::open(&blob).map_err(io_at(&blob))?;
            unpack::unpack_layer(f, compression, tmp.path(), &diff_id).map_err(|source| {
                StoreError::Unpack {
                    layer: diff_id.clone(),
                    source,
                }
            })?;
            syncfs(tmp.path())?;
            let path = tmp.keep();
            fs::rename(&path, &dst).map_err(|e| {
                let _ = fs::remove_dir_all(&path);
                io_at(&dst)(e)
            })?;
            fsutil::sync_dir(&layers).map_err(io_at(&layers))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Unpacks the layers of a verified image and records it under its name.
    pub(crate) async fn commit(&self, c: Commit) -> Result<ImageRecord, StoreError> {
        manifest::check_image(&c.manifest, &c.config)?;
        for (desc, diff_id) in c.manifest.layers.iter().zip(&c.config.diff_ids) {
            self.unpack_once(desc, diff_id).await?;
        }
        let layers: Vec<LayerInfo> = c
            .manifest
            .layers
            .iter()
            .zip(&c.config.diff_ids)
            .map(|(d, diff_id)| LayerInfo {
                digest: d.digest.clone(),
                diff_id: diff_id.clone(),
                media_type: d.media_type.clone(),
                size: d.size,
            })
            .collect();
        let size =
            c.manifest_size + c.manifest.config.size + layers.iter().map(|l| l.size).sum::<u64>();
        let mut tags = Vec::new();
        let mut digests = Vec::new();
        if let Some(name) = &c.name {
            if name.tag().is_some() {
                tags.push(name.to_string());
            }
            let top = c.index.as_ref().unwrap_or(&c.manifest_digest);
            digests.push(name.with_digest(top).to_string());
        }

        let mut index = self.write_index();
        let mut changed = Vec::new();
        for (id, rec) in index.iter_mut() {
            if id != &c.config_digest && rec.repo_tags.iter().any(|t| tags.contains(t)) {
                rec.repo_tags.retain(|t| !tags.contains(t));
                rec.updated = now_secs();
                changed.push(rec.clone());
            }
        }
        let rec = index
            .entry(c.config_digest.clone())
            .or_insert_with(|| ImageRecord {
                id: c.config_digest.clone(),
                repo_tags: Vec::new(),
                repo_digests: Vec::new(),
                manifest: c.manifest_digest.clone(),
                index: c.index.clone(),
                size,
                layers,
                config: c.config.config.clone(),
                updated: 0,
                pinned: false,
            });
        for t in tags {
            if !rec.repo_tags.contains(&t) {
                rec.repo_tags.push(t);
            }
        }
        for d in digests {
            if !rec.repo_digests.contains(&d) {
                rec.repo_digests.push(d);
            }
        }
        rec.updated = now_secs();
        let rec = rec.clone();
        drop(index);
        for r in changed.iter().chain(std::iter::once(&rec)) {
            self.persist(r)?;
        }
        Ok(rec)
    }

    fn record_path(&self, id: &Digest) -> PathBuf {
        self.images.join(format!("{}.json", id.hex()))
    }

    fn persist(&self, rec: &ImageRecord) -> Result<(), StoreError> {
        let path = self.record_path(&rec.id);
        let data = serde_json::to_vec_pretty(rec).map_err(|e| io_at(&path)(e.into()))?;
        fsutil::write_atomic(&path, &data).map_err(io_at(&path))
    }

    /// Removes an image and all its names; content no other image or
    /// container uses is deleted. An unknown image is not an error (`None`).
    pub async fn remove(&self, id_or_ref: &str) -> Result<Option<ImageRecord>, StoreError> {
        let Some(rec) = self.get(id_or_ref) else {
            return Ok(None);
        };
        let path = self.record_path(&rec.id);
        fsutil::remove_all(&path).map_err(io_at(&path))?;
        fsutil::sync_dir(&self.images).map_err(io_at(&self.images))?;
        self.write_index().remove(&rec.id);
        self.gc().await?;
        Ok(Some(rec))
    }

    /// Deletes blobs and unpacked layers that no image, lease or operation in
    /// progress refers to. Returns how many items were deleted.
    pub async fn gc(&self) -> Result<usize, StoreError> {
        let doomed_dir = tempfile::Builder::new()
            .prefix("gc-")
            .tempdir_in(&self.tmp)
            .map_err(io_at(&self.tmp))?;
        let mut n = 0;
        {
            // Holding the hold table keeps new holds and leases out while we decide.
            let holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
            let mut keep: HashSet<Digest> = holds.keys().cloned().collect();
            for r in self.read_index().values() {
                keep.insert(r.id.clone());
                keep.insert(r.manifest.clone());
                keep.extend(r.index.clone());
                for l in &r.layers {
                    keep.insert(l.digest.clone());
                    keep.insert(l.diff_id.clone());
                }
            }
            keep.extend(self.leased_layers()?);
            for d in self.blobs.list()? {
                if !keep.contains(&d) {
                    self.blobs.remove(&d)?;
                    n += 1;
                }
            }
            let rd = fs::read_dir(&self.layers).map_err(io_at(&self.layers))?;
            for e in rd {
                let e = e.map_err(io_at(&self.layers))?;
                let Some(d) = e
                    .file_name()
                    .to_str()
                    .and_then(|h| format!("sha256:{h}").parse::<Digest>().ok())
                else {
                    continue;
                };
                if !keep.contains(&d) {
                    let to = doomed_dir.path().join(d.hex());
                    fs::rename(e.path(), &to).map_err(io_at(&to))?;
                    n += 1;
                }
            }
        }
        tokio::task::spawn_blocking(move || drop(doomed_dir))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?;
        Ok(n)
    }

    fn lease_path(&self, owner: &str) -> PathBuf {
        self.leases.join(format!("{}.json", hex::encode(owner)))
    }

    fn leased_layers(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.leases).map_err(io_at(&self.leases))?;
        for e in rd {
            let p = e.map_err(io_at(&self.leases))?.path();
            match fs::read(&p).map(|b| serde_json::from_slice::<Vec<Digest>>(&b)) {
                Ok(Ok(v)) => out.extend(v),
                // Unreadable leases keep nothing; their layers may be collected.
                other => tracing::warn!(lease = %p.display(), ?other, "ignoring unreadable lease"),
            }
        }
        Ok(out)
    }

    /// Records that `owner` (a container) uses these layers; the layers must
    /// be kept until the lease is removed. Fails if one is not unpacked.
    pub fn add_lease(&self, owner: &str, diff_ids: &[Digest]) -> Result<(), StoreError> {
        let _holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = diff_ids.iter().find(|d| !self.layer_dir(d).is_dir()) {
            return Err(StoreError::MissingContent(d.clone()));
        }
        let path = self.lease_path(owner);
        let data = serde_json::to_vec(diff_ids).map_err(|e| io_at(&path)(e.into()))?;
        fsutil::write_atomic(&path, &data).map_err(io_at(&path))
    }

    /// Drops `owner`'s lease; absent is fine.
    pub fn remove_lease(&self, owner: &str) -> Result<(), StoreError> {
        let path = self.lease_path(owner);
        fsutil::remove_all(&path).map_err(io_at(&path))
    }

    /// Bytes and inodes used under the store root.
    pub async fn usage(&self) -> Result<FsUsage, StoreError> {
        let root = self.root.clone();
        let (bytes, inodes) = tokio::task::spawn_blocking(move || fsutil::usage(&root))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
            .map_err(io_at(&self.root))?;
        let timestamp_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        Ok(FsUsage {
            bytes,
            inodes,
            timestamp_nanos,
        })
    }
}

/// Flushes the filesystem holding `path` (one call for a whole unpacked tree).
fn syncfs(path: &Path) -> Result<(), StoreError> {
    let f = fs::File::open(path).map_err(io_at(path))?;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io_at(path)(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
