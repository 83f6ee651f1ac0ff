//! Registry hosts: which are reached over plain HTTP, and per-registry
//! mirrors in the manner of containerd's `hosts.toml`: a pull of
//! `registry.k8s.io/pause:3.10` with a mirror `127.0.0.1:5000` first asks
//! `127.0.0.1:5000/v2/pause/manifests/3.10` (same repository path), then
//! the registry itself unless `fallback = false`.
//!
//! ```toml
//! insecure = ["127.0.0.1:5000"]          # plain HTTP allowed only for these
//! [mirrors."registry.k8s.io"]
//! endpoints = ["127.0.0.1:5000", "https://mirror.example.com"]
//! fallback = true                         # then registry.k8s.io itself
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryConfigError {
    #[error("mirror endpoint {0:?} is not host[:port] with an optional http:// or https://")]
    BadEndpoint(String),
    #[error("insecure registry {0:?} is not host[:port]")]
    BadHost(String),
    #[error("registry config: {0}")]
    Parse(String),
}

/// Registry access settings (a section of the daemon's config file).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Registry hosts (`host[:port]`) that may be reached over plain HTTP.
    pub insecure: Vec<String>,
    /// Mirrors per registry host (`docker.io`, `registry.k8s.io`, ...).
    pub mirrors: BTreeMap<String, MirrorConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Tried in order. `http://host` marks that mirror as plain HTTP.
    pub endpoints: Vec<String>,
    /// Whether the registry itself is tried after the mirrors.
    #[serde(default = "yes")]
    pub fallback: bool,
}

fn yes() -> bool {
    true
}

/// One host to try for a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]`.
    pub host: String,
    pub plain_http: bool,
    /// A mirror (false: the image's own registry).
    pub mirror: bool,
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && !h.contains('/')
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
}

impl RegistryConfig {
    /// Parses the TOML form shown in the module docs.
    pub fn from_toml(s: &str) -> Result<Self, RegistryConfigError> {
        let c: Self = toml::from_str(s).map_err(|e| RegistryConfigError::Parse(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), RegistryConfigError> {
        if let Some(h) = self.insecure.iter().find(|h| !valid_host(h)) {
            return Err(RegistryConfigError::BadHost(h.clone()));
        }
        for m in self.mirrors.values() {
            for e in &m.endpoints {
                split_endpoint(e)?;
            }
        }
        Ok(())
    }

    pub fn is_insecure(&self, host: &str) -> bool {
        self.insecure.iter().any(|h| h == host)
    }

    /// The hosts to try for an image on `registry`, in order.
    pub fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let mut out = Vec::new();
        let mut fallback = true;
        if let Some(m) = self.mirrors.get(registry) {
            fallback = m.fallback;
            for e in &m.endpoints {
                if let Ok((host, http)) = split_endpoint(e) {
                    out.push(Endpoint {
                        plain_http: http || self.is_insecure(&host),
                        host,
                        mirror: true,
                    });
                }
            }
        }
        if fallback || out.is_empty() {
            out.push(Endpoint {
                host: registry.to_owned(),
                plain_http: self.is_insecure(registry),
                mirror: false,
            });
        }
        out
    }

    /// Every host that may be reached over plain HTTP.
    pub(crate) fn plain_http_hosts(&self) -> Vec<String> {
        let mut v = self.insecure.clone();
        for m in self.mirrors.values() {
            for e in &m.endpoints {
                if let Ok((host, true)) = split_endpoint(e) {
                    v.push(host);
                }
            }
        }
        v
    }
}

fn split_endpoint(e: &str) -> Result<(String, bool), RegistryConfigError> {
    let (host, http) = if let Some(h) = e.strip_prefix("http://") {
        (h, true)
    } else {
        (e.strip_prefix("https://").unwrap_or(e), false)
    };
    let host = host.trim_end_matches('/');
    if !valid_host(host) {
        return Err(RegistryConfigError::BadEndpoint(e.to_owned()));
    }
    Ok((host.to_owned(), http))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_come_first_then_the_registry() {
        let c = RegistryConfig::from_toml(
            r#"
            insecure = ["127.0.0.1:5000"]
            [mirrors."registry.k8s.io"]
            endpoints = ["127.0.0.1:5000", "https://mirror.example.com/", "http://10.0.0.1:5000"]
            [mirrors."docker.io"]
            endpoints = ["mirror.local"]
            fallback = false
            "#,
        )
        .unwrap();
        let hosts = |r: &str| -> Vec<(String, bool, bool)> {
            c.endpoints(r)
                .into_iter()
                .map(|e| (e.host, e.plain_http, e.mirror))
                .collect()
        };
        assert_eq!(
            hosts("registry.k8s.io"),
            vec![
                ("127.0.0.1:5000".into(), true, true),
                ("mirror.example.com".into(), false, true),
                ("10.0.0.1:5000".into(), true, true),
                ("registry.k8s.io".into(), false, false),
            ]
        );
        assert_eq!(
            hosts("docker.io"),
            vec![("mirror.local".into(), false, true)]
        );
        assert_eq!(hosts("quay.io"), vec![("quay.io".into(), false, false)]);
        assert_eq!(
            hosts("127.0.0.1:5000"),
            vec![("127.0.0.1:5000".into(), true, false)]
        );
        let mut plain = c.plain_http_hosts();
        plain.sort();
        assert_eq!(plain, vec!["10.0.0.1:5000", "127.0.0.1:5000"]);
    }

    #[test]
    fn bad_config_is_rejected() {
        assert!(RegistryConfig::from_toml("insecure = [\"a/b\"]").is_err());
        assert!(RegistryConfig::from_toml("[mirrors.x]\nendpoints = [\"ftp://x/y\"]").is_err());
        assert!(RegistryConfig::from_toml("unknown = 1").is_err());
        assert_eq!(
            RegistryConfig::from_toml("").unwrap(),
            RegistryConfig::default()
        );
    }
}
