//! The OCI runtime spec of a container: CRI's `ContainerConfig` and the
//! image's configuration turned into the agent's `CreateContainerRequest`.
//!
//! The rules are those of containerd's CRI plugin building a spec for runc
//! (`buildLinuxSpec` and the options it applies), so that a pod behaves
//! under carapace as it does on a containerd node. Where a VM changes the
//! picture, the difference is deliberate and listed below.
//!
//! # Mirrored from containerd
//! - **args**: Kubernetes' rules: `command` replaces the image's Entrypoint
//!   and then the image's Cmd is not used; `args` alone replaces Cmd. An
//!   Entrypoint of `[""]` counts as none. Nothing to run is an error.
//! - **env**: `PATH` (the usual default), `HOSTNAME` (the pod's hostname),
//!   the image's Env, then the CRI envs; a later value of a key replaces the
//!   earlier one in place, an image entry without `=` removes the key.
//! - **cwd**: `working_dir`, else the image's WorkingDir, else `/`.
//! - **user**: `run_as_username` or `run_as_user` (+ `run_as_group`), else
//!   the image's User (`uid`, `uid:gid`, `name`, `name:gid`, `uid:group`,
//!   `name:group`); a name is resolved by the agent in the container's
//!   `/etc/passwd`, and so is the gid of a numeric uid without a group
//!   (`gid_from_passwd`: the gid of the uid's entry, 0 without one; no user
//!   at all is 0:0, looked up nowhere); a group name, or a gid beside a
//!   user name, is the agent's to set after the user (`group`, a name in
//!   the container's `/etc/group`); `supplemental_groups` become additional
//!   gids (sorted, deduplicated), and the agent adds the user's
//!   `/etc/group` memberships. The host never reads the image's
//!   `/etc/passwd` (its symlinks are the image's);
//!   `supplemental_groups_policy: Strict` leaves those memberships out.
//! - **capabilities**: containerd's 14 defaults, then `add` (`ALL` first),
//!   then `drop` (`ALL` first); bounding = effective = permitted, for root
//!   and non-root alike (as containerd, unlike Docker, does); inheritable
//!   empty (CVE-2022-24769). Ambient: only `add_ambient_capabilities`
//!   (containerd clears ambient; the CRI field is honoured here, and each
//!   such capability is also made inheritable, as the kernel requires).
//! - **mounts**: containerd's defaults without `/run` (proc, a 64 MiB tmpfs
//!   `/dev`, devpts, shm, mqueue, read-only sysfs, read-only cgroup2 at
//!   `/sys/fs/cgroup`), minus those a supplied mount replaces (and every
//!   `/dev/...` one when `/dev` is supplied); then the supplied bind mounts
//!   (`rbind`, `ro`/`rw`, `rprivate`/`rslave`/`rshared`) sorted by depth:
//!   the CRI mounts and the pod's `/etc/hostname`, `/etc/hosts`,
//!   `/etc/resolv.conf` (read-only with a read-only rootfs) and `/dev/shm`
//!   unless a CRI mount targets the same path. `rslave` makes the rootfs
//!   propagation `rslave`, `rshared` makes it `rshared`. The agent adds the
//!   default device nodes itself when `/dev` is a tmpfs.
//! - **/dev/shm**: the pod's, a 64 MiB tmpfs (mode 1777, `nosuid`, `nodev`,
//!   `noexec`) the agent mounts in SetupSandbox, bound writable (also with
//!   a read-only rootfs) with those flags repeated, for every container in
//!   the pod's IPC namespace, so POSIX shared memory is shared between them
//!   as System V IPC is.
//! - **masked / read-only paths**: the CRI lists (kubelet sends them for
//!   every non-privileged container); when CRI sends none, containerd's
//!   `oci` defaults. (containerd 2 leaves them empty then, to honour
//!   `procMount: Unmasked`, which needs the user namespaces carapace does
//!   not support yet.)
//! - **privileged**: every capability (drops included), no seccomp, no
//!   masked or read-only paths, writable `/sys` and `/sys/fs/cgroup`, no
//!   cgroup namespace.
//! - **namespaces**: a cgroup namespace for non-privileged containers (as
//!   containerd on cgroup v2). Pid and IPC follow `namespace_options`
//!   through the request's modes.
//! - **resources**: cpu shares/quota/period and cpuset, memory limit (swap
//!   set equal to it, i.e. no swap, when CRI gives none), hugepage limits,
//!   `unified`, `oom_score_adj`. k8s-cri 0.11's `LinuxContainerResources`
//!   has no pids limit.
//! - **annotations**: `io.kubernetes.cri.container-type=container`,
//!   `...container-name` and `...image-name`, over all the CRI annotations
//!   (containerd passes only those its runtime config allows; the agent
//!   reads none).
//!
//! # Chosen here
//! - **rlimits**: containerd's CRI plugin removes all rlimits from the spec,
//!   so containers inherit containerd's own (1048576 open files under the
//!   `LimitNOFILE=infinity` unit shipped until containerd 1.7, which is what
//!   Kubernetes workloads have been tuned against since 2017; containerd
//!   2.0's unit leaves systemd's 1024:524288). Inheriting here would give
//!   the agent's, i.e. the kernel's defaults for init (1024:4096), so the
//!   spec sets [`NOFILE_LIMIT`] explicitly.
//! - **pod sysctls**: `net.*` belong to the VM and are written once by
//!   SetupSandbox; the IPC ones (`kernel.shm*`, `kernel.msg*`,
//!   `kernel.sem`, `fs.mqueue.*`) are per IPC namespace, which the agent
//!   creates after SetupSandbox, so they go into every container's
//!   `linux.sysctl`.
//! - **IPC `CONTAINER` mode** (kubelet never sends it) gets a new IPC
//!   namespace and its own `/dev/shm` tmpfs (the default mount), where
//!   containerd ignores the mode and joins the sandbox's namespace and
//!   `/dev/shm` anyway. The containers of a pod whose agent answered no
//!   `shm_path` (an agent older than the field) keep their own tmpfs too.
//! - **seccomp**: see the `seccomp` submodule (RuntimeDefault is a table of
//!   blocked syscalls modelled on Docker's and containerd's profiles;
//!   Localhost profiles are read from the host in Docker/OCI format).
//!
//! # What a VM changes
//! - NODE namespaces (network, pid, IPC) are refused: the pod is a VM and
//!   cannot share the host's, nor are user namespaces supported yet. TARGET
//!   pid mode (an ephemeral container aimed at another) joins the target's
//!   pid namespace in the guest; the runtime checks the target first.
//! - Mounts asking for recursive read-only, id mappings or an image volume
//!   are refused, before anything is bound (`check_mounts`).
//! - Host devices (`devices`, `CDI_devices`) are refused: they are not in
//!   the VM. A privileged container does not get the guest's devices
//!   either (containerd gives it the host's).
//! - AppArmor and SELinux settings are ignored: the guest kernel has
//!   neither LSM, and the VM boundary is the isolation that matters.

