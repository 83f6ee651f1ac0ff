//! The daemon's configuration file (TOML). Every field has a default that
//! works on a machine set up by `scripts/setup.sh`, so an empty file (or no
//! file) is a valid configuration. Unknown fields are errors: a typo must
//! not silently fall back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::image::registry::RegistryConfig;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/carapace/config.toml";

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Which VM driver runs pod VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DriverChoice {
    /// Builtin VMM where the host has hardware KVM, QEMU otherwise.
    Auto,
    /// Our own VMM, `carapace-vmm` (needs hardware KVM).
    Builtin,
    /// `qemu-system-x86_64 -M microvm` (KVM if available, else TCG).
    Qemu,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The CRI socket kubelet connects to.
    pub socket: PathBuf,
    /// Persistent state: pod and container records.
    pub state_dir: PathBuf,
    /// Image content store and unpacked layers.
    pub image_dir: PathBuf,
    /// Containers' writable layers (overlay upper and work dirs).
    pub containers_dir: PathBuf,
    /// Per-VM runtime directories (sockets, console logs).
    pub run_dir: PathBuf,
    /// Where the host's cgroup v2 hierarchy is mounted: pod VMs go into
    /// kubelet's pod cgroup below it (see `host_cgroup`).
    pub cgroup_root: PathBuf,
    /// Log filter (`error`, `warn`, `info`, `debug`, or a tracing filter).
    pub log_level: String,
    pub vm: VmConfig,
    /// Insecure registries and mirrors (see docs/images.md).
    pub registry: RegistryConfig,
    /// The streaming server for exec, attach and port-forward.
    pub streaming: StreamingConfig,
    /// Pod networking through CNI (see docs/design.md, record 16).
    pub network: NetworkConfig,
}

/// The streaming server (see docs/streaming.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamingConfig {
    /// Address to listen on; port 0 picks a free port. Loopback by default:
    /// kubelet, on the same node, proxies the API server's requests to it.
    pub address: std::net::SocketAddr,
    /// A session with no traffic in either direction for this long is
    /// closed (kubelet's streaming-connection-idle-timeout), in seconds.
    pub idle_timeout_secs: u64,
    /// How long a URL returned by Exec, Attach or PortForward stays valid,
    /// in seconds.
    pub token_ttl_secs: u64,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        Self {
            address: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            idle_timeout_secs: 4 * 3600,
            token_ttl_secs: 60,
        }
    }
}

/// Pod networking.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Where the CNI network configurations are (first usable file in
    /// lexical order wins).
    pub cni_conf_dir: PathBuf,
    /// Where the CNI plugin binaries are, searched in order.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Where pod network namespaces are pinned (one file per pod).
    pub netns_dir: PathBuf,
    /// Whether a pod needs a network: with `true`, RunPodSandbox fails
    /// while no usable CNI configuration exists; with `false`, such pods
    /// get a VM without a network interface (tests, isolated batch pods).
    pub required: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            netns_dir: "/run/carapace/netns".into(),
            required: true,
        }
    }
}

/// See [`VmConfig::tcg_translation_cache_mib`]. A pod with one container
/// fills about 42 MiB uncapped; 36 MiB keeps each pod at 57 MiB of host
/// memory besides guest RAM for about 100 ms more per container start
/// (docs/performance.md).
pub const DEFAULT_TCG_TRANSLATION_CACHE_MIB: u32 = 36;

