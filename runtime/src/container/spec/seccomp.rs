//! The container's seccomp profile, from CRI's `seccomp` security profile
//! (or the deprecated `seccomp_profile_path` string when it is unset).
//!
//! - **Unconfined** (and an unset profile, as containerd's default): none.
//! - **RuntimeDefault**: [`DEFAULT_BLOCKS`], a table of syscalls that fail
//!   (EPERM, or ENOSYS where libc should fall back) unless the container's
//!   bounding set holds the capability that lifts the block. Everything
//!   else is allowed.
//! - **Localhost**: a JSON profile read from the host path `localhost_ref`
//!   in Docker's format (a superset of the OCI one): `defaultAction`,
//!   `defaultErrnoRet`, `architectures` or `archMap`, `syscalls` with
//!   `names` (or `name`), `action`, `errnoRet`, `args` and the `includes` /
//!   `excludes` conditions (capabilities against the bounding set, `amd64`
//!   as the architecture, `minKernel` against the guest kernel,
//!   [`GUEST_KERNEL`]).
//!
//! # Why a block list
//! Docker's and containerd's default profiles are allow lists (unknown
//! syscalls fail) written for every kernel a host may run. The guest kernel
//! is ours and recent, so what matters is the list of what they refuse; a
//! block list states exactly that, cannot break a program that uses a new
//! but harmless syscall, and compiles to small filters in the agent (which
//! installs one filter per action). Like those profiles, it keeps out:
//! kernel modules, kexec and reboot, mounts and the new mount API, new
//! namespaces (`unshare`, `setns`, `clone` with a `CLONE_NEW*` flag, which
//! would otherwise let an unprivileged process create a user namespace),
//! `clone3` (its flags are out of a filter's reach: ENOSYS makes libc use
//! `clone`), the kernel keyring (not namespaced), `bpf`, `perf_event_open`,
//! `userfaultfd`, io_uring (out of the default profiles since containerd
//! 2.0 and Docker 25: a large attack surface that also bypasses seccomp),
//! clock setting, `acct`, `iopl`/`ioperm`, `open_by_handle_at` (the
//! "shocker" escape from bind mounts), NUMA memory policy and obsolete
//! calls. `ptrace`, `process_vm_*` and `kcmp` stay allowed, as Docker
//! allows them on kernels >= 4.8 (no seccomp bypass through ptrace there).
//! Docker's argument filter on `personality` is not reproduced (it only
//! changes the process's own execution domain).
//!
//! One addition for a VM: `socket(AF_VSOCK)` is refused. vsock reaches the
//! host (it carries the agent API), and a container has no business there.

use std::collections::BTreeSet;

use k8s_cri::v1 as cri;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{invalid, unsupported, SpecError};

/// The guest kernel's version (`guest-kernel-config/` builds Debian's
/// linux-source-6.1), for the `minKernel` conditions of Localhost profiles.
pub const GUEST_KERNEL: (u32, u32) = (6, 1);

const EPERM: u32 = libc::EPERM as u32;
const ENOSYS: u32 = libc::ENOSYS as u32;

/// Which calls of the listed syscalls a [`Block`] refuses.
#[derive(Debug, Clone, Copy)]
pub enum Calls {
    All,
    /// Those whose first argument has any of these flags.
    Arg0AnyFlag(&'static [u64]),
    /// Those whose first argument equals this.
    Arg0Is(u64),
}

/// One rule of the RuntimeDefault profile.
#[derive(Debug)]
pub struct Block {
    pub syscalls: &'static [&'static str],
    pub calls: Calls,
    /// The block does not apply when the bounding set holds one of these.
    pub unless: &'static [&'static str],
    pub errno: u32,
}

const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

const fn block(syscalls: &'static [&'static str], unless: &'static [&'static str]) -> Block {
    Block {
        syscalls,
        calls: Calls::All,
        unless,
        errno: EPERM,
    }
}

