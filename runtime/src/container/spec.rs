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
//!   the image's User (`uid`, `uid:gid`, `name`); a name is resolved by
//!   the agent in the container's `/etc/passwd`; `supplemental_groups`
//!   become additional gids (sorted, deduplicated). Not yet expressible to
//!   the agent, so refused: a user name with an explicit group, a group
//!   name, `supplemental_groups_policy: Strict`. A numeric uid without a
//!   group runs with gid 0, where containerd takes the gid of the uid's
//!   `/etc/passwd` entry.
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
//!   `/etc/resolv.conf` (read-only with a read-only rootfs) unless a CRI
//!   mount targets the same path. `rslave` makes the rootfs propagation
//!   `rslave`, `rshared` makes it `rshared`. The agent adds the default
//!   device nodes itself when `/dev` is a tmpfs.
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
//! - **seccomp**: see the `seccomp` submodule (RuntimeDefault is a table of
//!   blocked syscalls modelled on Docker's and containerd's profiles;
//!   Localhost profiles are read from the host in Docker/OCI format).
//!
//! # What a VM changes
//! - NODE namespaces (network, pid, IPC) are refused: the pod is a VM and
//!   cannot share the host's. TARGET pid mode (ephemeral containers aimed at
//!   another container) is refused for now, as are user namespaces.
//! - Host devices (`devices`, `CDI_devices`) are refused: they are not in
//!   the VM. A privileged container does not get the guest's devices
//!   either (containerd gives it the host's).
//! - `/dev/shm` is a tmpfs per container, not the sandbox's shared one, so
//!   POSIX shared memory is not shared between a pod's containers (System V
//!   IPC is, through the pod IPC namespace).
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
    let (mounts, rootfs_propagation) = mounts::mounts(input, sc)?;
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
        pid_mode: pid_mode as i32,
        ipc_mode: ipc_mode as i32,
        stdin: config.stdin,
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
            Ok(cri::NamespaceMode::Target) if which == "pid" => Err(unsupported(
                field(which),
                "TARGET (sharing another container's processes, as ephemeral debug containers do) is not supported yet",
            )),
            Ok(cri::NamespaceMode::Target) => Err(invalid(
                field(which),
                "TARGET is only defined for the pid namespace",
            )),
            Err(_) => Err(invalid(field(which), format!("unknown namespace mode {value}"))),
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
mod tests {
    use super::process::{self, capabilities, environment, valid_env_name, ProcessUser};
    use super::resources::resources;
    use super::*;
    use cri::{
        Capability, ContainerMetadata, Int64Value, KeyValue, LinuxContainerConfig,
        LinuxContainerResources, LinuxContainerSecurityContext, NamespaceOption,
    };
    use serde_json::Value;
    use std::collections::BTreeSet;

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["image-cmd".into()],
            env: vec!["PATH=/image/bin".into(), "FROM_IMAGE=1".into()],
            ..Default::default()
        }
    }

    fn config() -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: "sha256:abc".into(),
                user_specified_image: "docker.io/library/busybox:1".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn with_sc(f: impl FnOnce(&mut LinuxContainerSecurityContext)) -> cri::ContainerConfig {
        let mut sc = LinuxContainerSecurityContext::default();
        f(&mut sc);
        cri::ContainerConfig {
            linux: Some(LinuxContainerConfig {
                security_context: Some(sc),
                resources: None,
            }),
            ..config()
        }
    }

    fn input<'a>(config: &'a cri::ContainerConfig, image: &'a ImageConfig) -> SpecInput<'a> {
        SpecInput {
            container_id: "c1",
            config,
            image,
            root_path: "/run/carapace/rootfs/c1".into(),
            mounts: Vec::new(),
            sandbox_files: SandboxFiles::default(),
            pod_hostname: "pod-a".into(),
            pod_sysctls: BTreeMap::new(),
        }
    }

    /// What the agent does with the JSON first: parse it with oci-spec and
    /// refuse a spec without args or root, with relative mount
    /// destinations, or with a user namespace.
    fn agent_accepts(json: &str) -> oci_spec::runtime::Spec {
        let spec: oci_spec::runtime::Spec = serde_json::from_str(json).expect("oci-spec parses it");
        let process = spec.process().as_ref().expect("process");
        assert!(process.args().as_ref().is_some_and(|a| !a.is_empty()));
        assert!(spec.root().is_some());
        for m in spec.mounts().iter().flatten() {
            assert!(m.destination().is_absolute(), "{m:?}");
        }
        let linux = spec.linux().as_ref().expect("linux");
        for ns in linux.namespaces().iter().flatten() {
            assert_ne!(ns.typ(), oci_spec::runtime::LinuxNamespaceType::User);
        }
        // Serializing again gives the same document.
        let again = serde_json::to_string(&spec).unwrap();
        let reparsed: oci_spec::runtime::Spec = serde_json::from_str(&again).unwrap();
        assert_eq!(reparsed, spec);
        spec
    }

    fn request(input: &SpecInput) -> (CreateContainerRequest, Value) {
        let req = agent_request(input).unwrap_or_else(|e| panic!("{e}"));
        agent_accepts(&req.oci_spec_json);
        let value = serde_json::from_str(&req.oci_spec_json).unwrap();
        (req, value)
    }

    fn spec_for(config: &cri::ContainerConfig, image: &ImageConfig) -> Value {
        request(&input(config, image)).1
    }

    fn error_for(config: &cri::ContainerConfig, image: &ImageConfig) -> String {
        agent_request(&input(config, image))
            .expect_err("should be refused")
            .to_string()
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    }

    fn args_for(
        command: &[&str],
        args: &[&str],
        image: &ImageConfig,
    ) -> Result<Vec<String>, String> {
        let c = cri::ContainerConfig {
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..config()
        };
        process::args(&c, image).map_err(|e| e.to_string())
    }

    #[test]
    fn command_and_args_follow_kubernetes() {
        let img = image();
        // Neither: the image's Entrypoint + Cmd.
        assert_eq!(args_for(&[], &[], &img).unwrap(), ["/entry", "image-cmd"]);
        // command replaces the Entrypoint, and the image's Cmd is dropped.
        assert_eq!(args_for(&["/bin/sh"], &[], &img).unwrap(), ["/bin/sh"]);
        // args alone replace Cmd, the Entrypoint stays.
        assert_eq!(args_for(&[], &["-x"], &img).unwrap(), ["/entry", "-x"]);
        // Both: exactly command + args.
        assert_eq!(
            args_for(&["/bin/sh"], &["-c", "true"], &img).unwrap(),
            ["/bin/sh", "-c", "true"]
        );
        // An Entrypoint of [""] counts as none.
        let blank = ImageConfig {
            entrypoint: vec![String::new()],
            ..image()
        };
        assert_eq!(args_for(&[], &[], &blank).unwrap(), ["image-cmd"]);
        let cmd_only = ImageConfig {
            entrypoint: Vec::new(),
            ..image()
        };
        assert_eq!(args_for(&[], &[], &cmd_only).unwrap(), ["image-cmd"]);
        assert_eq!(args_for(&[], &["x"], &cmd_only).unwrap(), ["x"]);
        // Nothing at all to run.
        let empty = ImageConfig::default();
        let err = args_for(&[], &[], &empty).unwrap_err();
        assert!(err.starts_with("command: no command specified"), "{err}");
        assert!(args_for(&[""], &[], &empty).is_err());
        assert!(args_for(&["a\0b"], &[], &empty).is_err());
        // And it lands in the spec.
        let spec = spec_for(&config(), &img);
        assert_eq!(strings(&spec["process"]["args"]), ["/entry", "image-cmd"]);
    }

    #[test]
    fn environment_is_path_hostname_image_then_cri() {
        let c = cri::ContainerConfig {
            envs: vec![
                KeyValue {
                    key: "FROM_IMAGE".into(),
                    value: "2".into(),
                },
                KeyValue {
                    key: "EXTRA".into(),
                    value: "a=b".into(),
                },
            ],
            ..config()
        };
        let img = ImageConfig {
            env: vec![
                "PATH=/image/bin".into(),
                "FROM_IMAGE=1".into(),
                "GONE=x".into(),
                "GONE".into(),
            ],
            ..image()
        };
        let spec = spec_for(&c, &img);
        assert_eq!(
            strings(&spec["process"]["env"]),
            [
                "PATH=/image/bin",
                "HOSTNAME=pod-a",
                "FROM_IMAGE=2",
                "EXTRA=a=b"
            ]
        );
        // Without an image PATH, the default one.
        let env = environment(&config(), &ImageConfig::default(), "").unwrap();
        assert_eq!(env, [format!("PATH={DEFAULT_PATH}")]);
        // CRI may override PATH and HOSTNAME too.
        let c = cri::ContainerConfig {
            envs: vec![KeyValue {
                key: "HOSTNAME".into(),
                value: "mine".into(),
            }],
            ..config()
        };
        let env = environment(&c, &image(), "pod-a").unwrap();
        assert!(env.contains(&"HOSTNAME=mine".to_owned()), "{env:?}");
    }

    #[test]
    fn bad_environment_names_the_field() {
        for key in ["", "A=B", "tab\there", "caf\u{e9}"] {
            let c = cri::ContainerConfig {
                envs: vec![
                    KeyValue {
                        key: "OK".into(),
                        value: String::new(),
                    },
                    KeyValue {
                        key: key.into(),
                        value: "v".into(),
                    },
                ],
                ..config()
            };
            let err = error_for(&c, &image());
            assert!(err.starts_with("envs[1].key:"), "{err}");
        }
        let c = cri::ContainerConfig {
            envs: vec![KeyValue {
                key: "K".into(),
                value: "a\0b".into(),
            }],
            ..config()
        };
        assert!(error_for(&c, &image()).starts_with("envs[0].value:"));
        let img = ImageConfig {
            env: vec!["A=\0".into()],
            ..image()
        };
        assert!(error_for(&config(), &img).starts_with("image config Env:"));
        // Names Kubernetes allows beyond C identifiers are fine.
        assert!(valid_env_name("my.var-1"));
    }

    #[test]
    fn working_directory() {
        let with_dir = |dir: &str| cri::ContainerConfig {
            working_dir: dir.into(),
            ..config()
        };
        let img = ImageConfig {
            working_dir: "/srv".into(),
            ..image()
        };
        assert_eq!(
            spec_for(&with_dir("/work"), &img)["process"]["cwd"],
            "/work"
        );
        assert_eq!(spec_for(&config(), &img)["process"]["cwd"], "/srv");
        assert_eq!(spec_for(&config(), &image())["process"]["cwd"], "/");
        assert!(error_for(&with_dir("rel"), &img).starts_with("working_dir:"));
        let rel = ImageConfig {
            working_dir: "srv".into(),
            ..image()
        };
        assert!(error_for(&config(), &rel).starts_with("image config WorkingDir:"));
    }

    fn user_of(c: &cri::ContainerConfig, image_user: &str) -> Result<ProcessUser, String> {
        let sc = c
            .linux
            .as_ref()
            .and_then(|l| l.security_context.clone())
            .unwrap_or_default();
        let img = ImageConfig {
            user: image_user.into(),
            ..image()
        };
        process::user(&sc, &img).map_err(|e| e.to_string())
    }

    fn ids(uid: u32, gid: u32, username: Option<&str>) -> ProcessUser {
        ProcessUser {
            uid,
            gid,
            username: username.map(str::to_owned),
            additional_gids: Vec::new(),
        }
    }

    #[test]
    fn image_user_strings() {
        let c = config();
        assert_eq!(user_of(&c, "").unwrap(), ids(0, 0, None));
        assert_eq!(user_of(&c, "1000").unwrap(), ids(1000, 0, None));
        assert_eq!(user_of(&c, "1000:2000").unwrap(), ids(1000, 2000, None));
        assert_eq!(user_of(&c, "nginx").unwrap(), ids(0, 0, Some("nginx")));
        // What the agent cannot express yet is refused, not approximated.
        let err = user_of(&c, "nginx:101").unwrap_err();
        assert!(
            err.starts_with("image config User: user name \"nginx\" with group 101"),
            "{err}"
        );
        let err = user_of(&c, "1000:staff").unwrap_err();
        assert!(err.contains("group name \"staff\""), "{err}");
        for bad in [":1", "1:", "4294967296", "a/b", "1:2:3"] {
            assert!(
                user_of(&c, bad)
                    .unwrap_err()
                    .starts_with("image config User:"),
                "{bad}"
            );
        }
    }

    #[test]
    fn cri_user_overrides_the_image() {
        let c = with_sc(|sc| sc.run_as_user = Some(Int64Value { value: 1001 }));
        assert_eq!(user_of(&c, "nginx:101").unwrap(), ids(1001, 0, None));
        let c = with_sc(|sc| {
            sc.run_as_user = Some(Int64Value { value: 1001 });
            sc.run_as_group = Some(Int64Value { value: 3000 });
            sc.supplemental_groups = vec![5, 4, 5];
        });
        let u = user_of(&c, "").unwrap();
        assert_eq!((u.uid, u.gid, u.additional_gids), (1001, 3000, vec![4, 5]));
        let c = with_sc(|sc| sc.run_as_username = "app".into());
        assert_eq!(user_of(&c, "1000").unwrap(), ids(0, 0, Some("app")));
        let c = with_sc(|sc| {
            sc.run_as_username = "app".into();
            sc.run_as_group = Some(Int64Value { value: 3000 });
        });
        assert!(user_of(&c, "").unwrap_err().contains("not supported yet"));

        let c = with_sc(|sc| sc.run_as_group = Some(Int64Value { value: 3000 }));
        let err = user_of(&c, "1000").unwrap_err();
        assert!(
            err.starts_with("linux.security_context.run_as_group: needs run_as_user"),
            "{err}"
        );
        let c = with_sc(|sc| {
            sc.run_as_user = Some(Int64Value { value: 1 });
            sc.run_as_username = "app".into();
        });
        assert!(user_of(&c, "").unwrap_err().contains("mutually exclusive"));
        let c = with_sc(|sc| sc.run_as_user = Some(Int64Value { value: -1 }));
        assert!(user_of(&c, "")
            .unwrap_err()
            .starts_with("linux.security_context.run_as_user:"));
        let c = with_sc(|sc| sc.supplemental_groups = vec![1 << 40]);
        assert!(user_of(&c, "")
            .unwrap_err()
            .starts_with("linux.security_context.supplemental_groups:"));
        let c = with_sc(|sc| {
            sc.supplemental_groups_policy = cri::SupplementalGroupsPolicy::Strict as i32
        });
        assert!(user_of(&c, "").unwrap_err().contains("Strict"));
    }

    #[test]
    fn user_lands_in_spec_and_request() {
        let c = with_sc(|sc| {
            sc.run_as_user = Some(Int64Value { value: 1001 });
            sc.run_as_group = Some(Int64Value { value: 3000 });
            sc.supplemental_groups = vec![7];
        });
        let (req, spec) = request(&input(&c, &image()));
        assert_eq!(
            spec["process"]["user"],
            json!({"uid": 1001, "gid": 3000, "additionalGids": [7]})
        );
        assert_eq!(req.username, "");
        let img = ImageConfig {
            user: "nginx".into(),
            ..image()
        };
        let (req, spec) = request(&input(&config(), &img));
        assert_eq!(req.username, "nginx");
        assert_eq!(spec["process"]["user"]["uid"], 0);
    }

    fn caps_of(add: &[&str], drop: &[&str]) -> Result<BTreeSet<&'static str>, String> {
        let c = with_sc(|sc| {
            sc.capabilities = Some(Capability {
                add_capabilities: add.iter().map(|s| s.to_string()).collect(),
                drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
                add_ambient_capabilities: Vec::new(),
            })
        });
        let sc = c.linux.unwrap().security_context.unwrap();
        capabilities(&sc)
            .map(|c| c.bounding)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn capabilities_add_and_drop() {
        let defaults: BTreeSet<&str> = DEFAULT_CAPABILITIES.into_iter().collect();
        assert_eq!(caps_of(&[], &[]).unwrap(), defaults);
        let more = caps_of(&["NET_ADMIN", "cap_sys_time"], &["NET_RAW", "mknod"]).unwrap();
        assert!(more.contains("CAP_NET_ADMIN") && more.contains("CAP_SYS_TIME"));
        assert!(!more.contains("CAP_NET_RAW") && !more.contains("CAP_MKNOD"));
        assert_eq!(more.len(), 14);
        // drop ALL, then add back one.
        let one = caps_of(&["NET_BIND_SERVICE"], &["ALL"]).unwrap();
        assert_eq!(
            one.into_iter().collect::<Vec<_>>(),
            ["CAP_NET_BIND_SERVICE"]
        );
        // add ALL, drop one.
        let all_but = caps_of(&["all"], &["CHOWN"]).unwrap();
        assert_eq!(all_but.len(), ALL_CAPABILITIES.len() - 1);
        assert!(!all_but.contains("CAP_CHOWN"));
        // Both ALL: none (drop wins, as in containerd).
        assert!(caps_of(&["ALL"], &["ALL"]).unwrap().is_empty());
        // Unknown: an error to add, nothing to drop.
        let err = caps_of(&["NET_WIZARD"], &[]).unwrap_err();
        assert!(
            err.starts_with(
                "linux.security_context.capabilities.add_capabilities: unknown capability"
            ),
            "{err}"
        );
        assert_eq!(caps_of(&[], &["NET_WIZARD"]).unwrap(), defaults);
    }

    #[test]
    fn capability_sets_in_the_spec() {
        let c = with_sc(|sc| {
            sc.capabilities = Some(Capability {
                add_capabilities: vec!["NET_ADMIN".into()],
                drop_capabilities: Vec::new(),
                add_ambient_capabilities: vec!["NET_ADMIN".into()],
            })
        });
        let spec = spec_for(&c, &image());
        let caps = &spec["process"]["capabilities"];
        let bounding: BTreeSet<String> = strings(&caps["bounding"]).into_iter().collect();
        assert_eq!(bounding.len(), 15);
        for set in ["effective", "permitted"] {
            let s: BTreeSet<String> = strings(&caps[set]).into_iter().collect();
            assert_eq!(s, bounding, "{set}");
        }
        assert_eq!(strings(&caps["ambient"]), ["CAP_NET_ADMIN"]);
        assert_eq!(strings(&caps["inheritable"]), ["CAP_NET_ADMIN"]);
        // Plain containers: no inheritable or ambient capabilities.
        let spec = spec_for(&config(), &image());
        assert!(strings(&spec["process"]["capabilities"]["inheritable"]).is_empty());
        assert!(strings(&spec["process"]["capabilities"]["ambient"]).is_empty());
        // Ambient needs the capability in the set.
        let c = with_sc(|sc| {
            sc.capabilities = Some(Capability {
                add_ambient_capabilities: vec!["SYS_ADMIN".into()],
                ..Default::default()
            })
        });
        let err = error_for(&c, &image());
        assert!(
            err.contains("add_ambient_capabilities: CAP_SYS_ADMIN is not among"),
            "{err}"
        );
    }

    #[test]
    fn privileged_gets_everything_and_no_confinement() {
        let c = with_sc(|sc| {
            sc.privileged = true;
            sc.capabilities = Some(Capability {
                drop_capabilities: vec!["ALL".into()],
                ..Default::default()
            });
            sc.seccomp = Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            });
            sc.masked_paths = vec!["/proc/kcore".into()];
        });
        let spec = spec_for(&c, &image());
        assert_eq!(
            strings(&spec["process"]["capabilities"]["bounding"]).len(),
            ALL_CAPABILITIES.len()
        );
        let linux = &spec["linux"];
        assert!(linux.get("seccomp").is_none());
        assert!(linux.get("maskedPaths").is_none());
        assert!(linux.get("readonlyPaths").is_none());
        assert!(linux.get("namespaces").is_none());
        let mount = |dest: &str| {
            spec["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["destination"] == dest)
                .cloned()
                .unwrap()
        };
        assert!(strings(&mount("/sys")["options"]).contains(&"rw".to_owned()));
        assert!(strings(&mount("/sys/fs/cgroup")["options"]).contains(&"rw".to_owned()));
    }

    #[test]
    fn confined_by_default() {
        let spec = spec_for(&config(), &image());
        let linux = &spec["linux"];
        assert_eq!(strings(&linux["maskedPaths"]), DEFAULT_MASKED_PATHS);
        assert_eq!(strings(&linux["readonlyPaths"]), DEFAULT_READONLY_PATHS);
        assert_eq!(linux["namespaces"], json!([{"type": "cgroup"}]));
        // No seccomp unless asked (containerd's default).
        assert!(linux.get("seccomp").is_none());
        assert_eq!(spec["process"]["noNewPrivileges"], false);
        assert_eq!(
            spec["process"]["rlimits"],
            json!([{"type": "RLIMIT_NOFILE", "soft": NOFILE_LIMIT, "hard": NOFILE_LIMIT}])
        );
        // CRI's lists win when given; no_new_privs is passed on.
        let c = with_sc(|sc| {
            sc.masked_paths = vec!["/proc/kcore".into()];
            sc.readonly_paths = vec!["/proc/sys/".into()];
            sc.no_new_privs = true;
        });
        let spec = spec_for(&c, &image());
        assert_eq!(strings(&spec["linux"]["maskedPaths"]), ["/proc/kcore"]);
        assert_eq!(strings(&spec["linux"]["readonlyPaths"]), ["/proc/sys"]);
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        let c = with_sc(|sc| sc.masked_paths = vec!["proc".into()]);
        assert!(error_for(&c, &image()).starts_with("linux.security_context.masked_paths:"));
    }

    #[test]
    #[allow(deprecated)] // seccomp_profile_path, still honoured
    fn seccomp_choices() {
        use cri::security_profile::ProfileType;
        let seccomp_of =
            |c: &cri::ContainerConfig| spec_for(c, &image())["linux"].get("seccomp").cloned();
        let typed = |t: ProfileType, r: &str| {
            with_sc(|sc| {
                sc.seccomp = Some(cri::SecurityProfile {
                    profile_type: t as i32,
                    localhost_ref: r.into(),
                })
            })
        };
        let default = seccomp_of(&typed(ProfileType::RuntimeDefault, "")).unwrap();
        assert_eq!(default["defaultAction"], "SCMP_ACT_ALLOW");
        assert!(seccomp_of(&typed(ProfileType::Unconfined, "")).is_none());
        // The deprecated strings, when `seccomp` is unset.
        let by_path = |p: &str| with_sc(|sc| sc.seccomp_profile_path = p.into());
        assert_eq!(seccomp_of(&by_path("runtime/default")).unwrap(), default);
        assert!(seccomp_of(&by_path("unconfined")).is_none());
        assert!(seccomp_of(&by_path("")).is_none());
        let err = error_for(&by_path("fancy"), &image());
        assert!(
            err.starts_with("linux.security_context.seccomp_profile_path:"),
            "{err}"
        );
        // `seccomp` wins over the deprecated string.
        let both = with_sc(|sc| {
            sc.seccomp = Some(cri::SecurityProfile {
                profile_type: ProfileType::Unconfined as i32,
                localhost_ref: String::new(),
            });
            sc.seccomp_profile_path = "runtime/default".into();
        });
        assert!(seccomp_of(&both).is_none());
        // Localhost needs an absolute path that exists.
        let err = error_for(&typed(ProfileType::Localhost, ""), &image());
        assert!(
            err.starts_with("linux.security_context.seccomp.localhost_ref:"),
            "{err}"
        );
        let err = error_for(
            &typed(ProfileType::Localhost, "/nonexistent/profile.json"),
            &image(),
        );
        assert!(
            err.starts_with("seccomp profile /nonexistent/profile.json: cannot read it"),
            "{err}"
        );
        assert!(error_for(&by_path("localhost/relative.json"), &image()).contains("not absolute"));
    }

    #[test]
    fn seccomp_localhost_profile_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.json");
        std::fs::write(
            &path,
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
                "archMap":[{"architecture":"SCMP_ARCH_X86_64","subArchitectures":["SCMP_ARCH_X86","SCMP_ARCH_X32"]},
                           {"architecture":"SCMP_ARCH_AARCH64","subArchitectures":["SCMP_ARCH_ARM"]}],
                "syscalls":[
                  {"names":["read","write","exit_group"],"action":"SCMP_ACT_ALLOW","comment":"basics"},
                  {"name":"personality","action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                  {"names":["mount"],"action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_SYS_ADMIN"]}},
                  {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38,"excludes":{"caps":["CAP_SYS_ADMIN"]}},
                  {"names":["ptrace"],"action":"SCMP_ACT_ALLOW","includes":{"minKernel":"4.8"}},
                  {"names":["arm_fadvise64_64"],"action":"SCMP_ACT_ALLOW","includes":{"arches":["arm","arm64"]}},
                  {"names":["future_call"],"action":"SCMP_ACT_ALLOW","includes":{"minKernel":"99.0"}}
                ]}"#,
        )
        .unwrap();
        let profile_for = |add: &[&str]| {
            let c = with_sc(|sc| {
                sc.seccomp = Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::Localhost as i32,
                    localhost_ref: path.to_str().unwrap().into(),
                });
                sc.capabilities = Some(Capability {
                    add_capabilities: add.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                });
            });
            spec_for(&c, &image())["linux"]["seccomp"].clone()
        };
        let p = profile_for(&[]);
        assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(p["defaultErrnoRet"], 1);
        assert_eq!(
            strings(&p["architectures"]),
            ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
        );
        let names: Vec<Vec<String>> = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| strings(&s["names"]))
            .collect();
        assert_eq!(
            names,
            [
                vec!["read", "write", "exit_group"],
                vec!["personality"],
                vec!["clone3"],
                vec!["ptrace"]
            ]
        );
        assert_eq!(p["syscalls"][1]["args"][0]["value"], 8);
        assert_eq!(p["syscalls"][2]["errnoRet"], 38);
        // With CAP_SYS_ADMIN: mount allowed, clone3's ENOSYS gone.
        let admin = profile_for(&["SYS_ADMIN"]);
        let names: Vec<String> = admin["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| strings(&s["names"]))
            .collect();
        assert!(names.contains(&"mount".to_owned()) && !names.contains(&"clone3".to_owned()));
    }

    #[test]
    #[allow(deprecated)] // seccomp_profile_path, still honoured
    fn seccomp_localhost_bad_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let check = |text: &str, want: &str| {
            let path = dir.path().join("p.json");
            std::fs::write(&path, text).unwrap();
            let c = with_sc(|sc| {
                sc.seccomp_profile_path = format!("localhost/{}", path.display());
            });
            let err = error_for(&c, &image());
            assert!(err.contains(want), "{text}: {err}");
        };
        check("{not json", "not a seccomp profile");
        check(r#"{"syscalls":[]}"#, "not a seccomp profile");
        check(r#"{"defaultAction":"SCMP_ACT_MAYBE"}"#, "SCMP_ACT_MAYBE");
        check(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["x"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":1,"op":"SCMP_CMP_SIMILAR"}]}]}"#,
            "SCMP_CMP_SIMILAR",
        );
        check(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"action":"SCMP_ACT_ERRNO"}]}"#,
            "names no syscall",
        );
        check(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["x"],"action":"SCMP_ACT_NOTIFY"}]}"#,
            "SCMP_ACT_NOTIFY) is not supported",
        );
        check(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/agent.sock"}"#,
            "listenerPath",
        );
    }

    fn mount_with(path: &str, source: &str, readonly: bool, propagation: i32) -> GuestMount {
        GuestMount {
            container_path: path.into(),
            guest_source: source.into(),
            readonly,
            propagation,
        }
    }

    fn destinations(spec: &Value) -> Vec<String> {
        spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap().to_owned())
            .collect()
    }

    fn find_mount<'v>(spec: &'v Value, dest: &str) -> &'v Value {
        spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == dest)
            .unwrap_or_else(|| panic!("no mount at {dest}"))
    }

    #[test]
    fn default_mounts_and_sandbox_files() {
        let c = config();
        let img = image();
        let mut inp = input(&c, &img);
        inp.sandbox_files = SandboxFiles {
            hostname: "/run/carapace/sandbox/hostname".into(),
            resolv_conf: "/run/carapace/sandbox/resolv.conf".into(),
            hosts: String::new(),
        };
        let (_, spec) = request(&inp);
        assert_eq!(
            destinations(&spec),
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup",
                "/etc/hostname",
                "/etc/resolv.conf"
            ]
        );
        let cg = find_mount(&spec, "/sys/fs/cgroup");
        assert_eq!(cg["type"], "cgroup2");
        assert!(strings(&cg["options"]).contains(&"ro".to_owned()));
        let hostname = find_mount(&spec, "/etc/hostname");
        assert_eq!(hostname["type"], "bind");
        assert_eq!(hostname["source"], "/run/carapace/sandbox/hostname");
        assert_eq!(strings(&hostname["options"]), ["rbind", "rprivate", "rw"]);

        // A read-only rootfs makes them read-only; a CRI mount of the same
        // path replaces them.
        let c = with_sc(|sc| sc.readonly_rootfs = true);
        let mut inp = input(&c, &img);
        inp.sandbox_files = SandboxFiles {
            hostname: "/s/hostname".into(),
            resolv_conf: "/s/resolv.conf".into(),
            hosts: "/s/hosts".into(),
        };
        inp.mounts = vec![mount_with("/etc/hosts", "/kubelet/etc-hosts", false, 0)];
        let (_, spec) = request(&inp);
        assert_eq!(
            strings(&find_mount(&spec, "/etc/hostname")["options"])[2],
            "ro"
        );
        assert_eq!(
            find_mount(&spec, "/etc/hosts")["source"],
            "/kubelet/etc-hosts"
        );
        assert_eq!(
            destinations(&spec)
                .iter()
                .filter(|d| *d == "/etc/hosts")
                .count(),
            1
        );
        assert_eq!(
            spec["root"],
            json!({"path": "/run/carapace/rootfs/c1", "readonly": true})
        );
    }

    #[test]
    fn cri_mounts_bind_with_their_flags_in_depth_order() {
        let c = config();
        let img = image();
        let mut inp = input(&c, &img);
        inp.mounts = vec![
            mount_with("/data/cache/", "/guest/v2", false, 1),
            mount_with("/data", "/guest/v1", true, 0),
            mount_with("/dev/termination-log", "/guest/t", false, 0),
        ];
        let (_, spec) = request(&inp);
        let dests = destinations(&spec);
        let tail: Vec<&str> = dests[7..].iter().map(String::as_str).collect();
        // Stable: equal depths keep the CRI order.
        assert_eq!(tail, ["/data", "/data/cache", "/dev/termination-log"]);
        assert_eq!(
            strings(&find_mount(&spec, "/data")["options"]),
            ["rbind", "rprivate", "ro"]
        );
        assert_eq!(
            strings(&find_mount(&spec, "/data/cache")["options"]),
            ["rbind", "rslave", "rw"]
        );
        assert_eq!(spec["linux"]["rootfsPropagation"], "rslave");

        inp.mounts = vec![
            mount_with("/a", "/g/a", false, 2),
            mount_with("/b", "/g/b", false, 1),
        ];
        let (_, spec) = request(&inp);
        assert_eq!(strings(&find_mount(&spec, "/a")["options"])[1], "rshared");
        assert_eq!(spec["linux"]["rootfsPropagation"], "rshared");

        // A supplied /dev replaces every default mount under it.
        inp.mounts = vec![mount_with("/dev", "/guest/dev", false, 0)];
        let (_, spec) = request(&inp);
        assert_eq!(
            destinations(&spec),
            ["/proc", "/sys", "/sys/fs/cgroup", "/dev"]
        );
    }

    #[test]
    fn bad_mounts_name_the_field() {
        let c = config();
        let img = image();
        for (m, want) in [
            (
                mount_with("data", "/g", false, 0),
                "mounts[0].container_path:",
            ),
            (
                mount_with("/a/../etc", "/g", false, 0),
                "mounts[0].container_path:",
            ),
            (mount_with("/", "/g", false, 0), "mounts[0].container_path:"),
            (mount_with("/a", "g", false, 0), "mounts[0] guest source:"),
            (mount_with("/a", "/g", false, 7), "mounts[0].propagation:"),
        ] {
            let mut inp = input(&c, &img);
            inp.mounts = vec![m];
            let err = agent_request(&inp).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err}");
        }
    }

    fn with_ns(pid: cri::NamespaceMode, ipc: cri::NamespaceMode) -> cri::ContainerConfig {
        with_sc(|sc| {
            sc.namespace_options = Some(NamespaceOption {
                pid: pid as i32,
                ipc: ipc as i32,
                ..Default::default()
            })
        })
    }

    #[test]
    fn namespace_modes_map_or_are_refused() {
        use cri::NamespaceMode as M;
        let img = image();
        let (req, _) = request(&input(&config(), &img));
        assert_eq!(
            (req.pid_mode, req.ipc_mode),
            (NamespaceMode::Pod as i32, NamespaceMode::Pod as i32)
        );
        let c = with_ns(M::Container, M::Pod);
        let (req, _) = request(&input(&c, &img));
        assert_eq!(req.pid_mode, NamespaceMode::Container as i32);
        assert_eq!(req.ipc_mode, NamespaceMode::Pod as i32);

        let err = error_for(&with_ns(M::Node, M::Pod), &img);
        assert!(
            err.starts_with(
                "linux.security_context.namespace_options.pid: NODE: the pod runs in its own VM"
            ),
            "{err}"
        );
        assert!(error_for(&with_ns(M::Pod, M::Node), &img).contains("namespace_options.ipc: NODE"));
        let err = error_for(&with_ns(M::Target, M::Pod), &img);
        assert!(
            err.contains("TARGET") && err.contains("not supported yet"),
            "{err}"
        );
        let err = match agent_request(&input(&with_ns(M::Target, M::Pod), &img)) {
            Err(e @ SpecError::Unsupported { .. }) => e.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(err.contains("pid"));
        let c = with_sc(|sc| {
            sc.namespace_options = Some(NamespaceOption {
                network: M::Node as i32,
                ..Default::default()
            })
        });
        assert!(error_for(&c, &img).contains("namespace_options.network: NODE"));
        let c = with_sc(|sc| {
            sc.namespace_options = Some(NamespaceOption {
                userns_options: Some(cri::UserNamespace {
                    mode: M::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })
        });
        assert!(error_for(&c, &img).contains("user namespaces"));
    }

    #[test]
    fn resources_and_oom_score() {
        let c = cri::ContainerConfig {
            linux: Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_quota: 50_000,
                    cpu_shares: 512,
                    memory_limit_in_bytes: 64 << 20,
                    oom_score_adj: 999,
                    cpuset_cpus: "0-1,3".into(),
                    cpuset_mems: "0".into(),
                    hugepage_limits: vec![cri::HugepageLimit {
                        page_size: "2MB".into(),
                        limit: 0,
                    }],
                    unified: [("memory.high".to_string(), "60000000".to_string())]
                        .into_iter()
                        .collect(),
                    memory_swap_limit_in_bytes: 0,
                }),
                security_context: None,
            }),
            ..config()
        };
        let spec = spec_for(&c, &image());
        assert_eq!(
            spec["linux"]["resources"],
            json!({
                "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1,3", "mems": "0"},
                "memory": {"limit": 67108864, "swap": 67108864},
                "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
                "unified": {"memory.high": "60000000"},
            })
        );
        assert_eq!(spec["process"]["oomScoreAdj"], 999);

        // Only what is set: the agent needs cgroups for any section.
        let only_oom = cri::ContainerConfig {
            linux: Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    oom_score_adj: -997,
                    ..Default::default()
                }),
                security_context: None,
            }),
            ..config()
        };
        let spec = spec_for(&only_oom, &image());
        assert!(spec["linux"].get("resources").is_none());
        assert_eq!(spec["process"]["oomScoreAdj"], -997);
        assert!(spec_for(&config(), &image())["process"]
            .get("oomScoreAdj")
            .is_none());

        let res = |r: LinuxContainerResources| resources(Some(&r)).map_err(|e| e.to_string());
        let (r, _) = res(LinuxContainerResources {
            memory_limit_in_bytes: 100,
            memory_swap_limit_in_bytes: -1,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.unwrap()["memory"], json!({"limit": 100, "swap": -1}));
        for (bad, field) in [
            (
                LinuxContainerResources {
                    oom_score_adj: 1001,
                    ..Default::default()
                },
                "oom_score_adj",
            ),
            (
                LinuxContainerResources {
                    memory_limit_in_bytes: 100,
                    memory_swap_limit_in_bytes: 50,
                    ..Default::default()
                },
                "memory_swap_limit_in_bytes",
            ),
            (
                LinuxContainerResources {
                    cpuset_cpus: "0-a".into(),
                    ..Default::default()
                },
                "cpuset_cpus",
            ),
            (
                LinuxContainerResources {
                    cpu_shares: -2,
                    ..Default::default()
                },
                "cpu_shares",
            ),
            (
                LinuxContainerResources {
                    hugepage_limits: vec![cri::HugepageLimit {
                        page_size: "2MB/../x".into(),
                        limit: 0,
                    }],
                    ..Default::default()
                },
                "hugepage_limits",
            ),
            (
                LinuxContainerResources {
                    unified: [("../x".to_string(), "1".to_string())]
                        .into_iter()
                        .collect(),
                    ..Default::default()
                },
                "unified",
            ),
        ] {
            let err = res(bad).unwrap_err();
            assert!(
                err.starts_with(&format!("linux.resources.{field}:")),
                "{err}"
            );
        }
    }

    #[test]
    fn ipc_sysctls_hostname_and_annotations() {
        let c = cri::ContainerConfig {
            annotations: [
                ("team".to_string(), "a".to_string()),
                (
                    "io.kubernetes.cri.container-name".to_string(),
                    "spoof".to_string(),
                ),
            ]
            .into_iter()
            .collect(),
            ..config()
        };
        let img = image();
        let mut inp = input(&c, &img);
        inp.pod_sysctls = [
            ("kernel.shm_rmid_forced", "1"),
            ("kernel/msgmax", "65536"),
            ("fs.mqueue.msg_max", "20"),
            ("net.ipv4.ip_local_port_range", "1024 65000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (req, spec) = request(&inp);
        assert_eq!(
            spec["linux"]["sysctl"],
            json!({"kernel.shm_rmid_forced": "1", "kernel.msgmax": "65536", "fs.mqueue.msg_max": "20"})
        );
        assert_eq!(spec["hostname"], "pod-a");
        assert_eq!(
            spec["annotations"],
            json!({
                "team": "a",
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.container-name": "app",
                "io.kubernetes.cri.image-name": "docker.io/library/busybox:1",
            })
        );
        assert_eq!(req.container_id, "c1");
        assert!(!req.stdin);
        assert_eq!(spec["process"]["terminal"], false);

        inp.pod_sysctls = [("kernel.shm$".to_string(), "1".to_string())]
            .into_iter()
            .collect();
        assert!(agent_request(&inp)
            .unwrap_err()
            .to_string()
            .contains("sysctl"));
    }

    #[test]
    fn tty_and_stdin() {
        let c = cri::ContainerConfig {
            tty: true,
            stdin: true,
            ..config()
        };
        let (req, spec) = request(&input(&c, &image()));
        assert!(req.stdin);
        assert_eq!(spec["process"]["terminal"], true);
    }

    #[test]
    fn basic_validation() {
        let c = config();
        let img = image();
        let mut inp = input(&c, &img);
        inp.container_id = "";
        assert!(agent_request(&inp)
            .unwrap_err()
            .to_string()
            .starts_with("container id:"));
        inp.container_id = "../x";
        assert!(agent_request(&inp)
            .unwrap_err()
            .to_string()
            .starts_with("container id:"));
        let mut inp = input(&c, &img);
        inp.pod_hostname = "bad name".into();
        assert!(agent_request(&inp)
            .unwrap_err()
            .to_string()
            .starts_with("sandbox config hostname:"));
        let mut inp = input(&c, &img);
        inp.root_path = String::new();
        assert!(agent_request(&inp)
            .unwrap_err()
            .to_string()
            .starts_with("root path:"));

        let nameless = cri::ContainerConfig {
            metadata: None,
            ..config()
        };
        assert_eq!(
            error_for(&nameless, &img),
            "metadata.name: must not be empty"
        );
        let devices = cri::ContainerConfig {
            devices: vec![cri::Device {
                container_path: "/dev/fuse".into(),
                host_path: "/dev/fuse".into(),
                permissions: "rwm".into(),
            }],
            ..config()
        };
        assert!(error_for(&devices, &img).starts_with("devices: host devices"));
    }
}