/// How pod VMs are built.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    pub driver: DriverChoice,
    /// Guest kernel (uncompressed vmlinux).
    pub kernel: PathBuf,
    /// Guest initramfs (the agent as /init).
    pub initrd: PathBuf,
    /// vCPUs of a pod that asks for no CPU limit.
    pub default_vcpus: u8,
    /// Guest RAM of a pod that asks for no memory limit, in MiB.
    pub default_mem_mib: u32,
    /// Guest RAM added to the pod's own limits for the guest kernel and
    /// agent, in MiB.
    pub overhead_mem_mib: u32,
    /// Upper bound for any pod VM's vCPUs.
    pub max_vcpus: u8,
    /// How long a VM may take from start to its agent answering, in seconds.
    pub boot_timeout_secs: u64,
    /// qemu driver under TCG only (no hardware KVM): the size of QEMU's
    /// translated-code cache per VM, in MiB (`-accel tcg,tb-size=`; default
    /// 36); 0 is QEMU's own default (1 GiB reserved, filled as the guest
    /// runs new code). A cap bounds this part of each pod's host memory; code that
    /// no longer fits makes QEMU flush the cache and translate again.
    pub tcg_translation_cache_mib: u32,
    /// How many VMs of the default size (no CPU or memory limits) are kept
    /// booted, their agents ready, for the next pods: such a pod gets one
    /// and only its network and guest set-up are left to do. Each costs an
    /// idle VM's memory on the node, charged to the daemon's cgroup until a
    /// pod takes it; 0 turns the pool off.
    pub warm_pool: u8,
    /// builtin driver only: each VMM runs in its jail (docs/vmm.md, "The
    /// jail": its own mount and pid namespaces, the VM's run directory as its
    /// root, no capabilities, and a uid and gid of its own, unused by any
    /// running process, from `jail_id_base` to `jail_id_base + 65535`).
    pub jail: bool,
    /// The first uid/gid of the jails' range (see `jail`).
    pub jail_id_base: u32,
    /// Each VM gets a virtio-balloon device for free page reporting only:
    /// memory the guest frees goes back to the host within seconds, so a
    /// pod's footprint falls again after a peak instead of staying there
    /// (docs/vmm.md, "Free page reporting"). The balloon never takes memory
    /// from the guest.
    pub free_page_reporting: bool,
}

/// How many uids/gids the jails may use, from `vm.jail_id_base`.
pub const JAIL_IDS: u32 = 65536;

/// Upper bound of `vm.warm_pool`: idle VMs cost memory and boot CPU.
const MAX_WARM_POOL: u8 = 16;

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: "/run/carapace/carapace.sock".into(),
            state_dir: "/var/lib/carapace/state".into(),
            image_dir: "/var/lib/carapace/images".into(),
            containers_dir: "/var/lib/carapace/containers".into(),
            run_dir: "/run/carapace/vms".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            log_level: "info".into(),
            vm: VmConfig::default(),
            registry: RegistryConfig::default(),
            streaming: StreamingConfig::default(),
            network: NetworkConfig::default(),
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            driver: DriverChoice::Auto,
            kernel: "/usr/local/share/carapace/vmlinux".into(),
            initrd: "/usr/local/share/carapace/initramfs.cpio".into(),
            default_vcpus: 1,
            default_mem_mib: 256,
            overhead_mem_mib: 64,
            max_vcpus: 8,
            boot_timeout_secs: 60,
            tcg_translation_cache_mib: DEFAULT_TCG_TRANSLATION_CACHE_MIB,
            warm_pool: 1,
            jail: true,
            jail_id_base: 2_000_000_000,
            free_page_reporting: true,
        }
    }
}

impl Config {
    /// Loads `path`; a missing file at the default path means defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && path == Path::new(DEFAULT_CONFIG_PATH) =>
            {
                String::new()
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Self::parse(&text).map_err(|e| match e {
            ParseOrInvalid::Parse(source) => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            ParseOrInvalid::Invalid(msg) => ConfigError::Invalid(msg),
        })
    }

    fn parse(text: &str) -> Result<Self, ParseOrInvalid> {
        let config: Config = toml::from_str(text).map_err(ParseOrInvalid::Parse)?;
        config.validate().map_err(ParseOrInvalid::Invalid)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        self.registry
            .validate()
            .map_err(|e| format!("registry: {e}"))?;
        let vm = &self.vm;
        if vm.default_vcpus == 0 || vm.default_vcpus > vm.max_vcpus {
            return Err(format!(
                "vm.default_vcpus must be between 1 and vm.max_vcpus ({})",
                vm.max_vcpus
            ));
        }
        if vm.default_mem_mib < 64 {
            return Err("vm.default_mem_mib must be at least 64".into());
        }
        if self.streaming.idle_timeout_secs == 0 || self.streaming.token_ttl_secs == 0 {
            return Err(
                "streaming.idle_timeout_secs and streaming.token_ttl_secs must be at least 1"
                    .into(),
            );
        }
        if vm.warm_pool > MAX_WARM_POOL {
            return Err(format!("vm.warm_pool must be at most {MAX_WARM_POOL}"));
        }
        if vm.jail_id_base == 0 || vm.jail_id_base.checked_add(JAIL_IDS).is_none() {
            return Err(format!(
                "vm.jail_id_base must be between 1 and {} (the jails use {JAIL_IDS} ids from it)",
                u32::MAX - JAIL_IDS
            ));
        }
        if vm.boot_timeout_secs == 0 {
            return Err("vm.boot_timeout_secs must be at least 1".into());
        }
        for (name, path) in [
            ("socket", &self.socket),
            ("state_dir", &self.state_dir),
            ("image_dir", &self.image_dir),
            ("run_dir", &self.run_dir),
            ("network.cni_conf_dir", &self.network.cni_conf_dir),
            ("network.netns_dir", &self.network.netns_dir),
        ] {
            if !path.is_absolute() {
                return Err(format!("{name} must be an absolute path"));
            }
        }
        Ok(())
    }
}