/// The RuntimeDefault profile: everything not listed is allowed.
pub const DEFAULT_BLOCKS: &[Block] = &[
    block(
        &["init_module", "finit_module", "delete_module"],
        &["CAP_SYS_MODULE"],
    ),
    block(
        &["kexec_load", "kexec_file_load", "reboot"],
        &["CAP_SYS_BOOT"],
    ),
    block(
        &[
            "mount",
            "umount2",
            "pivot_root",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
            "quotactl",
            "swapon",
            "swapoff",
            "lookup_dcookie",
            "fanotify_init",
            "name_to_handle_at",
        ],
        &["CAP_SYS_ADMIN"],
    ),
    block(&["unshare", "setns"], &["CAP_SYS_ADMIN"]),
    Block {
        syscalls: &["clone"],
        calls: Calls::Arg0AnyFlag(NAMESPACE_FLAGS),
        unless: &["CAP_SYS_ADMIN"],
        errno: EPERM,
    },
    Block {
        syscalls: &["clone3"],
        calls: Calls::All,
        unless: &["CAP_SYS_ADMIN"],
        errno: ENOSYS,
    },
    block(&["bpf"], &["CAP_SYS_ADMIN", "CAP_BPF"]),
    block(&["perf_event_open"], &["CAP_SYS_ADMIN", "CAP_PERFMON"]),
    block(&["add_key", "keyctl", "request_key"], &[]),
    block(
        &["io_uring_setup", "io_uring_enter", "io_uring_register"],
        &[],
    ),
    block(&["userfaultfd"], &["CAP_SYS_PTRACE"]),
    block(
        &["settimeofday", "clock_settime", "clock_adjtime"],
        &["CAP_SYS_TIME"],
    ),
    block(&["acct"], &["CAP_SYS_PACCT"]),
    block(&["iopl", "ioperm"], &["CAP_SYS_RAWIO"]),
    block(&["vhangup"], &["CAP_SYS_TTY_CONFIG"]),
    block(&["syslog"], &["CAP_SYSLOG"]),
    block(&["open_by_handle_at"], &["CAP_DAC_READ_SEARCH"]),
    block(
        &[
            "get_mempolicy",
            "set_mempolicy",
            "mbind",
            "move_pages",
            "migrate_pages",
        ],
        &["CAP_SYS_NICE"],
    ),
    block(
        &[
            "uselib",
            "ustat",
            "sysfs",
            "_sysctl",
            "nfsservctl",
            "create_module",
            "get_kernel_syms",
            "query_module",
        ],
        &[],
    ),
    Block {
        syscalls: &["socket"],
        calls: Calls::Arg0Is(libc::AF_VSOCK as u64),
        unless: &[],
        errno: EPERM,
    },
];

/// What CRI asked for.
#[derive(Debug, PartialEq, Eq)]
enum Choice {
    Unconfined,
    RuntimeDefault,
    Localhost(String),
}

// `seccomp_profile_path` is deprecated in CRI, but older kubelets send it.
#[allow(deprecated)]
fn choice(sc: &cri::LinuxContainerSecurityContext) -> Result<Choice, SpecError> {
    use cri::security_profile::ProfileType;
    const FIELD: &str = "linux.security_context.seccomp";
    if let Some(p) = &sc.seccomp {
        return match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Ok(Choice::RuntimeDefault),
            Ok(ProfileType::Unconfined) => Ok(Choice::Unconfined),
            Ok(ProfileType::Localhost) => {
                localhost_path(&format!("{FIELD}.localhost_ref"), &p.localhost_ref)
            }
            Err(_) => Err(invalid(
                format!("{FIELD}.profile_type"),
                format!("unknown profile type {}", p.profile_type),
            )),
        };
    }
    const PATH_FIELD: &str = "linux.security_context.seccomp_profile_path";
    match sc.seccomp_profile_path.as_str() {
        "" | "unconfined" => Ok(Choice::Unconfined),
        "runtime/default" | "docker/default" => Ok(Choice::RuntimeDefault),
        other => match other.strip_prefix("localhost/") {
            Some(path) => localhost_path(PATH_FIELD, path),
            None => Err(invalid(
                PATH_FIELD,
                format!(
                    "{other:?} is none of \"runtime/default\", \"unconfined\", \"localhost/<path>\""
                ),
            )),
        },
    }
}

fn localhost_path(field: &str, path: &str) -> Result<Choice, SpecError> {
    if !path.starts_with('/') {
        return Err(invalid(
            field,
            format!("Localhost profile path {path:?} is not absolute"),
        ));
    }
    Ok(Choice::Localhost(path.to_owned()))
}

