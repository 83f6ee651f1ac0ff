//! The OCI (and Docker schema 2) documents the store reads: image index,
//! image manifest and image configuration. Only the fields we use are parsed;
//! unknown fields are ignored, as the image spec requires.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::digest::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Manifest media types a registry may answer with.
pub const MANIFEST_TYPES: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// The platform this runtime's guests run.
pub const PLATFORM_OS: &str = "linux";
pub const PLATFORM_ARCH: &str = "amd64";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("malformed {what}: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("unsupported manifest schema version {0} (need 2)")]
    SchemaVersion(u32),
    #[error("unsupported media type {0:?}")]
    MediaType(String),
    #[error("image index has no manifest for {PLATFORM_OS}/{PLATFORM_ARCH} (it offers: {0})")]
    NoPlatform(String),
    #[error("image is for {os}/{arch}, this runtime runs {PLATFORM_OS}/{PLATFORM_ARCH}")]
    WrongPlatform { os: String, arch: String },
    #[error("image has {layers} layers but its config lists {diff_ids} diff IDs")]
    LayerCount { layers: usize, diff_ids: usize },
    #[error("unsupported layer media type {0:?}")]
    LayerMediaType(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// A manifest document: either an index (multi-platform) or an image manifest.
#[derive(Debug, Clone)]
pub enum Document {
    Index(Index),
    Manifest(Manifest),
}

/// Parses a manifest document; `media_type` is the transport's content type
/// (empty when unknown), the document's own `mediaType` wins when present.
pub fn parse_document(bytes: &[u8], media_type: &str) -> Result<Document, ManifestError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        schema_version: Option<u32>,
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let json = |what, source| ManifestError::Json { what, source };
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| json("manifest", e))?;
    let version = probe.schema_version.unwrap_or(0);
    if version != 2 {
        return Err(ManifestError::SchemaVersion(version));
    }
    let mt = probe.media_type.as_deref().unwrap_or(media_type);
    let is_index = match mt {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        "" => probe.manifests.is_some(),
        other => return Err(ManifestError::MediaType(other.to_owned())),
    };
    if is_index {
        Ok(Document::Index(
            serde_json::from_slice(bytes).map_err(|e| json("image index", e))?,
        ))
    } else {
        Ok(Document::Manifest(
            serde_json::from_slice(bytes).map_err(|e| json("image manifest", e))?,
        ))
    }
}

/// Picks the linux/amd64 image manifest from an index, like containerd's
/// default platform matcher (entries without a platform are not picked).
pub fn select_platform(index: &Index) -> Result<&Descriptor, ManifestError> {
    index
        .manifests
        .iter()
        .find(|d| {
            matches!(d.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST | "")
                && d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == PLATFORM_OS && p.architecture == PLATFORM_ARCH)
        })
        .ok_or_else(|| {
            let offered: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            ManifestError::NoPlatform(if offered.is_empty() {
                "none".to_owned()
            } else {
                offered.join(", ")
            })
        })
}

/// Layer compression, from the layer's media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn layer_compression(media_type: &str) -> Result<Compression, ManifestError> {
    let unsupported = || ManifestError::LayerMediaType(media_type.to_owned());
    let rest = media_type
        .strip_prefix("application/vnd.oci.image.layer.v1.tar")
        .or_else(|| {
            media_type.strip_prefix("application/vnd.oci.image.layer.nondistributable.v1.tar")
        })
        .or_else(|| media_type.strip_prefix("application/vnd.docker.image.rootfs.diff.tar"))
        .or_else(|| media_type.strip_prefix("application/vnd.docker.image.rootfs.foreign.diff.tar"))
        .ok_or_else(unsupported)?;
    match rest {
        "" => Ok(Compression::None),
        "+gzip" | ".gzip" => Ok(Compression::Gzip),
        "+zstd" => Ok(Compression::Zstd),
        _ => Err(unsupported()),
    }
}

