//! UpdateRuntimeConfig: the node's pod CIDRs, which kubelet sends when it learns them (and
//! again each node status update until a call succeeds, logging "Error updating pod CIDR"
//! every time one fails). We keep them, across daemon restarts too (kubelet does not send
//! them again after our restart, only after its own), and show them in the verbose Status
//! (`crictl info`). Pod networking does not depend on them: the CNI configuration in
//! `cni.conf_dir` is used as written (containerd uses the CIDR only to fill in a CNI
//! configuration template, which we do not have).

use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::state::{RecordDir, StateError};

/// The state directory's subdirectory, and the one record in it.
const KIND: &str = "runtime-config";
const RECORD: &str = "node";

/// What the last successful UpdateRuntimeConfig said.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuntimeConfigRecord {
    /// As kubelet sent it: one CIDR, or an IPv4 and an IPv6 one separated by a comma.
    pod_cidr: String,
}

/// The runtime configuration kubelet gave us.
#[derive(Debug)]
pub struct NodeRuntimeConfig {
    records: RecordDir,
    current: Mutex<RuntimeConfigRecord>,
}

impl NodeRuntimeConfig {
    /// Opens `<state_dir>/runtime-config` and loads what an earlier daemon kept; an
    /// unreadable record is logged and ignored (kubelet's next change sets it again).
    pub fn load(state_dir: &Path) -> Result<Self, StateError> {
        let records = RecordDir::open(state_dir, KIND)?;
        let loaded = records.load_all_logged::<RuntimeConfigRecord>("runtime configuration");
        let current = loaded.into_iter().next().unwrap_or_default();
        Ok(Self {
            records,
            current: Mutex::new(current),
        })
    }

    /// The node's pod CIDRs as kubelet last sent them (empty: never).
    pub fn pod_cidr(&self) -> String {
        self.lock().pod_cidr.clone()
    }

    /// Checks `pod_cidr` and keeps it. A value that does not parse changes nothing.
    pub fn set_pod_cidr(&self, pod_cidr: &str) -> Result<(), UpdateError> {
        check_pod_cidrs(pod_cidr)?;
        let mut current = self.lock();
        if current.pod_cidr == pod_cidr {
            return Ok(());
        }
        let next = RuntimeConfigRecord {
            pod_cidr: pod_cidr.to_owned(),
        };
        self.records.save(RECORD, &next)?;
        tracing::info!(old = %current.pod_cidr, new = %pod_cidr, "pod CIDR updated");
        *current = next;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RuntimeConfigRecord> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why an update was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("pod_cidr {0:?}: {1}")]
    Invalid(String, String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Accepts "" (no CIDR), one CIDR, or one IPv4 and one IPv6 CIDR separated by a comma (what
/// kubelet sends for a dual-stack node).
fn check_pod_cidrs(value: &str) -> Result<(), UpdateError> {
    let invalid = |why: &str| UpdateError::Invalid(value.to_owned(), why.to_owned());
    if value.is_empty() {
        return Ok(());
    }
    let cidrs: Vec<&str> = value.split(',').collect();
    if cidrs.len() > 2 {
        return Err(invalid("at most two CIDRs, one per IP family"));
    }
    let mut families = Vec::new();
    for cidr in cidrs {
        let (addr, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| invalid("a CIDR is an address, '/', and a prefix length"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| invalid(&format!("{addr:?} is not an IP address")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        match prefix.parse::<u8>() {
            Ok(p) if p <= max && prefix.bytes().all(|b| b.is_ascii_digit()) => {}
            _ => {
                return Err(invalid(&format!(
                    "prefix length {prefix:?} is not 0 to {max}"
                )))
            }
        }
        if families.contains(&addr.is_ipv4()) {
            return Err(invalid("two CIDRs of the same IP family"));
        }
        families.push(addr.is_ipv4());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cidrs_kubelet_sends_are_accepted_and_others_refused() {
        for ok in [
            "",
            "10.244.1.0/24",
            "fd00:10:244:1::/64",
            "10.244.1.0/24,fd00::/64",
        ] {
            assert!(check_pod_cidrs(ok).is_ok(), "{ok}");
        }
        for bad in [
            "10.244.1.0",
            "10.244.1.0/33",
            "fd00::/129",
            "10.244.1.0/+8",
            "10.244.1.0/24,",
            "10.0.0.0/8,10.1.0.0/16",
            "10.0.0.0/8,fd00::/64,fd01::/64",
            "nonsense/8",
            " 10.244.1.0/24",
        ] {
            assert!(check_pod_cidrs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_pod_cidr_survives_a_restart_and_bad_input_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeRuntimeConfig::load(dir.path()).unwrap();
        assert_eq!(config.pod_cidr(), "");
        config.set_pod_cidr("10.244.1.0/24").unwrap();
        assert!(config.set_pod_cidr("10.244.1.0/99").is_err());
        assert_eq!(config.pod_cidr(), "10.244.1.0/24");
        drop(config);
        let again = NodeRuntimeConfig::load(dir.path()).unwrap();
        assert_eq!(again.pod_cidr(), "10.244.1.0/24", "kept across a restart");
        // A corrupt record is ignored, not fatal.
        std::fs::write(dir.path().join(KIND).join("node.json"), b"{not json").unwrap();
        let corrupt = NodeRuntimeConfig::load(dir.path()).unwrap();
        assert_eq!(corrupt.pod_cidr(), "");
        corrupt.set_pod_cidr("10.244.2.0/24").unwrap();
        assert_eq!(
            NodeRuntimeConfig::load(dir.path()).unwrap().pod_cidr(),
            "10.244.2.0/24"
        );
    }
}