mod mounts;
mod process;
mod resources;
mod seccomp;

use std::collections::BTreeMap;

use carapace_agent_api::v1::{CreateContainerRequest, NamespaceMode};
use k8s_cri::v1 as cri;
use serde_json::json;

use crate::image::manifest::ImageConfig;

/// A CRI mount already made visible in the guest by the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMount {
    /// Where it appears in the container (CRI Mount.container_path).
    pub container_path: String,
    /// The guest path to bind from.
    pub guest_source: String,
    pub readonly: bool,
    /// CRI MountPropagation as i32 (private / host-to-container / bidirectional)
    pub propagation: i32,
}

/// Guest paths of the pod's files written by the agent's SetupSandbox (empty when absent).
#[derive(Debug, Clone, Default)]
pub struct SandboxFiles {
    pub hostname: String,
    pub resolv_conf: String,
    pub hosts: String,
    /// The pod's `/dev/shm` tmpfs, bound on the `/dev/shm` of containers in
    /// the pod's IPC namespace (empty from an agent that makes none).
    pub shm: String,
}

/// Everything [`agent_request`] needs.
#[derive(Debug, Clone)]
pub struct SpecInput<'a> {
    pub container_id: &'a str,
    pub config: &'a cri::ContainerConfig,
    pub image: &'a ImageConfig,
    /// Guest path of the container's root filesystem.
    pub root_path: String,
    /// config.mounts resolved to guest paths (the caller does the host side; ignore config.mounts' host_path).
    pub mounts: Vec<GuestMount>,
    pub sandbox_files: SandboxFiles,
    /// The pod's hostname (PodSandboxConfig.hostname): the container's
    /// `HOSTNAME` variable and `hostname`, as containerd sets them.
    pub pod_hostname: String,
    /// The pod's sysctls (PodSandboxConfig.linux.sysctls); only the IPC ones
    /// are applied per container (see the module documentation).
    pub pod_sysctls: BTreeMap<String, String>,
}