/// The image configuration the runtime needs to create containers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub exposed_ports: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub stop_signal: String,
    #[serde(default)]
    pub volumes: Vec<String>,
}

/// The parts of the OCI config document the store uses.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub os: String,
    pub architecture: String,
    pub diff_ids: Vec<Digest>,
    pub config: ImageConfig,
}

pub fn parse_config(bytes: &[u8]) -> Result<ConfigFile, ManifestError> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        os: String,
        #[serde(default)]
        architecture: String,
        rootfs: RootFs,
        #[serde(default)]
        config: Option<RawConfig>,
    }
    #[derive(Deserialize)]
    struct RootFs {
        diff_ids: Vec<Digest>,
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "PascalCase")]
    struct RawConfig {
        user: Option<String>,
        env: Option<Vec<String>>,
        entrypoint: Option<Vec<String>>,
        cmd: Option<Vec<String>>,
        working_dir: Option<String>,
        exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
        labels: Option<BTreeMap<String, String>>,
        stop_signal: Option<String>,
        volumes: Option<BTreeMap<String, serde_json::Value>>,
    }
    let raw: Raw = serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
        what: "image config",
        source,
    })?;
    let c = raw.config.unwrap_or_default();
    Ok(ConfigFile {
        os: raw.os,
        architecture: raw.architecture,
        diff_ids: raw.rootfs.diff_ids,
        config: ImageConfig {
            user: c.user.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
            labels: c.labels.unwrap_or_default(),
            stop_signal: c.stop_signal.unwrap_or_default(),
            volumes: c.volumes.unwrap_or_default().into_keys().collect(),
        },
    })
}

/// Checks that a manifest and its config describe a usable linux/amd64 image.
pub fn check_image(manifest: &Manifest, config: &ConfigFile) -> Result<(), ManifestError> {
    if manifest.layers.len() != config.diff_ids.len() {
        return Err(ManifestError::LayerCount {
            layers: manifest.layers.len(),
            diff_ids: config.diff_ids.len(),
        });
    }
    let os_ok = config.os.is_empty() || config.os == PLATFORM_OS;
    let arch_ok = config.architecture.is_empty() || config.architecture == PLATFORM_ARCH;
    if !os_ok || !arch_ok {
        return Err(ManifestError::WrongPlatform {
            os: config.os.clone(),
            arch: config.architecture.clone(),
        });
    }
    for l in &manifest.layers {
        layer_compression(&l.media_type)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn selects_linux_amd64_from_an_index() {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":2,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            d('a'),
            d('b')
        );
        let Document::Index(i) = parse_document(index.as_bytes(), "").unwrap() else {
            panic!("not an index")
        };
        assert_eq!(select_platform(&i).unwrap().digest.to_string(), d('b'));
        let arm_only = Index {
            manifests: i.manifests[..1].to_vec(),
            ..i
        };
        let err = select_platform(&arm_only).unwrap_err().to_string();
        assert!(err.contains("linux/arm64"), "{err}");
    }

    #[test]
    fn parses_docker_config_with_nulls() {
        let c = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},
            "config":{"User":"1000:1000","Env":["PATH=/bin"],"Entrypoint":null,"Cmd":["sh"],
            "ExposedPorts":{"80/tcp":{}},"Labels":null,"WorkingDir":""}}"#;
        let c = parse_config(c).unwrap();
        assert_eq!(c.config.user, "1000:1000");
        assert_eq!(c.config.cmd, vec!["sh"]);
        assert!(c.config.entrypoint.is_empty());
        assert_eq!(c.config.exposed_ports, vec!["80/tcp"]);
    }

    #[test]
    fn layer_media_types() {
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar").unwrap(),
            Compression::None
        );
        assert!(layer_compression("application/vnd.wasm.content.layer.v1+wasm").is_err());
        assert!(parse_document(br#"{"schemaVersion":1}"#, "").is_err());
        assert!(parse_document(br#"{"schemaVersion":2,"mediaType":"text/html"}"#, "").is_err());
    }
}