enum ParseOrInvalid {
    Parse(toml::de::Error),
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/config.md shows the whole file with every default; it must parse
    /// and be exactly the built-in defaults.
    #[test]
    fn documented_defaults_are_the_defaults() {
        let doc = include_str!("../../docs/config.md");
        let toml = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a toml block in docs/config.md");
        let documented = match Config::parse(toml) {
            Ok(c) => c,
            Err(ParseOrInvalid::Parse(e)) => panic!("docs/config.md: {e}"),
            Err(ParseOrInvalid::Invalid(e)) => panic!("docs/config.md: {e}"),
        };
        assert_eq!(
            format!("{documented:#?}"),
            format!("{:#?}", Config::default())
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").ok().unwrap();
        assert_eq!(c.socket, Path::new("/run/carapace/carapace.sock"));
        assert_eq!(c.vm.driver, DriverChoice::Auto);
        assert_eq!(c.network.cni_conf_dir, Path::new("/etc/cni/net.d"));
        assert!(c.network.required);
    }

    #[test]
    fn registry_mirrors_parse() {
        let c = Config::parse(
            "[registry]\ninsecure = [\"127.0.0.1:5000\"]\n\
             [registry.mirrors.\"registry.k8s.io\"]\nendpoints = [\"http://127.0.0.1:5000\"]\n",
        )
        .ok()
        .unwrap();
        assert_eq!(c.registry.insecure, vec!["127.0.0.1:5000".to_string()]);
        assert!(c.registry.mirrors.contains_key("registry.k8s.io"));
    }

    #[test]
    fn fields_override_defaults() {
        let c = Config::parse(
            "state_dir = \"/srv/state\"\n[vm]\ndriver = \"qemu\"\ndefault_mem_mib = 512\n",
        )
        .ok()
        .unwrap();
        assert_eq!(c.state_dir, Path::new("/srv/state"));
        assert_eq!(c.vm.driver, DriverChoice::Qemu);
        assert_eq!(c.vm.default_mem_mib, 512);
        assert_eq!(c.vm.default_vcpus, 1);
    }

    #[test]
    fn streaming_defaults_to_loopback_and_parses() {
        let c = Config::parse("").ok().unwrap();
        assert!(c.streaming.address.ip().is_loopback());
        assert_eq!(c.streaming.idle_timeout_secs, 4 * 3600);
        let c = Config::parse("[streaming]\naddress = \"0.0.0.0:10010\"\ntoken_ttl_secs = 5\n")
            .ok()
            .unwrap();
        assert_eq!(c.streaming.address.port(), 10010);
        assert_eq!(c.streaming.token_ttl_secs, 5);
        assert!(Config::parse("[streaming]\nidle_timeout_secs = 0").is_err());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_errors() {
        let err = |text: &str| match Config::parse(text) {
            Err(ParseOrInvalid::Parse(e)) => e.to_string(),
            Err(ParseOrInvalid::Invalid(e)) => e,
            Ok(_) => panic!("accepted {text:?}"),
        };
        assert!(err("sokcet = \"/x\"").contains("sokcet"));
        assert!(err("[vm]\ndriver = \"xen\"").contains("xen"));
        assert!(err("[vm]\ndefault_vcpus = 0").contains("default_vcpus"));
        assert!(err("state_dir = \"relative\"").contains("state_dir"));
        assert!(err("[registry]\ninsecure = [\"\"]").contains("registry"));
        assert!(err("[network]\nnetns_dir = \"rel\"").contains("netns_dir"));
        assert!(err("[network]\ncni_dir = \"/x\"").contains("cni_dir"));
        assert!(err("[vm]\njail_id_base = 0").contains("jail_id_base"));
        assert!(err("[vm]\njail_id_base = 4294967000").contains("jail_id_base"));
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Config::load(Path::new("/nonexistent/carapace.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
    }
}