/// A container config that cannot become a spec. Every variant names the
/// CRI field at fault.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A malformed request (gRPC `INVALID_ARGUMENT`).
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A valid request a VM-isolated pod cannot honour, or that carapace does
    /// not support yet (`INVALID_ARGUMENT` too: nothing was changed, and
    /// retrying the same request cannot succeed).
    #[error("{field}: {reason}")]
    Unsupported { field: String, reason: String },
    /// A Localhost seccomp profile that cannot be read or converted.
    #[error("seccomp profile {path}: {reason}")]
    SeccompProfile { path: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn unsupported(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::Unsupported {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The PATH a container gets when neither the image nor CRI sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// RLIMIT_NOFILE (soft = hard) of every container; see the module
/// documentation. Raising the hard limit needs CAP_SYS_RESOURCE in the
/// agent (PID 1 of the guest has it; an agent run on a host without it
/// fails the create with EPERM) and `fs.nr_open` at least this (the
/// kernel's default is exactly this).
pub const NOFILE_LIMIT: u64 = 1_048_576;

/// containerd's default capabilities (`pkg/oci`, unchanged through 2.x).
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability the guest kernel (6.1) knows: what `ALL` and
/// privileged mean.
pub const ALL_CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// containerd's default masked paths (`pkg/oci`).
pub const DEFAULT_MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
];

/// containerd's default read-only paths (`pkg/oci`).
pub const DEFAULT_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Builds the agent's CreateContainer request for `input`.
pub fn agent_request(input: &SpecInput) -> Result<CreateContainerRequest, SpecError> {
    let config = input.config;
    validate_container_id(input.container_id)?;
    let name = config.metadata.as_ref().map_or("", |m| m.name.as_str());
    if name.is_empty() {
        return Err(invalid("metadata.name", "must not be empty"));
    }
    if !config.devices.is_empty() {
        return Err(unsupported(
            "devices",
            "host devices are not available in the pod's VM",
        ));
    }
    if !config.cdi_devices.is_empty() {
        return Err(unsupported(
            "CDI_devices",
            "host devices are not available in the pod's VM",
        ));
    }
    let default_sc = cri::LinuxContainerSecurityContext::default();
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .unwrap_or(&default_sc);
    let privileged = sc.privileged;
    validate_hostname(&input.pod_hostname)?;

    let (pid_mode, ipc_mode) = namespace_modes(sc)?;
    let args = process::args(config, input.image)?;
    let env = process::environment(config, input.image, &input.pod_hostname)?;
    let cwd = process::working_dir(config, input.image)?;
    let user = process::user(sc, input.image)?;
    let caps = process::capabilities(sc)?;
    let seccomp = if privileged {
        None
    } else {
        seccomp::profile(sc, &caps.bounding)?
    };
    let (mounts, rootfs_propagation) = mounts::mounts(input, sc, ipc_mode)?;
    let (resources, oom_score_adj) =
        resources::resources(config.linux.as_ref().and_then(|l| l.resources.as_ref()))?;

    let mut process = json!({
        "terminal": config.tty,
        "user": {
            "uid": user.uid,
            "gid": user.gid,
            "additionalGids": user.additional_gids,
        },
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {
            "bounding": caps.bounding,
            "effective": caps.bounding,
            "permitted": caps.bounding,
            "inheritable": caps.ambient,
            "ambient": caps.ambient,
        },
        "rlimits": [{ "type": "RLIMIT_NOFILE", "soft": NOFILE_LIMIT, "hard": NOFILE_LIMIT }],
        "noNewPrivileges": sc.no_new_privs,
    });
    if let Some(adj) = oom_score_adj {
        process["oomScoreAdj"] = json!(adj);
    }

    let mut linux = json!({});
    if let Some(r) = resources {
        linux["resources"] = r;
    }
    if !privileged {
        linux["namespaces"] = json!([{ "type": "cgroup" }]);
        linux["maskedPaths"] = json!(mounts::path_list(
            "linux.security_context.masked_paths",
            &sc.masked_paths,
            &DEFAULT_MASKED_PATHS
        )?);
        linux["readonlyPaths"] = json!(mounts::path_list(
            "linux.security_context.readonly_paths",
            &sc.readonly_paths,
            &DEFAULT_READONLY_PATHS
        )?);
    }
    if let Some(p) = seccomp {
        linux["seccomp"] = p;
    }
    if let Some(p) = rootfs_propagation {
        linux["rootfsPropagation"] = json!(p);
    }
    let sysctl = ipc_sysctls(&input.pod_sysctls)?;
    if !sysctl.is_empty() {
        linux["sysctl"] = json!(sysctl);
    }

    let mut spec = json!({
        "ociVersion": "1.2.0",
        "process": process,
        "root": { "path": root_path(&input.root_path)?, "readonly": sc.readonly_rootfs },
        "mounts": mounts,
        "linux": linux,
        "annotations": annotations(config, name),
    });
    if !input.pod_hostname.is_empty() {
        spec["hostname"] = json!(input.pod_hostname);
    }

    // Through oci-spec's types: what the agent parses is what we checked.
    let spec: oci_spec::runtime::Spec = serde_json::from_value(spec).map_err(|e| {
        invalid(
            "container config",
            format!("makes an invalid OCI spec: {e}"),
        )
    })?;
    let oci_spec_json = serde_json::to_string(&spec).map_err(|e| {
        invalid(
            "container config",
            format!("OCI spec not serializable: {e}"),
        )
    })?;
    Ok(CreateContainerRequest {
        container_id: input.container_id.to_owned(),
        oci_spec_json,
        username: user.username.unwrap_or_default(),
        gid_from_passwd: user.gid_from_passwd,
        group: user.group.unwrap_or_default(),
        strict_supplemental_groups: user.strict_groups,
        pid_mode: pid_mode as i32,
        ipc_mode: ipc_mode as i32,
        stdin: config.stdin,
        pid_target_container_id: match pid_mode {
            NamespaceMode::Target => pid_target(config).to_owned(),
            _ => String::new(),
        },
    })
}

/// The agent's rule for hostnames (empty: the VM's stays).
fn validate_hostname(name: &str) -> Result<(), SpecError> {
    if carapace_agent_api::is_valid_hostname(name) {
        Ok(())
    } else {
        Err(invalid(
            "sandbox config hostname",
            format!("{name:?} is not a valid hostname"),
        ))
    }
}

/// The agent's rule for container ids (they become cgroup names).
fn validate_container_id(id: &str) -> Result<(), SpecError> {
    if id.is_empty() {
        return Err(invalid("container id", "must not be empty"));
    }
    if carapace_agent_api::is_valid_id(id) {
        Ok(())
    } else {
        Err(invalid(
            "container id",
            format!("{id:?} must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}"),
        ))
    }
}

/// Refuses what the CRI mounts of `config` ask for that carapace does not
/// do yet, before anything is bound: kubelet sends none of it unless the
/// runtime declares it (recursive read-only mounts and user-namespace id
/// mappings per runtime handler, image volumes by the image's host path),
/// but another client may, and ignoring it would run the container with
/// less than it asked.
pub fn check_mounts(config: &cri::ContainerConfig) -> Result<(), SpecError> {
    for (i, m) in config.mounts.iter().enumerate() {
        let field = |name: &str| format!("mounts[{i}].{name}");
        if m.recursive_read_only {
            return Err(unsupported(
                field("recursive_read_only"),
                "recursive read-only mounts are not supported yet",
            ));
        }
        if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
            return Err(unsupported(
                field("uidMappings"),
                "id-mapped mounts (user namespaces) are not supported yet",
            ));
        }
        if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
            return Err(unsupported(
                field("image"),
                "image volumes are not supported yet",
            ));
        }
    }
    Ok(())
}

