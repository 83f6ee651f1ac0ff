//! The VM configuration: a JSON document given to `carapace-vmm --config`.
//!
//! Parsed with serde (`deny_unknown_fields`, so a typo is an error rather than a silently
//! ignored setting) and validated once by [`VmConfig::validate`], before anything is created.
//! Every validation error names the offending field with its JSON path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vstate::memory::Backing;

/// Most vCPUs a VM may have (one thread each).
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest RAM we accept: below this nothing useful boots.
pub const MIN_MEM_MIB: u32 = 16;
/// Largest guest RAM we accept (guards against a typo eating the host).
pub const MAX_MEM_MIB: u32 = 256 * 1024;
/// Longest kernel command line we pass, terminating NUL excluded (x86 `COMMAND_LINE_SIZE` is
/// 2048 including the NUL); the VMM appends its own `virtio_mmio.device=` entries to it.
pub const MAX_CMDLINE_LEN: usize = 2047;
/// `sun_path` is 108 bytes including the NUL; the vsock listener names are `<uds_path>_<port>`,
/// so leave room for the longest suffix.
pub const MAX_UDS_PATH_LEN: usize = 107 - "_4294967295".len();

/// A command line that boots a Linux guest on this VMM's devices.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule";

/// Errors from reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The JSON is malformed, has an unknown field, or a field of the wrong type.
    #[error("invalid config: {0}")]
    Parse(#[from] serde_json::Error),
    /// A field has a value we do not accept.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// JSON path of the field, e.g. `vsock.guest_cid`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SerialOutput {
    /// Discard the console output.
    None,
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Append to this file (created if missing).
    File(PathBuf),
}

/// The hybrid-vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 ..= 0xffff_fffe).
    pub guest_cid: u32,
    /// Host unix socket: the host connects here and writes `CONNECT <port>\n`. Guest
    /// connections to port P go to a host listener at `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// A virtio-blk disk backed by a file (or a block device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// The disk image.
    pub path: PathBuf,
    /// Refuse guest writes (and open the image read-only).
    #[serde(default)]
    pub read_only: bool,
}

/// The jail: the VMM confines itself before the guest runs (own mount and pid namespaces,
/// `pivot_root` into `root`, unprivileged `uid`/`gid` without capabilities, no_new_privs).
/// Everything is opened before entering it, so kernel, initrd, drives and the console may
/// live anywhere; the sockets used at run time (`api_socket`, `vsock.uds_path` and the
/// `<uds_path>_<port>` listeners) must be inside `root`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// The VM's directory (absolute, existing); becomes `/` of the VMM. The VMM chowns it
    /// (not recursively) to `uid`:`gid` so that it can remove its sockets at exit.
    pub root: PathBuf,
    /// User the VMM runs as (not 0).
    pub uid: u32,
    /// Group the VMM runs as (not 0); supplementary groups are dropped.
    pub gid: u32,
}

/// Most disks a VM may have.
pub const MAX_DRIVES: usize = 16;

