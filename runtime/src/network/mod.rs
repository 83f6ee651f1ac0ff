//! Pod networking: a network namespace per pod, pinned by the daemon, and
//! the operator's CNI plugins run in it (`docs/design.md`, record 16).
//!
//! Setup: create the namespace, run CNI ADD, keep the result with the pod.
//! Teardown: CNI DEL with the stored configuration and result, then remove
//! the namespace. Teardown is idempotent and works after a daemon restart
//! and when the namespace is already gone.

pub mod cni;
pub mod counters;
pub mod guest;
pub mod netns;
pub mod tap;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::NetworkConfig;
use cni::{Attachment, CniResult, NetworkConfList};

/// The interface name CNI creates in the pod namespace.
pub const POD_IFNAME: &str = "eth0";

/// Errors of pod networking.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// No usable CNI configuration: the message says why.
    #[error("{0}")]
    NoConfig(String),
    #[error("CNI plugin {plugin} ({command}) failed: {message}")]
    Plugin {
        plugin: String,
        command: &'static str,
        message: String,
    },
    #[error("{what}: {message}")]
    Command { what: String, message: String },
    #[error("{what}: {source}")]
    Netns { what: String, source: nix::Error },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Who a pod is, as CNI_ARGS name it.
#[derive(Debug, Clone, Default)]
pub struct PodIdentity {
    pub sandbox_id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
}

/// A pod's network as set up: stored in its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodNetwork {
    /// The pinned namespace file.
    pub netns: PathBuf,
    /// The configuration ADD ran with (DEL runs the same).
    pub conf: NetworkConfList,
    pub attachment: Attachment,
    /// The final ADD result as the plugins wrote it (DEL's `prevResult`).
    pub raw_result: Value,
    /// The same, parsed.
    pub result: CniResult,
}

/// Creates and removes pod networks with the configured CNI plugins.
#[derive(Debug, Clone)]
pub struct Network {
    config: NetworkConfig,
}

impl Network {
    pub fn new(config: NetworkConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// The CNI configuration pods get now, or why there is none.
    pub fn conf(&self) -> Result<NetworkConfList, NetworkError> {
        cni::load(&self.config.cni_conf_dir, &self.config.cni_bin_dirs)
    }

    /// Creates the pod's namespace and runs CNI ADD in it. `capability_args`
    /// are `portMappings`, `dns`, ... (given to plugins that declare them).
    /// On failure, whatever was set up is torn down again.
    pub async fn setup(
        &self,
        pod: &PodIdentity,
        capability_args: BTreeMap<String, Value>,
    ) -> Result<PodNetwork, NetworkError> {
        let conf = self.conf()?;
        let path = self.netns_path(&pod.sandbox_id);
        netns::create(&path)?;
        self.add(conf, pod, capability_args, path).await
    }

    /// Where the namespace of sandbox `id` is pinned.
    pub fn netns_path(&self, id: &str) -> PathBuf {
        netns::path(&self.config.netns_dir, id)
    }

    /// As [`Network::setup`], in the sandbox's namespace made beforehand
    /// (with [`netns::create`] at [`Network::netns_path`]): a warm VM
    /// already runs in it. On failure the namespace is removed too.
    pub async fn setup_in_existing(
        &self,
        pod: &PodIdentity,
        capability_args: BTreeMap<String, Value>,
    ) -> Result<PodNetwork, NetworkError> {
        let conf = self.conf()?;
        let path = self.netns_path(&pod.sandbox_id);
        self.add(conf, pod, capability_args, path).await
    }

    /// CNI ADD in the namespace at `path`; on failure, DEL and the
    /// namespace's removal.
    async fn add(
        &self,
        conf: NetworkConfList,
        pod: &PodIdentity,
        capability_args: BTreeMap<String, Value>,
        path: PathBuf,
    ) -> Result<PodNetwork, NetworkError> {
        let attachment = Attachment {
            container_id: pod.sandbox_id.clone(),
            netns: path.clone(),
            ifname: POD_IFNAME.into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), pod.namespace.clone()),
                ("K8S_POD_NAME".into(), pod.name.clone()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), pod.sandbox_id.clone()),
                ("K8S_POD_UID".into(), pod.uid.clone()),
            ],
            capability_args,
        };
        let added = cni::run(
            &conf,
            &self.config.cni_bin_dirs,
            cni::Command::Add,
            &attachment,
            None,
        )
        .await;
        let parsed = added.and_then(|raw| {
            let raw = raw.unwrap_or(Value::Null);
            serde_json::from_value::<CniResult>(raw.clone())
                .map(|result| (raw, result))
                .map_err(|e| NetworkError::Plugin {
                    plugin: conf.plugin_types().last().unwrap_or("").to_owned(),
                    command: "ADD",
                    message: format!("unusable result: {e}"),
                })
        });
        match parsed {
            Ok((raw_result, result)) => Ok(PodNetwork {
                netns: path,
                conf,
                attachment,
                raw_result,
                result,
            }),
            Err(e) => {
                // The spec asks for DEL after a failed ADD, to release what
                // the plugins that succeeded allocated.
                let partial = PodNetwork {
                    netns: path,
                    conf,
                    attachment,
                    raw_result: Value::Null,
                    result: CniResult::default(),
                };
                if let Err(del) = self.teardown(&partial).await {
                    tracing::warn!("cleaning up after a failed CNI ADD: {del}");
                }
                Err(e)
            }
        }
    }

    /// CNI DEL, then removes the namespace. Idempotent: plugins tolerate a
    /// repeated DEL, and a namespace already gone is passed as empty
    /// `CNI_NETNS` (the spec's "container is gone" case).
    pub async fn teardown(&self, net: &PodNetwork) -> Result<(), NetworkError> {
        let mut attachment = net.attachment.clone();
        if !net.netns.exists() {
            attachment.netns = PathBuf::new();
        }
        let prev = (!net.raw_result.is_null()).then_some(&net.raw_result);
        cni::run(
            &net.conf,
            &self.config.cni_bin_dirs,
            cni::Command::Del,
            &attachment,
            prev,
        )
        .await?;
        netns::remove(&net.netns)
    }
}

#[cfg(test)]
mod tests;
