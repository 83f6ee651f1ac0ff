//! Import of an OCI image layout (`oci-layout`, `index.json`, `blobs/`) from
//! a directory or a tar of one, for air-gapped nodes and the demo image.
//! Every blob is verified against its digest on the way into the store, as
//! for a pull.
//!
//! Image names come from the `io.containerd.image.name` annotation, else
//! from `org.opencontainers.image.ref.name` when it is a full reference, else
//! from the caller's base name with `ref.name` as the tag.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::blobs::BlobError;
use super::digest::Digest;
use super::manifest::{self, Descriptor, Document, ManifestError};
use super::reference::{ImageRef, ReferenceError};
use super::store::{Commit, Hold, ImageRecord, ImageStore, StoreError};

const NAME_ANNOTATION: &str = "io.containerd.image.name";
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not an OCI image layout: {1}")]
    NotLayout(PathBuf, String),
    #[error("{0} holds no linux/amd64 image")]
    NoImage(PathBuf),
    #[error("image name in layout: {0}")]
    Name(#[from] ReferenceError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ImportError + '_ {
    move |source| ImportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Imports every linux/amd64 image of the layout at `path` (a directory or a
/// tar file). `base_name` names images whose layout gives only a tag.
pub async fn import_layout(
    store: &Arc<ImageStore>,
    path: &Path,
    base_name: Option<&ImageRef>,
) -> Result<Vec<ImageRecord>, ImportError> {
    let s = store.clone();
    let p = path.to_owned();
    let base = base_name.cloned();
    let result = async {
        let (commits, hold) = tokio::task::spawn_blocking(move || prepare(&s, &p, base.as_ref()))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        let mut out = Vec::new();
        for c in commits {
            out.push(store.commit(c).await?);
        }
        drop(hold);
        Ok(out)
    }
    .await;
    if result.is_err() {
        // Content verified before the failure belongs to no image: drop it.
        if let Err(e) = store.gc().await {
            tracing::warn!(error = %e, "cleaning up after a failed import");
        }
    }
    result
}

/// Where the layout's blobs are read from.
enum Source {
    /// An unpacked layout: blobs are verified while copied into the store.
    Dir(PathBuf),
    /// A tar layout whose blobs were already verified into the store.
    Store,
}

fn prepare(
    store: &ImageStore,
    path: &Path,
    base: Option<&ImageRef>,
) -> Result<(Vec<Commit>, Hold), ImportError> {
    let mut hold = store.hold();
    let meta = fs::metadata(path).map_err(io_at(path))?;
    let (index_json, source) = if meta.is_dir() {
        let p = path.join("index.json");
        let data = fs::read(&p)
            .map_err(|e| ImportError::NotLayout(path.to_owned(), format!("index.json: {e}")))?;
        (data, Source::Dir(path.to_owned()))
    } else {
        (ingest_tar(store, path, &mut hold)?, Source::Store)
    };
    let fetch = |d: &Descriptor, hold: &mut Hold| -> Result<(), ImportError> {
        hold.add(&d.digest);
        if let Source::Dir(root) = &source {
            if !store.blobs().contains(&d.digest) {
                let p = root.join("blobs/sha256").join(d.digest.hex());
                let f = File::open(&p).map_err(io_at(&p))?;
                store.blobs().put_reader(&d.digest, Some(d.size), f)?;
            }
        }
        match store.blobs().size(&d.digest) {
            Some(n) if n == d.size => Ok(()),
            Some(n) => Err(BlobError::SizeMismatch {
                digest: d.digest.clone(),
                expected: d.size,
                actual: n,
            }
            .into()),
            None => Err(StoreError::MissingContent(d.digest.clone()).into()),
        }
    };

    let top = match manifest::parse_document(&index_json, manifest::OCI_INDEX)? {
        Document::Index(i) => i,
        Document::Manifest(_) => {
            return Err(ImportError::NotLayout(
                path.to_owned(),
                "index.json is not an index".into(),
            ))
        }
    };
    let mut commits = Vec::new();
    for desc in &top.manifests {
        if desc.platform.as_ref().is_some_and(|p| {
            p.os != manifest::PLATFORM_OS || p.architecture != manifest::PLATFORM_ARCH
        }) {
            continue;
        }
        let name = name_of(desc, base)?;
        fetch(desc, &mut hold)?;
        let bytes = store.blobs().read(&desc.digest)?;
        let (index, mdesc, mbytes) = match manifest::parse_document(&bytes, &desc.media_type)? {
            Document::Manifest(_) => (None, desc.clone(), bytes),
            Document::Index(i) => {
                let m = manifest::select_platform(&i)?.clone();
                fetch(&m, &mut hold)?;
                let b = store.blobs().read(&m.digest)?;
                (Some(desc.digest.clone()), m, b)
            }
        };
        let Document::Manifest(m) = manifest::parse_document(&mbytes, &mdesc.media_type)? else {
            return Err(ManifestError::MediaType("nested image index".into()).into());
        };
        fetch(&m.config, &mut hold)?;
        let config = manifest::parse_config(&store.blobs().read(&m.config.digest)?)?;
        manifest::check_image(&m, &config)?;
        for l in &m.layers {
            fetch(l, &mut hold)?;
        }
        for d in &config.diff_ids {
            hold.add(d);
        }
        commits.push(Commit {
            name,
            index,
            manifest_digest: mdesc.digest.clone(),
            manifest_size: mdesc.size,
            config_digest: m.config.digest.clone(),
            manifest: m,
            config,
        });
    }
    if commits.is_empty() {
        return Err(ImportError::NoImage(path.to_owned()));
    }
    Ok((commits, hold))
}

fn name_of(desc: &Descriptor, base: Option<&ImageRef>) -> Result<Option<ImageRef>, ImportError> {
    if let Some(n) = desc.annotations.get(NAME_ANNOTATION) {
        return Ok(Some(ImageRef::parse(n)?));
    }
    let Some(r) = desc.annotations.get(REF_NAME_ANNOTATION) else {
        return Ok(base.cloned());
    };
    if r.contains('/') {
        return Ok(Some(ImageRef::parse(r)?));
    }
    match base {
        Some(b) => Ok(Some(ImageRef::parse(&format!("{}:{r}", b.name()))?)),
        None => Ok(None),
    }
}

/// Streams the blobs of a layout tar into the store (each verified against
/// its file name) and returns `index.json`.
fn ingest_tar(store: &ImageStore, path: &Path, hold: &mut Hold) -> Result<Vec<u8>, ImportError> {
    let f = File::open(path).map_err(io_at(path))?;
    let mut archive = tar::Archive::new(io::BufReader::new(f));
    let mut index = None;
    let bad = |why: String| ImportError::NotLayout(path.to_owned(), why);
    for entry in archive.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        if !matches!(
            entry.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        ) {
            continue;
        }
        let raw = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let parts: Vec<String> = raw
            .components()
            .filter_map(|c| match c {
                Component::Normal(p) => Some(p.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        match parts.as_slice() {
            [f] if f == "index.json" => {
                let mut v = Vec::new();
                entry.read_to_end(&mut v).map_err(|e| bad(e.to_string()))?;
                index = Some(v);
            }
            [b, alg, hex] if b == "blobs" => {
                let d: Digest = format!("{alg}:{hex}")
                    .parse()
                    .map_err(|e| bad(format!("{}: {e}", raw.display())))?;
                hold.add(&d);
                if !store.blobs().contains(&d) {
                    let size = entry.header().size().ok();
                    store.blobs().put_reader(&d, size, &mut entry)?;
                }
            }
            _ => {}
        }
    }
    index.ok_or_else(|| bad("no index.json".into()))
}
