//! The agent API shared by the Carapace runtime (client) and `carapace-agent`
//! (server): the protobuf messages and the tonic client and server for
//! `proto/agent.proto`, plus the constants both sides agree on.

/// Generated code for the `carapace.agent.v1` package.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("carapace.agent.v1");
}

pub mod port_forward;

/// The newest agent API revision this build speaks.
pub const API_VERSION: u32 = 4;

/// The oldest agent API revision this build still serves.
pub const MIN_API_VERSION: u32 = 1;

/// The vsock port the agent listens on inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The host vsock port the agent connects to once it serves its API, to
/// announce that it is ready (it writes `READY <agent version>\n`). The host
/// waits for this instead of polling the guest: connecting to a guest whose
/// vsock driver is still initialising is unreliable with some backends.
pub const READY_VSOCK_PORT: u32 = 1025;

/// The vsock port on which the agent carries port-forwarded connections,
/// one TCP connection per vsock connection (see [`port_forward`]). Served
/// from API revision [`PORT_FORWARD_API_VERSION`].
pub const PORT_FORWARD_VSOCK_PORT: u32 = 1026;

/// The first agent API revision serving [`PORT_FORWARD_VSOCK_PORT`].
pub const PORT_FORWARD_API_VERSION: u32 = 3;

/// The first agent API revision that knows `NAMESPACE_MODE_TARGET` (a
/// container joining another's pid namespace).
pub const PID_TARGET_API_VERSION: u32 = 4;

/// The first agent API revision that sets a process's `group` and honours
/// `strict_supplemental_groups` (older ones ignore both fields).
pub const GROUP_API_VERSION: u32 = 4;

/// Where the agent writes the pod's DNS and host files (SetupSandbox).
pub const SANDBOX_FILES_DIR: &str = "/run/carapace/sandbox";

/// Where the agent mounts the pod's `/dev/shm` (SetupSandbox): one tmpfs
/// that every container in the pod's IPC namespace bind-mounts on its own
/// `/dev/shm`, as containerd shares the sandbox's.
pub const POD_SHM_DIR: &str = "/run/carapace/shm";

/// Where the guest mounts the pod's shared directory (the virtio-fs share
/// holding the containers' root filesystems and volumes). The runtime asks
/// for it in SetupSandbox; relative `root.path`s are then relative to it.
pub const SHARED_FS_MOUNT_POINT: &str = "/run/carapace/shared";

/// Whether `name` is a hostname the agent accepts (SetupSandbox, specs): at
/// most 64 bytes of ASCII letters, digits, `-` and `.`.
pub fn is_valid_hostname(name: &str) -> bool {
    name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Whether `id` is a container or exec id the agent accepts (they name
/// cgroups and directories): `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}