/// The spec's `linux.seccomp` (None: no filter) for a non-privileged
/// container with `bounding` as its bounding set.
pub(super) fn profile(
    sc: &cri::LinuxContainerSecurityContext,
    bounding: &BTreeSet<&'static str>,
) -> Result<Option<Value>, SpecError> {
    match choice(sc)? {
        Choice::Unconfined => Ok(None),
        Choice::RuntimeDefault => Ok(Some(runtime_default(bounding))),
        Choice::Localhost(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| SpecError::SeccompProfile {
                path: path.clone(),
                reason: format!("cannot read it: {e}"),
            })?;
            localhost(&text, bounding)
                .map(Some)
                .map_err(|reason| match reason {
                    Converted::Bad(reason) => SpecError::SeccompProfile { path, reason },
                    Converted::Unsupported(reason) => {
                        unsupported(format!("seccomp profile {path}"), reason)
                    }
                })
        }
    }
}

/// The RuntimeDefault profile for a container with `bounding`.
pub fn runtime_default(bounding: &BTreeSet<&'static str>) -> Value {
    let mut syscalls = Vec::new();
    for b in DEFAULT_BLOCKS {
        if b.unless.iter().any(|c| bounding.contains(c)) {
            continue;
        }
        let group = |args: Value| {
            json!({
                "names": b.syscalls,
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": b.errno,
                "args": args,
            })
        };
        match b.calls {
            Calls::All => syscalls.push(group(json!([]))),
            // One group per flag: the arguments of one group must all match.
            Calls::Arg0AnyFlag(flags) => syscalls.extend(flags.iter().map(|f| {
                group(
                    json!([{ "index": 0, "value": f, "valueTwo": f, "op": "SCMP_CMP_MASKED_EQ" }]),
                )
            })),
            Calls::Arg0Is(v) => syscalls.push(group(
                json!([{ "index": 0, "value": v, "op": "SCMP_CMP_EQ" }]),
            )),
        }
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": syscalls,
    })
}