/// The container whose pid namespace `config` asks to join (pid mode
/// TARGET, as kubelet asks for an ephemeral container with a target), or
/// "".
pub fn pid_target(config: &cri::ContainerConfig) -> &str {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|sc| sc.namespace_options.as_ref())
        .filter(|ns| ns.pid == cri::NamespaceMode::Target as i32)
        .map_or("", |ns| ns.target_id.as_str())
}

fn namespace_modes(
    sc: &cri::LinuxContainerSecurityContext,
) -> Result<(NamespaceMode, NamespaceMode), SpecError> {
    let default_ns = cri::NamespaceOption::default();
    let ns = sc.namespace_options.as_ref().unwrap_or(&default_ns);
    let field = |which: &str| format!("linux.security_context.namespace_options.{which}");
    let mode = |which: &str, value: i32| -> Result<NamespaceMode, SpecError> {
        match cri::NamespaceMode::try_from(value) {
            Ok(cri::NamespaceMode::Pod) => Ok(NamespaceMode::Pod),
            Ok(cri::NamespaceMode::Container) => Ok(NamespaceMode::Container),
            Ok(cri::NamespaceMode::Node) => Err(unsupported(
                field(which),
                format!(
                    "NODE: the pod runs in its own VM and cannot share the host's {which} namespace"
                ),
            )),
            Ok(cri::NamespaceMode::Target) if which == "pid" => {
                if ns.target_id.is_empty() {
                    Err(invalid(
                        field("target_id"),
                        "pid mode TARGET needs the target container's id",
                    ))
                } else {
                    Ok(NamespaceMode::Target)
                }
            }
            Ok(cri::NamespaceMode::Target) => Err(invalid(
                field(which),
                "TARGET is only defined for the pid namespace",
            )),
            Err(_) => Err(invalid(
                field(which),
                format!("unknown namespace mode {value}"),
            )),
        }
    };
    if ns.network == cri::NamespaceMode::Node as i32 {
        return Err(unsupported(
            field("network"),
            "NODE: the pod runs in its own VM and cannot use the host's network",
        ));
    }
    if let Some(userns) = &ns.userns_options {
        if userns.mode != cri::NamespaceMode::Node as i32 {
            return Err(unsupported(
                field("userns_options"),
                "user namespaces are not supported yet",
            ));
        }
    }
    Ok((mode("pid", ns.pid)?, mode("ipc", ns.ipc)?))
}

