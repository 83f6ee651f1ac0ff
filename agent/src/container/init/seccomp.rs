//! OCI seccomp profiles, compiled to BPF with rust-vmm's `seccompiler`.
//!
//! seccompiler filters have one match action and one mismatch action, while
//! an OCI profile has a default action and one action per syscall group. A
//! profile becomes a stack of filters, relying on the kernel's rule that the
//! most restrictive result of all installed filters wins (kill process >
//! kill thread > trap > errno > trace > log > allow; on a tie, the filter
//! installed last):
//!
//! 1. `base`: every listed syscall (with its argument conditions) → allow,
//!    anything else → the default action;
//! 2. one filter per other action A: the syscalls listed with A → A,
//!    anything else → allow.
//!
//! A listed syscall thus gets its group's action, an unlisted one the
//! default. Syscall names the x86_64 table does not know are skipped, as
//! libseccomp does. Only the native architecture is filtered: other ABIs
//! (x86, x32) are refused by the filter's architecture check.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::{BpfProgram, TargetArch};
use serde_json::{json, Value};

/// Errors turning a profile into filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp action {0:?} is not supported")]
    Action(LinuxSeccompAction),
    #[error("seccomp notification (listenerPath) is not supported")]
    Notify,
    #[error("compiling the seccomp profile: {0}")]
    Compile(String),
    #[error("installing a seccomp filter: {0}")]
    Install(String),
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<Value, SeccompError> {
    use LinuxSeccompAction as A;
    Ok(match a {
        A::ScmpActAllow => json!("allow"),
        A::ScmpActErrno => json!({ "errno": errno.unwrap_or(libc::EPERM as u32) }),
        A::ScmpActKill | A::ScmpActKillThread => json!("kill_thread"),
        A::ScmpActKillProcess => json!("kill_process"),
        A::ScmpActTrap => json!("trap"),
        A::ScmpActLog => json!("log"),
        A::ScmpActTrace => json!({ "trace": errno.unwrap_or(0) }),
        A::ScmpActNotify => return Err(SeccompError::Action(a)),
    })
}

fn condition(arg: &oci_spec::runtime::LinuxSeccompArg) -> Value {
    use LinuxSeccompOperator as O;
    let (op, val) = match arg.op() {
        O::ScmpCmpNe => (json!("ne"), arg.value()),
        O::ScmpCmpLt => (json!("lt"), arg.value()),
        O::ScmpCmpLe => (json!("le"), arg.value()),
        O::ScmpCmpEq => (json!("eq"), arg.value()),
        O::ScmpCmpGe => (json!("ge"), arg.value()),
        O::ScmpCmpGt => (json!("gt"), arg.value()),
        // (arg & value) == valueTwo
        O::ScmpCmpMaskedEq => (
            json!({ "masked_eq": arg.value() }),
            arg.value_two().unwrap_or(0),
        ),
    };
    json!({ "index": arg.index(), "type": "qword", "op": op, "val": val })
}

/// Whether the x86_64 syscall table knows `name`.
fn known_syscall(name: &str) -> bool {
    let probe = json!({ "probe": {
        "mismatch_action": "allow",
        "match_action": "log",
        "filter": [{ "syscall": name }]
    }});
    seccompiler::compile_from_json(probe.to_string().as_bytes(), TargetArch::x86_64).is_ok()
}

/// Compiles `profile` into the filters to install, in order.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, SeccompError> {
    if profile.listener_path().is_some() {
        return Err(SeccompError::Notify);
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    // Rules per action (keyed by the action's JSON text, for a stable order).
    let mut by_action: BTreeMap<String, (Value, Vec<Value>)> = BTreeMap::new();
    let mut listed: Vec<Value> = Vec::new();
    for group in profile.syscalls().iter().flatten() {
        let act = action(group.action(), group.errno_ret())?;
        if act == default {
            continue;
        }
        let conditions: Vec<Value> = group.args().iter().flatten().map(condition).collect();
        for name in group.names() {
            if !known_syscall(name) {
                continue;
            }
            let mut rule = json!({ "syscall": name });
            if !conditions.is_empty() {
                rule["args"] = json!(conditions);
            }
            listed.push(rule.clone());
            if act != json!("allow") {
                by_action
                    .entry(act.to_string())
                    .or_insert_with(|| (act.clone(), Vec::new()))
                    .1
                    .push(rule);
            }
        }
    }
    let mut filters = serde_json::Map::new();
    let mut order = Vec::new();
    if default != json!("allow") {
        filters.insert(
            "0-base".into(),
            json!({ "mismatch_action": default, "match_action": "allow", "filter": listed }),
        );
        order.push("0-base".to_owned());
    }
    for (i, (act, rules)) in by_action.into_values().enumerate() {
        let name = format!("{}-action", i + 1);
        filters.insert(
            name.clone(),
            json!({ "mismatch_action": "allow", "match_action": act, "filter": rules }),
        );
        order.push(name);
    }
    let text = Value::Object(filters).to_string();
    let mut compiled = seccompiler::compile_from_json(text.as_bytes(), TargetArch::x86_64)
        .map_err(|e| SeccompError::Compile(e.to_string()))?;
    Ok(order
        .iter()
        .filter_map(|name| compiled.remove(name))
        .collect())
}

/// Installs the filters on the calling thread (needs no_new_privs or
/// CAP_SYS_ADMIN).
pub fn install(filters: &[BpfProgram]) -> Result<(), SeccompError> {
    for f in filters {
        seccompiler::apply_filter(f).map_err(|e| SeccompError::Install(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn an_allowlist_with_errno_groups_becomes_two_filters() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64"],
                "syscalls":[
                  {"names":["read","write","no_such_syscall"],"action":"SCMP_ACT_ALLOW"},
                  {"names":["personality"],"action":"SCMP_ACT_ALLOW",
                   "args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                  {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
                  {"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}
                ]}"#,
        );
        let filters = compile(&p).unwrap();
        assert_eq!(filters.len(), 2);
        assert!(filters.iter().all(|f| !f.is_empty()));
    }

    #[test]
    fn a_blocklist_needs_no_base_filter() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW",
                "syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().len(), 1);
    }

    #[test]
    fn masked_comparisons_and_unknown_names_compile() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_KILL_PROCESS",
                "syscalls":[{"names":["clone"],"action":"SCMP_ACT_ALLOW",
                  "args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]},
                  {"names":["not_a_syscall"],"action":"SCMP_ACT_ALLOW"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().len(), 1);
    }

    #[test]
    fn notify_is_refused() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW",
                "syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        );
        assert!(matches!(compile(&p), Err(SeccompError::Action(_))));
    }
}
