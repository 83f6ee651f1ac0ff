//! The content-addressed blob store: `<root>/blobs/sha256/<hex>`.
//!
//! Content is written to `<root>/tmp/`, hashed while written, fsynced, and
//! renamed into place only when its digest (and size, when known) match.
//! A blob in place is therefore always verified content.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use futures_util::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::digest::Digest;
use super::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("content digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("content {digest}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob store I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("downloading {digest}: {source}")]
    Download {
        digest: Digest,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    /// `dir` holds the blobs, `tmp` the writes in progress (same filesystem).
    pub(crate) fn new(dir: PathBuf, tmp: PathBuf) -> Self {
        Self { dir, tmp }
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Size of a stored blob.
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.path(digest)).ok().map(|m| m.len())
    }

    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, BlobError> {
        let p = self.path(digest);
        fs::read(&p).map_err(io_err(&p))
    }

    /// Removes a blob; absent is fine.
    pub(crate) fn remove(&self, digest: &Digest) -> Result<(), BlobError> {
        let p = self.path(digest);
        fsutil::remove_all(&p).map_err(io_err(&p))
    }

    /// All stored digests (files with a malformed name are ignored).
    pub(crate) fn list(&self) -> Result<Vec<Digest>, BlobError> {
        let rd = fs::read_dir(&self.dir).map_err(io_err(&self.dir))?;
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(io_err(&self.dir))?;
            if let Some(d) = e
                .file_name()
                .to_str()
                .and_then(|n| format!("sha256:{n}").parse().ok())
            {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Stores in-memory content (a manifest or a config) under its digest.
    pub fn put_bytes(&self, expected: &Digest, data: &[u8]) -> Result<(), BlobError> {
        let actual = Digest::of(data);
        if &actual != expected {
            return Err(BlobError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        if self.contains(expected) {
            return Ok(());
        }
        let mut tmp = self.temp()?;
        tmp.write_all(data).map_err(io_err(tmp.path()))?;
        self.commit(tmp, expected)
    }

    /// Stores content read from `reader`, verified against `expected`.
    pub fn put_reader(
        &self,
        expected: &Digest,
        size: Option<u64>,
        reader: impl Read,
    ) -> Result<(), BlobError> {
        let mut tmp = self.temp()?;
        let mut hasher = Sha256::new();
        let mut reader = reader;
        let mut buf = vec![0u8; 64 * 1024];
        let mut n_total = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(io_err(tmp.path()))?;
            if n == 0 {
                break;
            }
            n_total += n as u64;
            check_size(expected, size, n_total, false)?;
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).map_err(io_err(tmp.path()))?;
        }
        check_size(expected, size, n_total, true)?;
        verify(expected, hasher)?;
        self.commit(tmp, expected)
    }

    /// Stores a downloaded byte stream, verified against `expected`; a stream
    /// longer than `size` is cut off as soon as it passes it.
    pub async fn put_stream<S, B, E>(
        &self,
        expected: &Digest,
        size: Option<u64>,
        stream: S,
    ) -> Result<u64, BlobError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let tmp = self.temp()?;
        let (std_file, tmp_path) = tmp.into_parts();
        let mut file = tokio::fs::File::from_std(std_file);
        let mut hasher = Sha256::new();
        let mut n_total = 0u64;
        let mut stream = stream;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BlobError::Download {
                digest: expected.clone(),
                source: Box::new(e),
            })?;
            let chunk = chunk.as_ref();
            n_total += chunk.len() as u64;
            check_size(expected, size, n_total, false)?;
            hasher.update(chunk);
            file.write_all(chunk).await.map_err(io_err(&tmp_path))?;
        }
        check_size(expected, size, n_total, true)?;
        verify(expected, hasher)?;
        file.sync_all().await.map_err(io_err(&tmp_path))?;
        drop(file);
        let dst = self.path(expected);
        tmp_path.persist(&dst).map_err(|e| BlobError::Io {
            path: dst.clone(),
            source: e.error,
        })?;
        fsutil::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        Ok(n_total)
    }

    fn temp(&self) -> Result<tempfile::NamedTempFile, BlobError> {
        tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&self.tmp)
            .map_err(io_err(&self.tmp))
    }

    fn commit(&self, tmp: tempfile::NamedTempFile, digest: &Digest) -> Result<(), BlobError> {
        tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
        let dst = self.path(digest);
        tmp.persist(&dst).map_err(|e| BlobError::Io {
            path: dst.clone(),
            source: e.error,
        })?;
        fsutil::sync_dir(&self.dir).map_err(io_err(&self.dir))
    }
}

fn check_size(digest: &Digest, size: Option<u64>, n: u64, done: bool) -> Result<(), BlobError> {
    match size {
        Some(expected) if n > expected || (done && n != expected) => Err(BlobError::SizeMismatch {
            digest: digest.clone(),
            expected,
            actual: n,
        }),
        _ => Ok(()),
    }
}

fn verify(expected: &Digest, hasher: Sha256) -> Result<(), BlobError> {
    let actual = Digest::from_hasher(hasher);
    if &actual != expected {
        return Err(BlobError::DigestMismatch {
            expected: expected.clone(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("blobs")).unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let s = BlobStore::new(dir.path().join("blobs"), dir.path().join("tmp"));
        (dir, s)
    }

    fn empty(dir: &Path) -> bool {
        fs::read_dir(dir).unwrap().next().is_none()
    }

    #[test]
    fn verified_content_is_stored() {
        let (dir, s) = store();
        let d = Digest::of(b"content");
        s.put_reader(&d, Some(7), &b"content"[..]).unwrap();
        assert_eq!(s.read(&d).unwrap(), b"content");
        assert_eq!(s.list().unwrap(), vec![d.clone()]);
        s.put_bytes(&d, b"content").unwrap();
        assert!(empty(&dir.path().join("tmp")));
    }

    #[test]
    fn digest_mismatch_leaves_nothing_behind() {
        let (dir, s) = store();
        let d = Digest::of(b"content");
        let err = s.put_reader(&d, None, &b"tampered"[..]).unwrap_err();
        assert!(matches!(err, BlobError::DigestMismatch { .. }), "{err}");
        let err = s.put_bytes(&d, b"tampered").unwrap_err();
        assert!(matches!(err, BlobError::DigestMismatch { .. }), "{err}");
        let err = s.put_reader(&d, Some(3), &b"content"[..]).unwrap_err();
        assert!(matches!(err, BlobError::SizeMismatch { .. }), "{err}");
        assert!(!s.contains(&d));
        assert!(empty(&dir.path().join("blobs")));
        assert!(empty(&dir.path().join("tmp")));
    }

    #[tokio::test]
    async fn streams_are_verified() {
        let (dir, s) = store();
        let d = Digest::of(b"abcdef");
        let chunks = || {
            futures_util::stream::iter(vec![
                Ok::<_, io::Error>(b"abc".to_vec()),
                Ok(b"def".to_vec()),
            ])
        };
        let err = s
            .put_stream(&Digest::of(b"x"), None, chunks())
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::DigestMismatch { .. }), "{err}");
        let err = s.put_stream(&d, Some(4), chunks()).await.unwrap_err();
        assert!(matches!(err, BlobError::SizeMismatch { .. }), "{err}");
        assert!(empty(&dir.path().join("tmp")));
        assert_eq!(s.put_stream(&d, Some(6), chunks()).await.unwrap(), 6);
        assert_eq!(s.read(&d).unwrap(), b"abcdef");
        assert!(empty(&dir.path().join("tmp")));
    }
}
