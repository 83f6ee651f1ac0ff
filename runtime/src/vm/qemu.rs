//! The `qemu` driver: `qemu-system-x86_64 -M microvm`, with KVM where the host
//! has hardware virtualization and TCG otherwise, `vhost-device-vsock` as
//! the vsock backend, whose `--uds-path` socket is the hybrid-vsock host side,
//! and `virtiofsd` as the virtio-fs backend of the pod's shared directory.

use std::path::PathBuf;
use std::time::Instant;

use tokio::process::Command;

use super::backends::{
    self, ready_socket, wait_for_socket, Started, VIRTIOFSD_LOG, VIRTIOFS_SOCKET,
};
use super::handle::{StartedVm, VmHandle};
use super::{find_in_path, VmError, VmSpec, SHARED_FS_TAG};
use crate::agent_ready::ReadyListener;
use crate::host::KvmKind;

/// Kernel command-line words that shorten a boot under TCG: skip the
/// delay-loop calibration (`lpj`, close to what TCG calibrates anyway; only
/// udelay() uses it and our guest's drivers do not depend on exact delays),
/// and skip the check that the IO-APIC timer ticks within a few
/// milliseconds of real time (`no_timer_check`): on a loaded host an
/// emulated guest can miss it and panic ("IO-APIC + timer doesn't work"),
/// which was seen with ten pods booting at once on two cores.
/// `noapictimer`: the local APIC timer is not calibrated against the PIT
/// (100 ms of guest time, ~250 ms of wall time under TCG); the PIT, in
/// one-shot mode (tickless idle still works), is the tick device, with
/// broadcast to further vCPUs. Boot to agent ready went from a median of
/// 1272 to 986 ms over 8 interleaved pairs; idle CPU was the same.
/// Under KVM none of this costs anything noticeable, so they are not used there.
const TCG_CMDLINE: &str = "lpj=1000000 no_timer_check noapictimer";

/// File names in the VM's run directory.
const VHOST_VSOCK_SOCKET: &str = "vhost-vsock.sock";
const VSOCK_BACKEND_LOG: &str = "vsock-backend.log";

/// Which accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM when the host offers hardware KVM, TCG otherwise (PVM cannot boot
    /// Linux guests).
    pub fn for_host(kind: KvmKind) -> Self {
        match kind {
            KvmKind::Hardware => Accel::Kvm,
            KvmKind::Pvm | KvmKind::None => Accel::Tcg,
        }
    }
}

/// Starts VMs with QEMU.
#[derive(Debug, Clone)]
pub struct QemuDriver {
    qemu: PathBuf,
    vsock_backend: PathBuf,
    fs_backend: PathBuf,
    accel: Accel,
    /// `tb-size` under TCG, in MiB; 0: QEMU's default.
    tcg_cache_mib: u32,
    /// A virtio-balloon device with free page reporting.
    free_page_reporting: bool,
}

impl QemuDriver {
    /// Finds QEMU, the vsock backend and virtiofsd in `$PATH` and picks the
    /// accelerator from what the host offers.
    pub fn from_host() -> Result<Self, VmError> {
        Ok(Self {
            qemu: find_in_path("qemu-system-x86_64")
                .ok_or(VmError::MissingTool("qemu-system-x86_64"))?,
            vsock_backend: find_in_path("vhost-device-vsock")
                .ok_or(VmError::MissingTool("vhost-device-vsock"))?,
            fs_backend: find_in_path("virtiofsd").ok_or(VmError::MissingTool("virtiofsd"))?,
            accel: Accel::for_host(KvmKind::detect()),
            tcg_cache_mib: 0,
            free_page_reporting: false,
        })
    }

    /// Caps QEMU's translated-code cache under TCG (`-accel tcg,tb-size=`);
    /// 0 leaves QEMU's default. No effect under KVM.
    pub fn with_tcg_cache_mib(mut self, mib: u32) -> Self {
        self.tcg_cache_mib = mib;
        self
    }