/// A virtio-net interface backed by a tap device (attached by name; `TUNSETIFF` creates it
/// if it does not exist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap interface's name (in the VMM's network namespace).
    pub tap: String,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx` (unicast).
    pub mac: String,
    /// The MTU offered to the guest (`VIRTIO_NET_F_MTU`, 68 to 65535); none: the guest's
    /// default (1500).
    #[serde(default)]
    pub mtu: Option<u16>,
}

impl NetConfig {
    /// The MAC as bytes (`None` if it does not parse).
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        parse_mac(&self.mac)
    }
}

/// Most network interfaces a VM may have.
pub const MAX_NETS: usize = 4;
/// Smallest MTU we offer a guest (IPv4's minimum). Any `u16` above it works: a frame of
/// MTU 65535 plus an Ethernet header with a VLAN tag is the device's largest frame.
pub const MIN_NET_MTU: u16 = 68;

/// JSON paths of the per-interface fields, so errors name `net[i].field`.
const NET_FIELDS: [[&str; 3]; MAX_NETS] = [
    ["net[0].tap", "net[0].mac", "net[0].mtu"],
    ["net[1].tap", "net[1].mac", "net[1].mtu"],
    ["net[2].tap", "net[2].mac", "net[2].mtu"],
    ["net[3].tap", "net[3].mac", "net[3].mtu"],
];

/// Parses `xx:xx:xx:xx:xx:xx` (hex, either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Whether `name` is a valid Linux interface name (1 to 15 bytes, no '/', ':', whitespace).
fn valid_ifname(name: &str) -> bool {
    crate::devices::virtio::net::tap::valid_ifname(name)
}

/// A virtio-fs device whose backend is a vhost-user daemon (virtiofsd) already listening.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The mount tag the guest uses (`mount -t virtiofs <tag> /mnt`), 1 to 36 bytes.
    pub tag: String,
    /// The backend's vhost-user socket (it must be listening when the VMM starts).
    pub socket: PathBuf,
    /// Request queues (besides the high-priority queue).
    #[serde(default = "default_fs_request_queues")]
    pub num_request_queues: u16,
    /// Size of each queue (a power of two).
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
}

fn default_fs_request_queues() -> u16 {
    1
}

fn default_fs_queue_size() -> u16 {
    FS_DEFAULT_QUEUE_SIZE
}

/// Most virtio-fs devices a VM may have.
pub const MAX_FS_DEVICES: usize = 4;
/// Longest virtio-fs tag (the size of `tag` in `struct virtio_fs_config`).
pub const MAX_FS_TAG_LEN: usize = 36;
/// Most request queues per virtio-fs device.
pub const MAX_FS_REQUEST_QUEUES: u16 = 8;
/// Default (and largest) virtio-fs queue size.
pub const FS_DEFAULT_QUEUE_SIZE: u16 = 1024;

/// The whole VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs (1 ..= 32).
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u32,
    /// Uncompressed `vmlinux` ELF.
    pub kernel: PathBuf,
    /// Optional initramfs.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends its device entries.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Serial console destination.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Optional virtio-vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-blk disks, in order (`/dev/vda`, `/dev/vdb`, ... in a Linux guest).
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// virtio-net interfaces backed by taps, in order (`eth0`, `eth1`, ... in the guest).
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// virtio-fs devices (vhost-user frontends to virtiofsd).
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// A virtio-balloon device that only takes the guest's free page reports, so that memory
    /// the guest frees goes back to the host (default off).
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Optional control API socket.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Install the per-thread seccomp filters (default on; off only to debug).
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// Optional jail: namespaces, pivot_root into `root`, unprivileged uid/gid.
    #[serde(default)]
    pub jail: Option<JailConfig>,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

fn default_true() -> bool {
    true
}

/// A configuration that passed [`VmConfig::validate`]; the builder only accepts this.
#[derive(Debug, Clone)]
pub struct ValidatedConfig(VmConfig);

impl ValidatedConfig {
    /// The configuration.
    pub fn get(&self) -> &VmConfig {
        &self.0
    }

    /// Turns off the seccomp filters (the `--no-seccomp` debugging switch).
    pub fn without_seccomp(mut self) -> Self {
        self.0.seccomp = false;
        self
    }

    /// The configuration as a jailed VMM uses it: the paths opened before entering the jail
    /// made absolute, the run-time socket paths made relative to `jail.root`. The jailed
    /// process builds the VM with its working directory at the root and keeps it there
    /// through `pivot_root`, so a relative path names the same file before and after.
    /// Without a jail the configuration is returned unchanged.
    pub fn with_jail_paths(&self) -> Result<Self, ConfigError> {
        let mut c = self.0.clone();
        let Some(jail) = c.jail.clone() else {
            return Ok(self.clone());
        };
        let abs = |field: &'static str, p: &Path| {
            std::path::absolute(p).map_err(|e| invalid(field, format!("{}: {e}", p.display())))
        };
        c.kernel = abs("kernel", &c.kernel)?;
        if let Some(initrd) = &c.initrd {
            c.initrd = Some(abs("initrd", initrd)?);
        }
        if let SerialOutput::File(path) = &c.serial {
            c.serial = SerialOutput::File(abs("serial.file", path)?);
        }
        for drive in &mut c.drives {
            drive.path = abs("drives.path", &drive.path)?;
        }
        if let Some(vsock) = &mut c.vsock {
            vsock.uds_path = path_in_jail("vsock.uds_path", &jail.root, &vsock.uds_path)?;
        }
        if let Some(api) = &c.api_socket {
            c.api_socket = Some(path_in_jail("api_socket", &jail.root, api)?);
        }
        Ok(Self(c))
    }
}

/// `path` relative to the jail root (which must contain it).
fn path_in_jail(field: &'static str, root: &Path, path: &Path) -> Result<PathBuf, ConfigError> {
    let outside = || {
        invalid(
            field,
            format!(
                "{} must be inside jail.root ({}) when the jail is on",
                path.display(),
                root.display()
            ),
        )
    };
    let name = path.file_name().ok_or_else(outside)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = parent
        .canonicalize()
        .map_err(|e| invalid(field, format!("{}: {e}", parent.display())))?;
    let root = root
        .canonicalize()
        .map_err(|e| invalid("jail.root", format!("{}: {e}", root.display())))?;
    let rel = parent.strip_prefix(&root).map_err(|_| outside())?;
    Ok(rel.join(name))
}

impl VmConfig {
    /// What backs guest RAM: shared (a memfd) only when a vhost-user backend (virtiofsd) must
    /// map it from outside this process; every other device lives in it.
    pub fn memory_backing(&self) -> Backing {
        if self.fs.is_empty() {
            Backing::Private
        } else {
            Backing::Shared
        }
    }

    /// Reads and parses a JSON file (does not validate).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses JSON text (does not validate).
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Checks every field; on success nothing else needs checking before the VM is built.
    pub fn validate(self) -> Result<ValidatedConfig, ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid("vcpus", format!("must be 1 to {MAX_VCPUS}")));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_size_mib) {
            return Err(invalid(
                "mem_size_mib",
                format!("must be {MIN_MEM_MIB} to {MAX_MEM_MIB}"),
            ));
        }
        check_regular_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_regular_file("initrd", initrd)?;
        }
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(invalid(
                "cmdline",
                format!("longer than {MAX_CMDLINE_LEN} bytes"),
            ));
        }
        if !self.cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(invalid("cmdline", "must be printable ASCII"));
        }
        if let SerialOutput::File(path) = &self.serial {
            check_parent_dir("serial.file", path)?;
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 || vsock.guest_cid == u32::MAX {
                return Err(invalid(
                    "vsock.guest_cid",
                    "must be 3 to 4294967294 (0-2 and -1 are reserved)",
                ));
            }
            check_socket_path("vsock.uds_path", &vsock.uds_path, MAX_UDS_PATH_LEN)?;
        }
        if self.drives.len() > MAX_DRIVES {
            return Err(invalid("drives", format!("at most {MAX_DRIVES} drives")));
        }
        for drive in &self.drives {
            match std::fs::metadata(&drive.path) {
                Ok(m)
                    if m.is_file()
                        || std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => {}
                Ok(_) => {
                    return Err(invalid(
                        "drives.path",
                        format!("{} is not a file or block device", drive.path.display()),
                    ))
                }
                Err(e) => {
                    return Err(invalid(
                        "drives.path",
                        format!("{}: {e}", drive.path.display()),
                    ))
                }
            }
        }
        check_nets(&self.net)?;
        check_fs(&self.fs)?;
        if let Some(api) = &self.api_socket {
            check_socket_path("api_socket", api, 107)?;
        }
        if let Some(jail) = &self.jail {
            if !jail.root.is_absolute() || !jail.root.is_dir() {
                return Err(invalid(
                    "jail.root",
                    format!(
                        "{} is not an absolute path to a directory",
                        jail.root.display()
                    ),
                ));
            }
            if jail.root.canonicalize().ok().as_deref() == Some(Path::new("/")) {
                return Err(invalid("jail.root", "must not be /"));
            }
            if jail.uid == 0 {
                return Err(invalid("jail.uid", "must not be 0 (root)"));
            }
            if jail.gid == 0 {
                return Err(invalid("jail.gid", "must not be 0 (root)"));
            }
            if let Some(vsock) = &self.vsock {
                path_in_jail("vsock.uds_path", &jail.root, &vsock.uds_path)?;
            }
            if let Some(api) = &self.api_socket {
                path_in_jail("api_socket", &jail.root, api)?;
            }
        }
        Ok(ValidatedConfig(self))
    }
}

fn check_nets(nets: &[NetConfig]) -> Result<(), ConfigError> {
    if nets.len() > MAX_NETS {
        return Err(invalid("net", format!("at most {MAX_NETS} interfaces")));
    }
    for (i, (net, [tap, mac, mtu])) in nets.iter().zip(NET_FIELDS).enumerate() {
        if !valid_ifname(&net.tap) {
            return Err(invalid(
                tap,
                "must be an interface name of 1 to 15 bytes without '/', ':' or whitespace",
            ));
        }
        if nets[..i].iter().any(|n| n.tap == net.tap) {
            return Err(invalid(tap, format!("{} is used twice", net.tap)));
        }
        match net.mac_bytes() {
            None => return Err(invalid(mac, "must be six hex bytes like 02:00:00:00:00:01")),
            Some(m) if m[0] & 1 != 0 || m == [0; 6] => {
                return Err(invalid(mac, "must be a unicast, non-zero address"))
            }
            Some(m) if nets[..i].iter().any(|n| n.mac_bytes() == Some(m)) => {
                return Err(invalid(mac, format!("{} is used twice", net.mac)))
            }
            Some(_) => {}
        }
        if net.mtu.is_some_and(|v| v < MIN_NET_MTU) {
            return Err(invalid(mtu, format!("must be {MIN_NET_MTU} to 65535")));
        }
    }
    Ok(())
}

fn check_fs(devices: &[FsConfig]) -> Result<(), ConfigError> {
    if devices.len() > MAX_FS_DEVICES {
        return Err(invalid(
            "fs",
            format!("at most {MAX_FS_DEVICES} virtio-fs devices"),
        ));
    }
    for (i, fs) in devices.iter().enumerate() {
        if fs.tag.is_empty() || fs.tag.len() > MAX_FS_TAG_LEN {
            return Err(invalid(
                "fs.tag",
                format!("must be 1 to {MAX_FS_TAG_LEN} bytes long"),
            ));
        }
        if fs.tag.contains('\0') {
            return Err(invalid("fs.tag", "must not contain NUL"));
        }
        if devices[..i].iter().any(|other| other.tag == fs.tag) {
            return Err(invalid("fs.tag", format!("{:?} is used twice", fs.tag)));
        }
        if !(1..=MAX_FS_REQUEST_QUEUES).contains(&fs.num_request_queues) {
            return Err(invalid(
                "fs.num_request_queues",
                format!("must be 1 to {MAX_FS_REQUEST_QUEUES}"),
            ));
        }
        if !fs.queue_size.is_power_of_two()
            || !(16..=FS_DEFAULT_QUEUE_SIZE).contains(&fs.queue_size)
        {
            return Err(invalid(
                "fs.queue_size",
                format!("must be a power of two from 16 to {FS_DEFAULT_QUEUE_SIZE}"),
            ));
        }
        let len = fs.socket.as_os_str().len();
        if len == 0 || len > 107 {
            return Err(invalid("fs.socket", "path must be 1 to 107 bytes long"));
        }
        match std::fs::metadata(&fs.socket) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {}
            Ok(_) => {
                return Err(invalid(
                    "fs.socket",
                    format!("{} is not a socket", fs.socket.display()),
                ))
            }
            Err(e) => {
                return Err(invalid(
                    "fs.socket",
                    format!("{}: {e}", fs.socket.display()),
                ))
            }
        }
    }
    Ok(())
}

fn check_regular_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(invalid(field, format!("{} is not a file", path.display()))),
        Err(e) => Err(invalid(field, format!("{}: {e}", path.display()))),
    }
}

fn check_parent_dir(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(invalid(
            field,
            format!("directory {} does not exist", parent.display()),
        ));
    }
    Ok(())
}

fn check_socket_path(field: &'static str, path: &Path, max: usize) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    if len == 0 || len > max {
        return Err(invalid(
            field,
            format!("path must be 1 to {max} bytes long"),
        ));
    }
    check_parent_dir(field, path)?;
    if path.symlink_metadata().is_ok() {
        return Err(invalid(field, format!("{} already exists", path.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_file() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().unwrap()
    }

    fn base(kernel: &Path) -> String {
        format!(
            r#"{{"vcpus": 1, "mem_size_mib": 128, "kernel": "{}"}}"#,
            kernel.display()
        )
    }

    fn field_of(err: ConfigError) -> &'static str {
        match err {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let k = kernel_file();
        let cfg = VmConfig::from_json(&base(k.path()))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(cfg.get().cmdline, DEFAULT_CMDLINE);
        assert_eq!(cfg.get().serial, SerialOutput::Stdout);
        assert!(cfg.get().vsock.is_none());
        assert!(cfg.get().seccomp, "seccomp is on by default");
        assert!(cfg.get().jail.is_none());
    }

    #[test]
    fn unknown_field_is_rejected_by_name() {
        let k = kernel_file();
        let json = base(k.path()).replace("\"vcpus\"", "\"vcpu_count\": 1, \"vcpus\"");
        let err = VmConfig::from_json(&json).unwrap_err().to_string();
        assert!(err.contains("unknown field `vcpu_count`"), "{err}");
    }

    #[test]
    fn each_invalid_field_is_named() {
        let k = kernel_file();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = VmConfig::from_json(&base(k.path())).unwrap();
        let ok = cfg.clone();

        cfg.vcpus = 0;
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "vcpus");
        cfg = ok.clone();
        cfg.mem_size_mib = 1;
        assert_eq!(
            field_of(cfg.clone().validate().unwrap_err()),
            "mem_size_mib"
        );
        cfg = ok.clone();
        cfg.kernel = dir.path().join("missing");
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "kernel");
        cfg = ok.clone();
        cfg.initrd = Some(dir.path().to_path_buf());
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "initrd");
        cfg = ok.clone();
        cfg.cmdline = "a\nb".into();
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "cmdline");
        cfg = ok.clone();
        cfg.cmdline = "x".repeat(MAX_CMDLINE_LEN + 1);
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "cmdline");
        cfg = ok.clone();
        cfg.serial = SerialOutput::File(dir.path().join("no/such/dir/log"));
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "serial.file");
        cfg = ok.clone();
        cfg.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: dir.path().join("v.sock"),
        });
        assert_eq!(
            field_of(cfg.clone().validate().unwrap_err()),
            "vsock.guest_cid"
        );
        cfg = ok.clone();
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: PathBuf::from("/").join("x".repeat(120)),
        });
        assert_eq!(
            field_of(cfg.clone().validate().unwrap_err()),
            "vsock.uds_path"
        );
        cfg = ok.clone();
        cfg.drives = vec![DriveConfig {
            path: dir.path().to_path_buf(),
            read_only: false,
        }];
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "drives.path");
        cfg.drives = vec![
            DriveConfig {
                path: k.path().to_path_buf(),
                read_only: true,
            };
            MAX_DRIVES + 1
        ];
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "drives");
        let net = |tap: &str, mac: &str, mtu: Option<u16>| NetConfig {
            tap: tap.into(),
            mac: mac.into(),
            mtu,
        };
        let good = net("tap0", "02:00:00:00:00:01", Some(1500));
        for (nets, field) in [
            (vec![net("", "02:00:00:00:00:01", None)], "net[0].tap"),
            (vec![net("a/b", "02:00:00:00:00:01", None)], "net[0].tap"),
            (
                vec![net(&"t".repeat(16), "02:00:00:00:00:01", None)],
                "net[0].tap",
            ),
            (vec![net("tap0", "02:00:00:00:00", None)], "net[0].mac"),
            (vec![net("tap0", "02:00:00:00:00:0g", None)], "net[0].mac"),
            (vec![net("tap0", "2:0:0:0:0:1", None)], "net[0].mac"),
            (
                vec![net("tap0", "02:00:00:00:00:01:02", None)],
                "net[0].mac",
            ),
            (vec![net("tap0", "03:00:00:00:00:01", None)], "net[0].mac"),
            (vec![net("tap0", "00:00:00:00:00:00", None)], "net[0].mac"),
            (
                vec![net("tap0", "02:00:00:00:00:01", Some(67))],
                "net[0].mtu",
            ),
            (
                vec![good.clone(), net("tap0", "02:00:00:00:00:02", None)],
                "net[1].tap",
            ),
            (
                vec![good.clone(), net("tap1", "02:00:00:00:00:01", None)],
                "net[1].mac",
            ),
            (vec![good.clone(); MAX_NETS + 1], "net"),
        ] {
            cfg = ok.clone();
            cfg.net = nets;
            assert_eq!(field_of(cfg.clone().validate().unwrap_err()), field);
        }
        cfg = ok.clone();
        cfg.net = vec![good, net("tap1", "02:AB:cd:00:00:02", Some(9001))];
        cfg.clone().validate().unwrap();
        cfg = ok.clone();
        cfg.api_socket = Some(k.path().to_path_buf());
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "api_socket");
    }

    #[test]
    fn fs_devices_are_checked_field_by_field() {
        let k = kernel_file();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("virtiofsd.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let json = format!(
            r#"{{"vcpus": 1, "mem_size_mib": 128, "kernel": "{}",
                "fs": [{{"tag": "shared", "socket": "{}"}}]}}"#,
            k.path().display(),
            sock.display()
        );
        let ok = VmConfig::from_json(&json).unwrap();
        let fs = &ok.fs[0];
        assert_eq!((fs.num_request_queues, fs.queue_size), (1, 1024));
        ok.clone().validate().unwrap();
        // virtiofsd maps guest RAM: it must be the shared memfd; without it, private.
        assert_eq!(ok.memory_backing(), Backing::Shared);
        let without = VmConfig {
            fs: Vec::new(),
            ..ok.clone()
        };
        assert_eq!(without.memory_backing(), Backing::Private);

        let with = |f: &dyn Fn(&mut FsConfig)| {
            let mut cfg = ok.clone();
            f(&mut cfg.fs[0]);
            field_of(cfg.validate().unwrap_err())
        };
        assert_eq!(with(&|fs| fs.tag = String::new()), "fs.tag");
        assert_eq!(with(&|fs| fs.tag = "t".repeat(37)), "fs.tag");
        assert_eq!(with(&|fs| fs.tag = "a\0b".into()), "fs.tag");
        assert_eq!(
            with(&|fs| fs.num_request_queues = 0),
            "fs.num_request_queues"
        );
        assert_eq!(
            with(&|fs| fs.num_request_queues = 9),
            "fs.num_request_queues"
        );
        assert_eq!(with(&|fs| fs.queue_size = 1000), "fs.queue_size");
        assert_eq!(with(&|fs| fs.queue_size = 2048), "fs.queue_size");
        assert_eq!(with(&|fs| fs.queue_size = 8), "fs.queue_size");
        assert_eq!(with(&|fs| fs.socket = dir.path().join("none")), "fs.socket");
        assert_eq!(with(&|fs| fs.socket = k.path().to_path_buf()), "fs.socket");
        // A 36-byte tag and the largest queue counts are fine.
        let mut cfg = ok.clone();
        cfg.fs[0].tag = "t".repeat(36);
        cfg.fs[0].num_request_queues = MAX_FS_REQUEST_QUEUES;
        cfg.clone().validate().unwrap();
        // Tags are unique; the device count is bounded.
        cfg.fs.push(cfg.fs[0].clone());
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "fs.tag");
        cfg.fs = (0..=MAX_FS_DEVICES)
            .map(|i| FsConfig {
                tag: format!("t{i}"),
                ..ok.fs[0].clone()
            })
            .collect();
        assert_eq!(field_of(cfg.validate().unwrap_err()), "fs");
        let err = VmConfig::from_json(&json.replace("\"tag\"", "\"mount_tag\": 1, \"tag\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `mount_tag`"), "{err}");
    }

    #[test]
    fn jail_fields_are_checked_and_sockets_must_be_inside_the_root() {
        let k = kernel_file();
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let mut cfg = VmConfig::from_json(&base(k.path())).unwrap();
        let jail = JailConfig {
            root: root.path().to_path_buf(),
            uid: 10000,
            gid: 10000,
        };
        cfg.jail = Some(jail.clone());
        cfg.api_socket = Some(root.path().join("api.sock"));
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: root.path().join("v.sock"),
        });
        let ok = cfg.clone();
        let valid = cfg.clone().validate().unwrap().with_jail_paths().unwrap();
        assert_eq!(
            valid.get().api_socket.as_deref(),
            Some(Path::new("api.sock"))
        );
        assert_eq!(
            valid.get().vsock.as_ref().unwrap().uds_path,
            PathBuf::from("v.sock")
        );
        assert_eq!(valid.get().kernel, k.path());

        cfg.jail.as_mut().unwrap().root = PathBuf::from("relative/dir");
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "jail.root");
        cfg.jail.as_mut().unwrap().root = PathBuf::from("/");
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "jail.root");
        cfg = ok.clone();
        cfg.jail.as_mut().unwrap().uid = 0;
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "jail.uid");
        cfg = ok.clone();
        cfg.jail.as_mut().unwrap().gid = 0;
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "jail.gid");
        cfg = ok.clone();
        cfg.api_socket = Some(elsewhere.path().join("api.sock"));
        assert_eq!(field_of(cfg.clone().validate().unwrap_err()), "api_socket");
        cfg = ok.clone();
        cfg.vsock.as_mut().unwrap().uds_path = elsewhere.path().join("v.sock");
        assert_eq!(
            field_of(cfg.clone().validate().unwrap_err()),
            "vsock.uds_path"
        );
        // Without a jail nothing changes.
        cfg = ok;
        cfg.jail = None;
        let plain = cfg.clone().validate().unwrap().with_jail_paths().unwrap();
        assert_eq!(plain.get(), &cfg);
    }

    #[test]
    fn full_config_round_trips() {
        let k = kernel_file();
        let dir = tempfile::tempdir().unwrap();
        let json = format!(
            r#"{{"vcpus": 2, "mem_size_mib": 256, "kernel": "{k}", "cmdline": "console=ttyS0",
                "serial": {{"file": "{d}/console.log"}},
                "vsock": {{"guest_cid": 3, "uds_path": "{d}/v.sock"}},
                "drives": [{{"path": "{k}", "read_only": true}}],
                "net": [{{"tap": "tap0", "mac": "02:00:00:00:00:01", "mtu": 1500}},
                        {{"tap": "tap1", "mac": "02:00:00:00:00:02"}}],
                "api_socket": "{d}/api.sock", "seccomp": false,
                "jail": {{"root": "{d}", "uid": 10000, "gid": 10001}}}}"#,
            k = k.path().display(),
            d = dir.path().display()
        );
        let cfg = VmConfig::from_json(&json).unwrap().validate().unwrap();
        let cfg = cfg.get();
        assert_eq!(
            cfg.serial,
            SerialOutput::File(dir.path().join("console.log"))
        );
        assert_eq!(cfg.vsock.as_ref().unwrap().guest_cid, 3);
        assert_eq!(cfg.net[0].mac_bytes(), Some([2, 0, 0, 0, 0, 1]));
        assert_eq!((cfg.net[0].mtu, cfg.net[1].mtu), (Some(1500), None));
        assert!(!cfg.seccomp);
        assert_eq!(cfg.jail.as_ref().unwrap().gid, 10001);
        let again: VmConfig = serde_json::from_str(&serde_json::to_string(cfg).unwrap()).unwrap();
        assert_eq!(&again, cfg);
    }
}