/// Whether a sysctl is one of the IPC namespace's.
fn is_ipc_sysctl(key: &str) -> bool {
    key.starts_with("kernel.shm")
        || key.starts_with("kernel.msg")
        || key == "kernel.sem"
        || key.starts_with("fs.mqueue.")
}

/// The pod's IPC sysctls, with the agent's key rules.
fn ipc_sysctls(pod: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, SpecError> {
    let mut out = BTreeMap::new();
    for (key, value) in pod {
        let dotted = key.replace('/', ".");
        if !is_ipc_sysctl(&dotted) {
            continue;
        }
        let valid = dotted.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
        if !valid || value.contains('\0') {
            return Err(invalid(
                "sandbox config linux.sysctls",
                format!("invalid sysctl {key:?}"),
            ));
        }
        out.insert(dotted, value.clone());
    }
    Ok(out)
}

fn root_path(path: &str) -> Result<&str, SpecError> {
    if path.is_empty() || path.contains('\0') || path.split('/').any(|p| p == "..") {
        return Err(invalid(
            "root path",
            format!("{path:?} is not a usable guest path"),
        ));
    }
    Ok(path)
}

fn annotations(config: &cri::ContainerConfig, name: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = config
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.insert(
        "io.kubernetes.cri.container-type".into(),
        "container".into(),
    );
    out.insert("io.kubernetes.cri.container-name".into(), name.into());
    if let Some(image) = &config.image {
        let image_name = if image.user_specified_image.is_empty() {
            &image.image
        } else {
            &image.user_specified_image
        };
        if !image_name.is_empty() {
            out.insert("io.kubernetes.cri.image-name".into(), image_name.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests;
