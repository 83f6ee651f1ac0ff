//! ListPodSandbox.

use k8s_cri::v1::{ListPodSandboxResponse, PodSandbox, PodSandboxFilter};

use super::sandbox_status::{cri_metadata, cri_state};
use super::{CriError, CriService};
use crate::sandbox::SandboxRecord;

impl CriService {
    pub(super) async fn list_pod_sandbox(
        &self,
        filter: Option<PodSandboxFilter>,
    ) -> Result<ListPodSandboxResponse, CriError> {
        let mut items = Vec::new();
        for sandbox in self.sandboxes.list() {
            let mut sandbox = sandbox.lock().await;
            self.sandboxes.refresh(&mut sandbox);
            if matches(&sandbox.record, filter.as_ref()) {
                items.push(cri_sandbox(&sandbox.record));
            }
        }
        items.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(ListPodSandboxResponse { items })
    }
}

/// CRI filter semantics: every given criterion must hold; the id matches
/// by prefix (as containerd's truncated ids); labels must all be equal.
fn matches(record: &SandboxRecord, filter: Option<&PodSandboxFilter>) -> bool {
    let Some(f) = filter else { return true };
    if !f.id.is_empty() && !record.id.starts_with(&f.id) {
        return false;
    }
    if let Some(state) = &f.state {
        if cri_state(record.state) as i32 != state.state {
            return false;
        }
    }
    f.label_selector
        .iter()
        .all(|(k, v)| record.labels.get(k) == Some(v))
}

fn cri_sandbox(record: &SandboxRecord) -> PodSandbox {
    PodSandbox {
        id: record.id.clone(),
        metadata: Some(cri_metadata(record)),
        state: cri_state(record.state) as i32,
        created_at: record.created_at_ns,
        labels: record.labels.clone().into_iter().collect(),
        annotations: record.annotations.clone().into_iter().collect(),
        runtime_handler: record.runtime_handler.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{PodMeta, SandboxState, VmSize};
    use k8s_cri::v1::{PodSandboxState, PodSandboxStateValue};

    fn record(id: &str, state: SandboxState, app: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            meta: PodMeta {
                name: "p".into(),
                uid: "u".into(),
                namespace: "n".into(),
                attempt: 0,
            },
            labels: [("app".to_string(), app.to_string())].into(),
            annotations: Default::default(),
            runtime_handler: String::new(),
            log_directory: String::new(),
            hostname: String::new(),
            created_at_ns: 1,
            state,
            reason: None,
            size: VmSize {
                vcpus: 1,
                mem_mib: 128,
            },
            run_dir: "/run/x".into(),
            vm: None,
            files: Default::default(),
            cgroup: None,
            network: None,
        }
    }

    #[test]
    fn filters_by_id_prefix_state_and_labels() {
        let r = record("abcdef", SandboxState::Ready, "web");
        assert!(matches(&r, None));
        let f = |id: &str, state: Option<PodSandboxState>, app: Option<&str>| PodSandboxFilter {
            id: id.into(),
            state: state.map(|s| PodSandboxStateValue { state: s as i32 }),
            label_selector: app
                .map(|a| [("app".to_string(), a.to_string())].into())
                .unwrap_or_default(),
        };
        assert!(matches(&r, Some(&f("abc", None, None))));
        assert!(!matches(&r, Some(&f("abd", None, None))));
        assert!(matches(
            &r,
            Some(&f("", Some(PodSandboxState::SandboxReady), None))
        ));
        assert!(!matches(
            &r,
            Some(&f("", Some(PodSandboxState::SandboxNotready), None))
        ));
        assert!(matches(&r, Some(&f("", None, Some("web")))));
        assert!(!matches(&r, Some(&f("", None, Some("db")))));
    }
}