    /// Gives each VM a virtio-balloon device that only reports free pages
    /// (`vm.free_page_reporting`).
    pub fn with_free_page_reporting(mut self, on: bool) -> Self {
        self.free_page_reporting = on;
        self
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The QEMU command line for `spec` (without the binary).
    pub fn qemu_args(&self, spec: &VmSpec) -> Vec<String> {
        let vhost_socket = spec.run_dir.join(VHOST_VSOCK_SOCKET);
        let mem = spec.mem_mib;
        let (accel, cpu) = match (self.accel, self.tcg_cache_mib) {
            (Accel::Kvm, _) => ("kvm".to_owned(), "host"),
            (Accel::Tcg, 0) => ("tcg".to_owned(), "max"),
            (Accel::Tcg, mib) => (format!("tcg,tb-size={mib}"), "max"),
        };
        let mut args: Vec<String> = [
            "-M",
            // acpi=off: our kernel has no ACPI, and only then does QEMU put
            // the virtio-mmio devices on the kernel command line.
            "microvm,memory-backend=mem,acpi=off,x-option-roms=off,rtc=off",
            "-accel",
            &accel,
            "-cpu",
            cpu,
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        args.extend([
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{mem}M"),
            // vhost-user backends need the guest RAM in a shareable memfd.
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-chardev".into(),
            format!("file,id=console,path={}", spec.console_log().display()),
            "-serial".into(),
            "chardev:console".into(),
            "-chardev".into(),
            format!("socket,id=vsock,path={}", vhost_socket.display()),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock".into(),
        ]);
        if spec.shared_dir.is_some() {
            // The backend is virtiofsd (see `virtiofsd_args`); the tag is
            // QEMU's to announce (virtiofsd's own `--tag` crashes QEMU 7.2).
            args.extend([
                "-chardev".into(),
                format!(
                    "socket,id=fs,path={}",
                    spec.run_dir.join(VIRTIOFS_SOCKET).display()
                ),
                "-device".into(),
                format!("vhost-user-fs-device,chardev=fs,tag={SHARED_FS_TAG}"),
            ]);
        }
        if let Some(net) = &spec.network {
            // The tap is opened by name inside the pod namespace, where
            // QEMU runs; no helper scripts.
            args.extend([
                "-netdev".into(),
                format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap),
                "-device".into(),
                format!("virtio-net-device,netdev=net0,mac={}", net.mac),
            ]);
        }
        if self.free_page_reporting {
            // The balloon's target stays 0: it only takes the guest's reports
            // of free pages, whose memory QEMU then gives back to the host.
            args.extend([
                "-device".into(),
                "virtio-balloon-device,free-page-reporting=on".into(),
            ]);
        }
        args.extend([
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-initrd".into(),
            spec.initrd.display().to_string(),
            "-append".into(),
            match self.accel {
                Accel::Kvm => spec.cmdline(),
                Accel::Tcg => format!("{} {TCG_CMDLINE}", spec.cmdline()),
            },
        ]);
        args
    }

    /// Starts the vsock backend and, when the VM has a shared directory,
    /// virtiofsd, then QEMU. Returns once QEMU runs; the agent is ready when
    /// it answers (see `AgentClient::wait_ready`). The processes run
    /// detached from the daemon (see [`VmProcess`]); if the start fails,
    /// those already started are killed.
    pub async fn start(&self, spec: &VmSpec) -> Result<StartedVm, VmError> {
        validate(spec)?;
        let vhost_socket = spec.run_dir.join(VHOST_VSOCK_SOCKET);
        let fs_socket = spec.run_dir.join(VIRTIOFS_SOCKET);
        let vsock_socket = spec.vsock_socket();
        for stale in [&vhost_socket, &fs_socket, &vsock_socket] {
            let _ = std::fs::remove_file(stale);
        }
        let mut started = Started::default();

        let mut backend_cmd = Command::new(&self.vsock_backend);
        backend_cmd.arg("--vm").arg(format!(
            "guest-cid=3,socket={},uds-path={}",
            vhost_socket.display(),
            vsock_socket.display()
        ));
        let backend = started.spawn(
            "vhost-device-vsock",
            backend_cmd,
            &spec.run_dir.join(VSOCK_BACKEND_LOG),
        )?;
        let fs = match &spec.shared_dir {
            Some(dir) => Some(started.virtiofsd(&self.fs_backend, spec, dir, &fs_socket)?),
            None => None,
        };
        // Both backends start in parallel; QEMU needs both sockets.
        let vsock_log = spec.run_dir.join(VSOCK_BACKEND_LOG);
        wait_for_socket("vsock backend", &backend, &vhost_socket, &vsock_log).await?;
        if let Some(fs) = &fs {
            let fs_log = spec.run_dir.join(VIRTIOFSD_LOG);
            wait_for_socket("virtiofsd", fs, &fs_socket, &fs_log).await?;
        }

        // Bound before the guest runs, so its announcement cannot be missed.
        let ready = ReadyListener::bind(&vsock_socket).map_err(VmError::Ready)?;

        let started_at = Instant::now();
        let mut qemu_cmd = Command::new(&self.qemu);
        qemu_cmd.args(self.qemu_args(spec));
        if let Some(net) = &spec.network {
            backends::in_netns(&mut qemu_cmd, "qemu-system-x86_64", &net.netns)?;
        }
        let qemu = started.spawn("qemu", qemu_cmd, &spec.run_dir.join("qemu.log"))?;
        started.disarm();
        Ok(StartedVm {
            handle: VmHandle {
                monitor: qemu,
                backend: Some(backend),
                fs_socket: fs.as_ref().map(|_| fs_socket),
                fs,
                vsock_socket,
                vhost_socket: Some(vhost_socket),
                api_socket: None,
                console_log: spec.console_log(),
            },
            ready,
            started_at,
        })
    }
}

/// The unix sockets the VM's processes bind in its run directory.
fn socket_paths(spec: &VmSpec) -> [PathBuf; 4] {
    [
        spec.run_dir.join(VHOST_VSOCK_SOCKET),
        spec.run_dir.join(VIRTIOFS_SOCKET),
        spec.vsock_socket(),
        ready_socket(spec),
    ]
}

fn validate(spec: &VmSpec) -> Result<(), VmError> {
    // QEMU's option syntax would split the socket paths at a comma.
    if spec.run_dir.as_os_str().as_encoded_bytes().contains(&b',') {
        return Err(VmError::InvalidSpec(format!(
            "run_dir {} contains a comma",
            spec.run_dir.display()
        )));
    }
    backends::validate(spec, &socket_paths(spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::backends::MAX_SOCKET_PATH;
    use std::path::Path;

    fn spec(dir: &Path) -> VmSpec {
        VmSpec {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initrd"),
            vcpus: 1,
            mem_mib: 128,
            extra_cmdline: String::new(),
            run_dir: dir.to_owned(),
            shared_dir: None,
            network: None,
        }
    }

    fn driver() -> QemuDriver {
        QemuDriver {
            qemu: "qemu".into(),
            vsock_backend: "vdv".into(),
            fs_backend: "virtiofsd".into(),
            accel: Accel::Tcg,
            tcg_cache_mib: 0,
            free_page_reporting: false,
        }
    }

    #[test]
    fn tcg_translation_cache_is_capped_when_configured() {
        let dir = Path::new("/run/vm1");
        let args = driver()
            .with_tcg_cache_mib(48)
            .qemu_args(&spec(dir))
            .join(" ");
        assert!(args.contains("-accel tcg,tb-size=48 -cpu max"), "{args}");
        let mut kvm = driver().with_tcg_cache_mib(48);
        kvm.accel = Accel::Kvm;
        let args = kvm.qemu_args(&spec(dir)).join(" ");
        assert!(args.contains("-accel kvm -cpu host"), "{args}");
    }

    #[test]
    fn free_page_reporting_adds_a_balloon() {
        let dir = Path::new("/run/vm1");
        let balloon = "-device virtio-balloon-device,free-page-reporting=on";
        let args = driver().qemu_args(&spec(dir)).join(" ");
        assert!(!args.contains("balloon"), "{args}");
        let args = driver()
            .with_free_page_reporting(true)
            .qemu_args(&spec(dir))
            .join(" ");
        assert!(args.contains(balloon), "{args}");
    }

    #[test]
    fn command_line_shares_memory_and_wires_vsock() {
        let dir = Path::new("/run/vm1");
        let args = driver().qemu_args(&spec(dir)).join(" ");
        assert!(args.contains("-accel tcg -cpu max"), "{args}");
        assert!(args.contains("memory-backend-memfd,id=mem,size=128M,share=on"));
        assert!(args.contains("socket,id=vsock,path=/run/vm1/vhost-vsock.sock"));
        assert!(args.contains("vhost-user-vsock-device,chardev=vsock"));
        assert!(args.contains("acpi=off"));
        assert!(
            !args.contains("vhost-user-fs"),
            "no share, no fs device: {args}"
        );
        assert!(args.ends_with(&format!(
            "-append {} {TCG_CMDLINE}",
            super::super::BASE_CMDLINE
        )));
    }

    #[test]
    fn command_line_wires_the_shared_directory() {
        let dir = Path::new("/run/vm1");
        let spec = VmSpec {
            shared_dir: Some("/run/pods/p1/shared".into()),
            ..spec(dir)
        };
        let args = driver().qemu_args(&spec);
        let fs = args
            .windows(4)
            .find(|w| w[0] == "-chardev" && w[1].starts_with("socket,id=fs,"))
            .expect("a chardev for virtiofsd");
        assert_eq!(fs[1], "socket,id=fs,path=/run/vm1/virtiofs.sock");
        assert_eq!(
            (fs[2].as_str(), fs[3].as_str()),
            ("-device", "vhost-user-fs-device,chardev=fs,tag=carapace")
        );
        // Before the kernel, like every device; the share's path is
        // virtiofsd's business, not QEMU's.
        let joined = args.join(" ");
        assert!(joined.find("vhost-user-fs-device") < joined.find("-kernel"));
        assert!(!joined.contains("/run/pods/p1/shared"), "{joined}");
    }

    #[test]
    fn command_line_wires_the_pod_network() {
        let spec = VmSpec {
            network: Some(crate::network::tap::VmNetwork {
                netns: "/run/carapace/netns/p1".into(),
                tap: "tap0".into(),
                mac: "0a:58:0a:00:00:05".into(),
                mtu: 1450,
            }),
            ..spec(Path::new("/run/vm1"))
        };
        let args = driver().qemu_args(&spec).join(" ");
        assert!(
            args.contains("-netdev tap,id=net0,ifname=tap0,script=no,downscript=no -device virtio-net-device,netdev=net0,mac=0a:58:0a:00:00:05"),
            "{args}"
        );
        assert!(!driver()
            .qemu_args(&spec_without_net())
            .join(" ")
            .contains("netdev"));
    }

    fn spec_without_net() -> VmSpec {
        spec(Path::new("/run/vm1"))
    }

    #[test]
    fn kvm_accel_on_hardware_only() {
        assert_eq!(Accel::for_host(KvmKind::Hardware), Accel::Kvm);
        assert_eq!(Accel::for_host(KvmKind::Pvm), Accel::Tcg);
        assert_eq!(Accel::for_host(KvmKind::None), Accel::Tcg);
    }

    #[test]
    fn rejects_invalid_specs() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        std::fs::write(&s.kernel, b"k").unwrap();
        std::fs::write(&s.initrd, b"i").unwrap();
        assert!(validate(&s).is_ok());
        // The hybrid-vsock port listener and virtiofsd's socket count too.
        let in_root = VmSpec {
            run_dir: "/".into(),
            ..s.clone()
        };
        let name_len = socket_paths(&in_root)
            .iter()
            .map(|p| p.as_os_str().len() - 1)
            .max()
            .unwrap();
        assert!(name_len >= VIRTIOFS_SOCKET.len());
        let at_limit = |extra: usize| VmSpec {
            run_dir: PathBuf::from(format!(
                "/{}",
                "r".repeat(MAX_SOCKET_PATH - name_len - 2 + extra)
            )),
            ..s.clone()
        };
        assert!(
            !matches!(validate(&at_limit(0)), Err(VmError::InvalidSpec(m)) if m.contains("too long"))
        );
        assert!(
            matches!(validate(&at_limit(1)), Err(VmError::InvalidSpec(m)) if m.contains("too long"))
        );
        let comma = VmSpec {
            run_dir: dir.path().join("a,b"),
            ..s.clone()
        };
        assert!(matches!(validate(&comma), Err(VmError::InvalidSpec(m)) if m.contains("comma")));
        let no_kernel = VmSpec {
            kernel: dir.path().join("absent"),
            ..s.clone()
        };
        assert!(
            matches!(validate(&no_kernel), Err(VmError::InvalidSpec(m)) if m.contains("kernel"))
        );
    }
}