/// Why a Localhost profile could not be converted.
#[derive(Debug)]
enum Converted {
    Bad(String),
    Unsupported(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileFile {
    default_action: String,
    default_errno_ret: Option<u32>,
    architectures: Option<Vec<String>>,
    arch_map: Option<Vec<ArchMap>>,
    flags: Option<Vec<String>>,
    listener_path: Option<String>,
    syscalls: Option<Vec<FileSyscall>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArchMap {
    architecture: String,
    sub_architectures: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileSyscall {
    name: Option<String>,
    names: Option<Vec<String>>,
    action: String,
    errno_ret: Option<u32>,
    args: Option<Vec<Value>>,
    includes: Option<Condition>,
    excludes: Option<Condition>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Condition {
    caps: Option<Vec<String>>,
    arches: Option<Vec<String>>,
    min_kernel: Option<String>,
}

/// Docker's architecture name for the guest.
const ARCH: &str = "amd64";

fn kernel_at_least(min: &str) -> Result<bool, Converted> {
    let bad = || Converted::Bad(format!("minKernel {min:?} is not a version like 4.8"));
    let mut parts = min.split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let minor: u32 = match parts.next() {
        Some(p) => p.parse().map_err(|_| bad())?,
        None => 0,
    };
    Ok(GUEST_KERNEL >= (major, minor))
}

/// Whether a Docker-format syscall group applies to this container
/// (Docker's rules: every `includes` condition holds, no `excludes` one).
fn applies(s: &FileSyscall, bounding: &BTreeSet<&'static str>) -> Result<bool, Converted> {
    let has_cap = |c: &String| bounding.contains(c.as_str());
    if let Some(ex) = &s.excludes {
        if ex.arches.iter().flatten().any(|a| a == ARCH) || ex.caps.iter().flatten().any(has_cap) {
            return Ok(false);
        }
        if let Some(min) = &ex.min_kernel {
            if kernel_at_least(min)? {
                return Ok(false);
            }
        }
    }
    if let Some(inc) = &s.includes {
        if inc
            .arches
            .as_ref()
            .is_some_and(|a| !a.is_empty() && !a.iter().any(|a| a == ARCH))
        {
            return Ok(false);
        }
        if !inc.caps.iter().flatten().all(has_cap) {
            return Ok(false);
        }
        if let Some(min) = &inc.min_kernel {
            if !kernel_at_least(min)? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Converts a Docker/OCI-format profile into the spec's `linux.seccomp`.
fn localhost(text: &str, bounding: &BTreeSet<&'static str>) -> Result<Value, Converted> {
    let file: ProfileFile = serde_json::from_str(text)
        .map_err(|e| Converted::Bad(format!("not a seccomp profile: {e}")))?;
    if file.listener_path.as_deref().is_some_and(|p| !p.is_empty()) {
        return Err(Converted::Unsupported(
            "seccomp notification (listenerPath) is not supported".into(),
        ));
    }
    let mut out = json!({ "defaultAction": file.default_action });
    if let Some(e) = file.default_errno_ret {
        out["defaultErrnoRet"] = json!(e);
    }
    let mut arches = file.architectures.unwrap_or_default();
    if arches.is_empty() {
        for m in file.arch_map.iter().flatten() {
            if m.architecture == "SCMP_ARCH_X86_64" {
                arches.push(m.architecture.clone());
                arches.extend(m.sub_architectures.iter().flatten().cloned());
            }
        }
    }
    if !arches.is_empty() {
        out["architectures"] = json!(arches);
    }
    if let Some(flags) = file.flags.filter(|f| !f.is_empty()) {
        out["flags"] = json!(flags);
    }
    let mut actions = vec![file_action(&out["defaultAction"])];
    let mut syscalls = Vec::new();
    for (i, s) in file.syscalls.iter().flatten().enumerate() {
        if !applies(s, bounding)? {
            continue;
        }
        let mut names = s.names.clone().unwrap_or_default();
        names.extend(s.name.clone());
        if names.is_empty() || names.iter().any(|n| n.is_empty()) {
            return Err(Converted::Bad(format!("syscalls[{i}] names no syscall")));
        }
        let mut group = json!({ "names": names, "action": s.action });
        if let Some(e) = s.errno_ret {
            group["errnoRet"] = json!(e);
        }
        if let Some(args) = s.args.as_ref().filter(|a| !a.is_empty()) {
            group["args"] = json!(args);
        }
        actions.push(s.action.clone());
        syscalls.push(group);
    }
    out["syscalls"] = json!(syscalls);
    if actions.iter().any(|a| a == "SCMP_ACT_NOTIFY") {
        return Err(Converted::Unsupported(
            "seccomp notification (SCMP_ACT_NOTIFY) is not supported".into(),
        ));
    }
    // The spec's own type checks action, operator, flag and architecture
    // names.
    serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(out.clone())
        .map_err(|e| Converted::Bad(e.to_string()))?;
    Ok(out)
}

fn file_action(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known_to_the_agent(name: &str) -> bool {
        // The agent's check (`init/seccomp.rs`): names seccompiler's x86_64
        // table lacks are skipped, which here would silently allow them.
        let probe = json!({ "probe": {
            "mismatch_action": "allow",
            "match_action": "log",
            "filter": [{ "syscall": name }]
        }});
        seccompiler::compile_from_json(
            probe.to_string().as_bytes(),
            seccompiler::TargetArch::x86_64,
        )
        .is_ok()
    }

    #[test]
    fn every_blocked_syscall_is_an_x86_64_syscall() {
        for b in DEFAULT_BLOCKS {
            for name in b.syscalls {
                assert!(known_to_the_agent(name), "{name}");
            }
        }
        assert!(!known_to_the_agent("no_such_call"));
    }

    fn caps(names: &[&'static str]) -> BTreeSet<&'static str> {
        names.iter().copied().collect()
    }

    fn blocked(profile: &Value) -> BTreeSet<String> {
        profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["names"].as_array().unwrap().clone())
            .map(|n| n.as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn capabilities_lift_their_blocks() {
        let plain = runtime_default(&caps(&super::super::DEFAULT_CAPABILITIES));
        let names = blocked(&plain);
        for n in [
            "mount",
            "unshare",
            "clone",
            "clone3",
            "keyctl",
            "bpf",
            "io_uring_setup",
            "reboot",
        ] {
            assert!(names.contains(n), "{n}");
        }
        assert!(!names.contains("ptrace") && !names.contains("read"));
        // chroot is left to the capability the default set has.
        assert!(!names.contains("chroot"));
        let admin = blocked(&runtime_default(&caps(&["CAP_SYS_ADMIN"])));
        for n in ["mount", "unshare", "clone", "clone3", "bpf"] {
            assert!(!admin.contains(n), "{n}");
        }
        // Not lifted by anything.
        assert!(admin.contains("keyctl") && admin.contains("io_uring_setup"));
        let bpf = blocked(&runtime_default(&caps(&["CAP_BPF"])));
        assert!(!bpf.contains("bpf") && bpf.contains("mount"));
    }

    #[test]
    fn clone_is_blocked_per_namespace_flag() {
        let p = runtime_default(&BTreeSet::new());
        let clone: Vec<&Value> = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["names"] == json!(["clone"]))
            .collect();
        assert_eq!(clone.len(), NAMESPACE_FLAGS.len());
        let user = libc::CLONE_NEWUSER as u64;
        assert!(clone.iter().any(|g| g["args"]
            == json!([{"index": 0, "value": user, "valueTwo": user, "op": "SCMP_CMP_MASKED_EQ"}])));
        let clone3 = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["names"] == json!(["clone3"]))
            .unwrap();
        assert_eq!(clone3["errnoRet"], 38);
        let vsock = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["names"] == json!(["socket"]))
            .unwrap();
        assert_eq!(vsock["args"][0]["value"], 40);
    }

    /// Compiles `profile` the way the agent does (a base filter only for a
    /// non-allow default, one filter per other action) with seccompiler.
    fn compile_like_the_agent(profile: &Value) {
        let seccomp: oci_spec::runtime::LinuxSeccomp =
            serde_json::from_value(profile.clone()).expect("a LinuxSeccomp");
        assert_eq!(
            seccomp.default_action(),
            oci_spec::runtime::LinuxSeccompAction::ScmpActAllow
        );
        let mut by_errno: std::collections::BTreeMap<u32, Vec<Value>> = Default::default();
        for group in seccomp.syscalls().iter().flatten() {
            let errno = group.errno_ret().unwrap_or(1);
            let conditions: Vec<Value> = group
                .args()
                .iter()
                .flatten()
                .map(|a| {
                    use oci_spec::runtime::LinuxSeccompOperator as O;
                    let (op, val) = match a.op() {
                        O::ScmpCmpEq => (json!("eq"), a.value()),
                        O::ScmpCmpMaskedEq => (
                            json!({ "masked_eq": a.value() }),
                            a.value_two().unwrap_or(0),
                        ),
                        other => panic!("unexpected operator {other:?}"),
                    };
                    json!({ "index": a.index(), "type": "qword", "op": op, "val": val })
                })
                .collect();
            for name in group.names() {
                let mut rule = json!({ "syscall": name });
                if !conditions.is_empty() {
                    rule["args"] = json!(conditions);
                }
                by_errno.entry(errno).or_default().push(rule);
            }
        }
        let filters: serde_json::Map<String, Value> = by_errno
            .into_iter()
            .map(|(errno, rules)| {
                (
                    format!("errno-{errno}"),
                    json!({ "mismatch_action": "allow", "match_action": { "errno": errno }, "filter": rules }),
                )
            })
            .collect();
        assert_eq!(filters.len(), 2, "EPERM and ENOSYS");
        let compiled = seccompiler::compile_from_json(
            Value::Object(filters).to_string().as_bytes(),
            seccompiler::TargetArch::x86_64,
        )
        .expect("compiles");
        assert!(compiled.values().all(|f| !f.is_empty()));
    }

    #[test]
    fn the_default_profile_compiles_as_the_agent_compiles_it() {
        compile_like_the_agent(&runtime_default(&BTreeSet::new()));
        compile_like_the_agent(&runtime_default(&caps(&super::super::DEFAULT_CAPABILITIES)));
    }

    #[test]
    fn kernel_versions() {
        assert!(kernel_at_least("4.8").unwrap());
        assert!(kernel_at_least("6.1").unwrap());
        assert!(kernel_at_least("6").unwrap());
        assert!(!kernel_at_least("6.2").unwrap());
        assert!(kernel_at_least("x.1").is_err());
    }
}
