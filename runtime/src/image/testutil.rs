//! Test helpers: building layer tars, including malformed ones.

use std::io::Write;

use super::digest::Digest;
use super::manifest::Compression;

/// Builds a layer tar entry by entry; raw names allow malformed archives.
pub(crate) struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl LayerBuilder {
    pub(crate) fn new() -> Self {
        Self {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(name: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    pub(crate) fn dir(mut self, name: &str) -> Self {
        let mut h = Self::header(name, tar::EntryType::Directory, 0o755, 0);
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    pub(crate) fn file(self, name: &str, data: &[u8]) -> Self {
        self.file_owned(name, data, 0o644, 0, 0)
    }

    pub(crate) fn file_owned(
        mut self,
        name: &str,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> Self {
        let mut h = Self::header(name, tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub(crate) fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
        let mut h = Self::header(name, kind, 0o777, 0);
        let t = target.as_bytes();
        h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    pub(crate) fn device(
        mut self,
        name: &str,
        kind: tar::EntryType,
        major: u32,
        minor: u32,
    ) -> Self {
        let mut h = Self::header(name, kind, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    /// A file carrying PAX xattrs.
    pub(crate) fn file_with_xattrs(mut self, name: &str, xattrs: &[(&str, &[u8])]) -> Self {
        let pax: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.b
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        self.file(name, b"x")
    }

    /// The uncompressed tar and its diff ID.
    pub(crate) fn finish(self) -> (Vec<u8>, Digest) {
        let data = self.b.into_inner().unwrap();
        let d = Digest::of(&data);
        (data, d)
    }
}

pub(crate) fn compress(data: &[u8], c: Compression) -> Vec<u8> {
    match c {
        Compression::None => data.to_vec(),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 1).unwrap(),
    }
}

/// Writes OCI image layouts for tests.
pub(crate) struct Layout {
    pub(crate) dir: std::path::PathBuf,
    manifests: Vec<serde_json::Value>,
}

/// What a test image is made of.
pub(crate) struct TestImage {
    pub(crate) manifest: Digest,
    pub(crate) config: Digest,
    pub(crate) layers: Vec<(Digest, Digest)>,
}

impl Layout {
    pub(crate) fn new(dir: &std::path::Path) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Self {
            dir: dir.to_owned(),
            manifests: Vec::new(),
        }
    }

    pub(crate) fn blob(&self, data: &[u8]) -> Digest {
        let d = Digest::of(data);
        std::fs::write(self.dir.join("blobs/sha256").join(d.hex()), data).unwrap();
        d
    }

    /// Adds an image of `layers` (uncompressed tars, each with its compression),
    /// named by the containerd annotation when `name` is given.
    pub(crate) fn image(
        &mut self,
        name: Option<&str>,
        layers: &[(Vec<u8>, Compression)],
        cmd: &[&str],
    ) -> TestImage {
        self.image_with_diff_ids(name, layers, cmd, None)
    }

    pub(crate) fn image_with_diff_ids(
        &mut self,
        name: Option<&str>,
        layers: &[(Vec<u8>, Compression)],
        cmd: &[&str],
        diff_ids: Option<Vec<Digest>>,
    ) -> TestImage {
        use super::manifest::OCI_MANIFEST;
        let mut descs = Vec::new();
        let mut out_layers = Vec::new();
        for (tar, c) in layers {
            let blob = compress(tar, *c);
            let d = self.blob(&blob);
            let mt = match c {
                Compression::None => "application/vnd.oci.image.layer.v1.tar",
                Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            };
            descs.push(
                serde_json::json!({"mediaType": mt, "digest": d.to_string(), "size": blob.len()}),
            );
            out_layers.push((d, Digest::of(tar)));
        }
        let diff_ids = diff_ids.unwrap_or_else(|| out_layers.iter().map(|l| l.1.clone()).collect());
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "User": "1000", "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>()},
        });
        let config = serde_json::to_vec(&config).unwrap();
        let cd = self.blob(&config);
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
            "layers": descs,
        });
        let manifest = serde_json::to_vec(&manifest).unwrap();
        let md = self.blob(&manifest);
        let mut entry = serde_json::json!({"mediaType": OCI_MANIFEST, "digest": md.to_string(), "size": manifest.len()});
        if let Some(n) = name {
            entry["annotations"] = serde_json::json!({"io.containerd.image.name": n});
        }
        self.manifests.push(entry);
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": super::manifest::OCI_INDEX, "manifests": self.manifests});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        TestImage {
            manifest: md,
            config: cd,
            layers: out_layers,
        }
    }

    /// A tar of the layout.
    pub(crate) fn tar(&self, out: &std::path::Path) {
        let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
        b.append_dir_all(".", &self.dir).unwrap();
        b.finish().unwrap();
    }
}
