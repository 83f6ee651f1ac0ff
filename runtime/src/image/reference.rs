//! Image references, normalized as containerd does: `busybox` becomes
//! `docker.io/library/busybox:latest`; a reference with a digest drops its tag.

use std::fmt;

use oci_client::Reference;

use super::digest::{Digest, DigestError};

/// An image reference that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("invalid image reference {reference:?}: {reason}")]
    Invalid { reference: String, reason: String },
    #[error("invalid image reference {0:?}: an image ID is not a pullable reference")]
    ImageId(String),
    #[error("invalid image reference {reference:?}: {source}")]
    Digest {
        reference: String,
        source: DigestError,
    },
}

/// A normalized image reference: registry host, repository path, and a tag
/// or a digest (never both).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageRef {
    /// Parses and normalizes a user-given reference.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let bare = input.strip_prefix("sha256:").unwrap_or(input);
        if bare.len() == 64 && bare.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReferenceError::ImageId(input.to_owned()));
        }
        let parsed: Reference = input.parse().map_err(|e| ReferenceError::Invalid {
            reference: input.to_owned(),
            reason: format!("{e}"),
        })?;
        let digest = parsed
            .digest()
            .map(|d| {
                d.parse::<Digest>()
                    .map_err(|source| ReferenceError::Digest {
                        reference: input.to_owned(),
                        source,
                    })
            })
            .transpose()?;
        let tag = match digest {
            Some(_) => None,
            None => Some(parsed.tag().unwrap_or("latest").to_owned()),
        };
        Ok(Self {
            registry: parsed.registry().to_owned(),
            repository: parsed.repository().to_owned(),
            tag,
            digest,
        })
    }

    /// The registry host as named in the reference (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The repo digest form `registry/repository@sha256:...` for `digest`.
    pub fn with_digest(&self, digest: &Digest) -> Self {
        Self {
            tag: None,
            digest: Some(digest.clone()),
            ..self.clone()
        }
    }

    /// The same repository and tag or digest on another registry host (a mirror).
    pub(crate) fn on_host(&self, host: &str) -> Reference {
        match (&self.digest, &self.tag) {
            (Some(d), _) => {
                Reference::with_digest(host.to_owned(), self.repository.clone(), d.to_string())
            }
            (None, tag) => Reference::with_tag(
                host.to_owned(),
                self.repository.clone(),
                tag.clone().unwrap_or_else(|| "latest".to_owned()),
            ),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(d) = &self.digest {
            write!(f, "@{d}")
        } else {
            write!(f, ":{}", self.tag.as_deref().unwrap_or("latest"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        ImageRef::parse(s).unwrap().to_string()
    }

    #[test]
    fn normalizes_like_containerd() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            norm("index.docker.io/library/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            norm("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(norm("user/app:v1"), "docker.io/user/app:v1");
        assert_eq!(
            norm("registry.k8s.io/pause:3.10"),
            "registry.k8s.io/pause:3.10"
        );
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(
            norm("127.0.0.1:5000/library/busybox:latest"),
            "127.0.0.1:5000/library/busybox:latest"
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            norm(&format!("busybox:1.36@{d}")),
            format!("docker.io/library/busybox@{d}")
        );
        let r = ImageRef::parse("quay.io/a/b/c:t").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("quay.io", "a/b/c", Some("t"))
        );
        assert_eq!(r.name(), "quay.io/a/b/c");
    }

    #[test]
    fn rejects_invalid_references() {
        assert_eq!(ImageRef::parse(" "), Err(ReferenceError::Empty));
        for bad in [
            "Busybox",
            "busybox:",
            "bad name",
            "a//b",
            "busybox@sha256:123",
            ":tag",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
        let id = "a".repeat(64);
        assert!(matches!(
            ImageRef::parse(&id),
            Err(ReferenceError::ImageId(_))
        ));
        assert!(matches!(
            ImageRef::parse(&format!("sha256:{id}")),
            Err(ReferenceError::ImageId(_))
        ));
        assert!(matches!(
            ImageRef::parse(&format!("busybox@sha512:{}", "a".repeat(128))),
            Err(ReferenceError::Digest { .. })
        ));
    }

    #[test]
    fn mirror_keeps_repository_path() {
        let r = ImageRef::parse("registry.k8s.io/pause:3.10").unwrap();
        let m = r.on_host("127.0.0.1:5000");
        assert_eq!(m.whole(), "127.0.0.1:5000/pause:3.10");
    }
}
