//! The nested **test node**: a QEMU TCG VM with `-cpu max` (emulated AMD-V), Debian's cloud
//! kernel and `kvm-amd`, which offers a real `/dev/kvm` where `carapace-vmm` boots our guest
//! kernel and agent (this host's own PVM `/dev/kvm` cannot boot Linux; see MACHINE.md).
//!
//! A test builds a [`NodeImage`] (busybox, the kvm modules, our static `carapace-vmm` and
//! `node_probe`, the guest kernel and initramfs are always in it; the test adds files and its
//! shell script), runs it with [`NodeImage::run`], and reads the `@@<key> <value>` lines its
//! script printed from the returned [`NodeOutput`]. The node's `/init` loads the modules,
//! checks `/dev/kvm`, runs the script, and powers the node off.
//!
//! A node that does not come up, or does not finish in time, fails the test with its console
//! log; nothing here skips. Inputs:
//! - node kernel: `CARAPACE_NODE_KERNEL_DIR` (an unpacked `linux-image-*-cloud-amd64`
//!   package), else `~/.cache/carapace/node-kernel/<package>`, fetched there with
//!   `apt-get download` + `dpkg -x` on first use (never installed into the host);
//! - our binaries: built by this fixture with `cargo build --release` for the explicit
//!   target with `+crt-static` (incremental, so cheap when up to date);
//! - guest kernel and initramfs: [`crate::GuestArtifacts::locate`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{target_dir, GuestArtifacts};

/// How long a node may run (boot, test script, power-off) before the test fails.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(600);

/// The Debian metapackage whose dependency is the node kernel.
const NODE_KERNEL_META: &str = "linux-image-cloud-amd64";
/// The one target this toolchain has; our node binaries are linked static for it.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Marker lines printed by the node's `/init`.
const NODE_UP: &str = "@@node-up";
const NODE_DONE: &str = "@@node-done";

/// The node kernel, the three modules that give it `/dev/kvm` (in load order), and `tun.ko`
/// (the cloud kernel has `CONFIG_TUN=m`; the net tests need `/dev/net/tun`).
#[derive(Debug, Clone)]
pub struct NodeKernel {
    /// The compressed kernel (`vmlinuz-*-cloud-amd64`).
    pub vmlinuz: PathBuf,
    /// `irqbypass.ko`, `kvm.ko`, `kvm-amd.ko`, `tun.ko`.
    pub modules: Vec<PathBuf>,
    /// `lib/modules/<version>/kernel` of the package: other modules a test loads itself.
    pub module_dir: PathBuf,
}

impl NodeKernel {
    /// Finds the node kernel, fetching and unpacking the Debian package on first use.
    /// Panics with the reason (and what to run) if that is impossible.
    pub fn locate() -> NodeKernel {
        static KERNEL: OnceLock<NodeKernel> = OnceLock::new();
        KERNEL
            .get_or_init(|| {
                let dir = match std::env::var_os("CARAPACE_NODE_KERNEL_DIR") {
                    Some(d) => PathBuf::from(d),
                    None => fetch_node_kernel(),
                };
                Self::in_dir(&dir).unwrap_or_else(|e| {
                    panic!(
                        "node kernel in {}: {e} (unpack `{NODE_KERNEL_META}`'s kernel package there with `apt-get download` and `dpkg -x`)",
                        dir.display()
                    )
                })
            })
            .clone()
    }

    /// The kernel and modules of a package unpacked in `dir`.
    fn in_dir(dir: &Path) -> Result<NodeKernel, String> {
        let boot = dir.join("boot");
        let vmlinuz = std::fs::read_dir(&boot)
            .map_err(|e| format!("{}: {e}", boot.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .ok_or("no boot/vmlinuz-*")?;
        let version = vmlinuz
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .ok_or("odd kernel file name")?
            .to_owned();
        let kernel = dir.join("lib/modules").join(version).join("kernel");
        let mut modules = Vec::new();
        for rel in [
            "virt/lib/irqbypass.ko",
            "arch/x86/kvm/kvm.ko",
            "arch/x86/kvm/kvm-amd.ko",
            "drivers/net/tun.ko",
        ] {
            let path = kernel.join(rel);
            if !path.is_file() {
                return Err(format!("missing module {}", path.display()));
            }
            modules.push(path);
        }
        Ok(NodeKernel {
            vmlinuz,
            modules,
            module_dir: kernel,
        })
    }

    /// A module of the node kernel by its path under `kernel/` (e.g.
    /// `fs/overlayfs/overlay.ko`); panics if the package has none there.
    pub fn module(&self, rel: &str) -> PathBuf {
        let path = self.module_dir.join(rel);
        assert!(
            path.is_file(),
            "the node kernel has no module {}",
            path.display()
        );
        path
    }
}

fn run_ok(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Downloads the cloud kernel package and unpacks it under the user's cache directory.
fn fetch_node_kernel() -> PathBuf {
    let fetch = || -> Result<PathBuf, String> {
        let deps = run_ok(Command::new("apt-cache").args(["depends", NODE_KERNEL_META]))?;
        let package = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .ok_or_else(|| format!("{NODE_KERNEL_META} depends on no linux-image package"))?
            .trim()
            .to_owned();
        let home = std::env::var_os("HOME").ok_or("HOME is not set")?;
        let cache = PathBuf::from(home).join(".cache/carapace/node-kernel");
        let dir = cache.join(&package);
        if dir.join("boot").is_dir() {
            return Ok(dir);
        }
        let tmp = cache.join(format!("{package}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        run_ok(
            Command::new("apt-get")
                .args(["download", &package])
                .current_dir(&tmp),
        )?;
        let deb = std::fs::read_dir(&tmp)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or("apt-get download left no .deb")?;
        let unpacked = tmp.join("root");
        run_ok(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
        // Another test process may have won the race; either copy is complete.
        if std::fs::rename(&unpacked, &dir).is_err() && !dir.join("boot").is_dir() {
            return Err(format!("cannot move the kernel to {}", dir.display()));
        }
        let _ = std::fs::remove_dir_all(&tmp);
        Ok(dir)
    };
    fetch().unwrap_or_else(|e| panic!("cannot fetch the node kernel: {e}"))
}

/// Our static binaries that go into every node.
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    /// `carapace-vmm`.
    pub vmm: PathBuf,
    /// `node_probe` (e2e/examples/node_probe.rs).
    pub probe: PathBuf,
}

impl NodeBinaries {
    /// Builds them (once per test process; cargo makes it incremental across processes).
    pub fn build() -> NodeBinaries {
        static BINARIES: OnceLock<NodeBinaries> = OnceLock::new();
        BINARIES
            .get_or_init(|| {
                build_static(&["-p", "carapace-vmm", "--bin", "carapace-vmm"]);
                build_static(&["-p", "carapace-e2e", "--example", "node_probe"]);
                let out = target_dir().join(TARGET).join("release");
                let bins = NodeBinaries {
                    vmm: out.join("carapace-vmm"),
                    probe: out.join("examples/node_probe"),
                };
                for bin in [&bins.vmm, &bins.probe] {
                    assert_static(bin);
                }
                bins
            })
            .clone()
    }

    /// The daemon, `carapace`, built the same way; only for the tests that run pods in the
    /// node (it is the largest of our binaries, so not in every node).
    pub fn daemon() -> PathBuf {
        static DAEMON: OnceLock<PathBuf> = OnceLock::new();
        DAEMON
            .get_or_init(|| {
                build_static(&["-p", "carapace", "--bin", "carapace"]);
                let bin = target_dir().join(TARGET).join("release/carapace");
                assert_static(&bin);
                bin
            })
            .clone()
    }
}

/// `cargo build --release` for the explicit target with `+crt-static`.
fn build_static(what: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "--target", TARGET])
        .args(what)
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .env("CARGO_TARGET_DIR", target_dir())
        .status()
        .expect("running cargo build for the node binaries");
    assert!(status.success(), "building {what:?} for the node failed");
}

/// Panics unless `bin` is a statically linked ELF (no `PT_INTERP`).
pub fn assert_static(bin: &Path) {
    let bytes = std::fs::read(bin).unwrap_or_else(|e| panic!("reading {}: {e}", bin.display()));
    assert!(
        !has_interpreter(&bytes),
        "{} is dynamically linked; the node has no libc",
        bin.display()
    );
}

/// Whether an ELF64 file has a `PT_INTERP` program header (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return true;
    };
    (0..usize::from(phnum))
        .any(|i| u32_at(phoff as usize + i * usize::from(phentsize)).is_none_or(|t| t == PT_INTERP))
}

/// A file in the node's initramfs.
#[derive(Debug, Clone)]
enum Content {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// The node's initramfs, before packing.
#[derive(Debug, Clone)]
pub struct NodeImage {
    files: Vec<(String, u32, Content)>,
    script: String,
    smp: u8,
}

/// The node's `/init`: modules (kvm, tun), `/dev/kvm`, then the test's script, then power-off.
const NODE_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
insmod /lib/modules/1-irqbypass.ko && insmod /lib/modules/2-kvm.ko && insmod /lib/modules/3-kvm-amd.ko
insmod /lib/modules/4-tun.ko
if [ -c /dev/kvm ]; then
    echo "@@node-up $(cut -d' ' -f1 /proc/uptime)"
    cd /tmp
    sh /test.sh 2>&1
    echo "@@node-done $?"
else
    echo "@@node-error no /dev/kvm after loading the kvm modules"
fi
sync
reboot -f
"#;

impl NodeImage {
    /// A node with the standard contents and `script` (a busybox `sh` script, run in `/tmp`,
    /// stdout and stderr to the node console) as the test.
    ///
    /// In the node: `/bin/carapace-vmm`, `/bin/node_probe`, busybox applets,
    /// `/guest/vmlinux`, `/guest/initramfs.cpio`; `/run` and `/tmp` are tmpfs.
    pub fn new(script: &str) -> NodeImage {
        let kernel = NodeKernel::locate();
        let bins = NodeBinaries::build();
        let guest = GuestArtifacts::locate();
        let mut image = NodeImage {
            files: Vec::new(),
            script: script.to_owned(),
            smp: 2,
        };
        image = image
            .file("bin/busybox", Path::new("/bin/busybox"), 0o755)
            .file("bin/carapace-vmm", &bins.vmm, 0o755)
            .file("bin/node_probe", &bins.probe, 0o755)
            .file("guest/vmlinux", &guest.kernel, 0o644)
            .file("guest/initramfs.cpio", &guest.initrd, 0o644);
        for (i, m) in kernel.modules.iter().enumerate() {
            let name = m
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("module.ko");
            image = image.file(&format!("lib/modules/{}-{name}", i + 1), m, 0o644);
        }
        image
    }

    /// Adds the host file `src` as `dest` (a path relative to the node's root).
    pub fn file(mut self, dest: &str, src: &Path, mode: u32) -> NodeImage {
        self.files
            .push((dest.to_owned(), mode, Content::Path(src.to_owned())));
        self
    }

    /// Adds a file with these bytes as `dest`.
    pub fn bytes(mut self, dest: &str, data: &[u8], mode: u32) -> NodeImage {
        self.files
            .push((dest.to_owned(), mode, Content::Bytes(data.to_vec())));
        self
    }

    /// Adds a dynamically linked host program at its own path, with every shared library
    /// `ldd` resolves for it (and the dynamic loader) at theirs.
    pub fn host_program(mut self, program: &Path) -> NodeImage {
        let ldd = run_ok(Command::new("ldd").arg(program))
            .unwrap_or_else(|e| panic!("cannot list the libraries of {}: {e}", program.display()));
        let mut paths = vec![program.to_path_buf()];
        for line in ldd.lines() {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = line
                .split("=>")
                .last()
                .and_then(|rest| rest.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            if let Some(p) = path {
                paths.push(PathBuf::from(p));
            }
        }
        for p in paths {
            let dest = p.to_string_lossy().trim_start_matches('/').to_owned();
            if !self.files.iter().any(|(d, _, _)| *d == dest) {
                self = self.file(&dest, &p, 0o755);
            }
        }
        self
    }

    /// How many CPUs the node has (default 2).
    pub fn smp(mut self, cpus: u8) -> NodeImage {
        self.smp = cpus;
        self
    }

    /// Packs the initramfs (newc cpio) to `path`.
    fn pack(&self, path: &Path) -> std::io::Result<()> {
        let mut cpio = Cpio::default();
        for dir in ["bin", "dev", "proc", "sys", "tmp", "run", "lib", "guest"] {
            cpio.dir(dir);
        }
        cpio.char_dev("dev/console", 5, 1);
        cpio.file("init", 0o755, NODE_INIT.as_bytes());
        cpio.file("test.sh", 0o755, self.script.as_bytes());
        for (dest, mode, content) in &self.files {
            let mut parent = String::new();
            for part in dest
                .split('/')
                .collect::<Vec<_>>()
                .split_last()
                .map_or(&[][..], |(_, dirs)| dirs)
            {
                if !parent.is_empty() {
                    parent.push('/');
                }
                parent.push_str(part);
                cpio.dir(&parent);
            }
            match content {
                Content::Path(p) => {
                    let data = std::fs::read(p).map_err(|e| {
                        std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))
                    })?;
                    cpio.file(dest, *mode, &data);
                }
                Content::Bytes(b) => cpio.file(dest, *mode, b),
            }
        }
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        cpio.finish(&mut out)?;
        out.flush()
    }

    /// Boots the node, runs the script, and returns what the console showed. Panics with the
    /// console log if the node does not come up, does not finish within [`NODE_TIMEOUT`], or
    /// QEMU fails.
    pub fn run(&self) -> NodeOutput {
        let kernel = NodeKernel::locate();
        let dir = tempfile::Builder::new()
            .prefix("carapace-node-")
            .tempdir()
            .expect("creating the node's work directory");
        let initrd = dir.path().join("node.cpio");
        self.pack(&initrd).expect("packing the node initramfs");
        let console = dir.path().join("console.log");
        let cmdline = format!(
            "console=ttyS0 rdinit=/init quiet reboot=t panic=-1 tsc_early_khz={}",
            host_tsc_khz()
        );
        let started = Instant::now();
        let mut qemu = Command::new("qemu-system-x86_64")
            .args(["-M", "microvm,acpi=off", "-accel", "tcg", "-cpu", "max"])
            .args(["-m", "2048", "-smp", &self.smp.to_string(), "-no-reboot"])
            .args(["-display", "none", "-nodefaults", "-no-user-config"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&kernel.vmlinuz)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting qemu-system-x86_64 for the test node");
        let status = loop {
            if let Some(status) = qemu.try_wait().expect("waiting for the node's QEMU") {
                break Some(status);
            }
            if started.elapsed() > NODE_TIMEOUT {
                let _ = qemu.kill();
                let _ = qemu.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let elapsed = started.elapsed();
        let mut stderr = String::new();
        if let Some(mut e) = qemu.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let log =
            String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
        let output = NodeOutput {
            console: log,
            elapsed,
        };
        let fail = |why: String| -> ! {
            let kept = keep_node_log(&console);
            panic!(
                "test node: {why}\nconsole kept at {}\nqemu stderr: {stderr}\n--- node console ---\n{}",
                kept.display(),
                output.console
            )
        };
        match status {
            None => fail(format!("did not finish within {NODE_TIMEOUT:?}")),
            Some(s) if !s.success() => fail(format!("QEMU exited with {s}")),
            Some(_) => {}
        }
        if !output.console.contains(NODE_UP) {
            fail("did not come up (no /dev/kvm, or the node kernel failed)".into());
        }
        if !output.console.contains(NODE_DONE) {
            fail("the test script did not finish".into());
        }
        output
    }
}

/// The host's TSC frequency in kHz, for the node kernel's `tsc_early_khz=`. Under TCG the
/// node's TSC runs at the host's rate, and the node kernel's own calibration against the
/// emulated PIT fails on a loaded host; KVM then has no TSC frequency and `KVM_RUN` spins
/// without ever entering the guest.
fn host_tsc_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("cpu MHz")?
                    .split(':')
                    .nth(1)?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .filter(|khz| *khz > 0)
        .expect("cannot read the host's CPU frequency from /proc/cpuinfo")
}

fn keep_node_log(console: &Path) -> PathBuf {
    let dest = target_dir().join("e2e-logs").join(format!(
        "node-{}-{}",
        std::process::id(),
        crate::unix_nanos()
    ));
    let _ = std::fs::create_dir_all(&dest);
    let _ = std::fs::copy(console, dest.join("node-console.log"));
    dest
}

/// What a node run printed.
#[derive(Debug, Clone)]
pub struct NodeOutput {
    /// The node's whole console.
    pub console: String,
    /// QEMU start to exit, on the host.
    pub elapsed: Duration,
}

impl NodeOutput {
    /// Every `@@<key> <value>` line, in order.
    pub fn results(&self) -> Vec<(&str, &str)> {
        self.console
            .lines()
            .filter_map(|l| {
                let l = l.trim_end_matches('\r');
                let rest = &l[l.find("@@")? + 2..];
                Some(rest.split_once(' ').unwrap_or((rest, "")))
            })
            .collect()
    }

    /// The value of the first `@@<key>` line; panics with the console if there is none.
    pub fn get(&self, key: &str) -> &str {
        self.try_get(key).unwrap_or_else(|| {
            panic!(
                "the node printed no `@@{key}` line\n--- node console ---\n{}",
                self.console
            )
        })
    }

    /// The value of the first `@@<key>` line.
    pub fn try_get(&self, key: &str) -> Option<&str> {
        self.results()
            .into_iter()
            .find_map(|(k, v)| (k == key).then_some(v))
    }

    /// Asserts `cond` about this run, printing the console if it does not hold.
    pub fn check(&self, cond: bool, what: &str) {
        assert!(cond, "{what}\n--- node console ---\n{}", self.console);
    }

    /// The VMM's metrics printed as `@@<key> <json>` (its control API's answer): the
    /// entry of the first device of virtio type `device_type`; panics if there is none.
    pub fn vmm_device(&self, key: &str, device_type: u64) -> serde_json::Value {
        let metrics = self.get(key);
        let json: serde_json::Value = serde_json::from_str(metrics)
            .unwrap_or_else(|e| panic!("metrics are not JSON ({e}): {metrics}"));
        json["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["type"] == device_type))
            .cloned()
            .unwrap_or_else(|| panic!("no device of type {device_type} in the metrics: {metrics}"))
    }

    /// Asserts that a file of `bytes` bytes crossed intact: the `@@<sent>` and
    /// `@@<received>` lines are `<md5sum> <byte count>` of the file on either side.
    pub fn check_transfer(&self, sent: &str, received: &str, bytes: u64, what: &str) {
        let made = self.get(sent);
        self.check(
            made.ends_with(&format!(" {bytes}")),
            &format!("{what}: {bytes} bytes were made"),
        );
        self.check(
            self.get(received) == made,
            &format!("{what}: received intact"),
        );
    }
}

/// A guest initramfs holding busybox and `init` (a busybox `sh` script), for node tests whose
/// guest needs a shell rather than the agent. Put it in the node with [`NodeImage::bytes`].
pub fn busybox_guest_initramfs(init: &str) -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("reading /bin/busybox (busybox-static)");
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "tmp"] {
        cpio.dir(dir);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, init.as_bytes());
    let mut out = Vec::new();
    cpio.finish(&mut out).expect("writing to memory");
    out
}

/// A newc (`070701`) cpio writer: enough for an initramfs.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    ino: u32,
    dirs: std::collections::HashSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_owned()) {
            self.entry(name, 0o040755, (0, 0), &[]);
        }
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn finish(mut self, out: &mut impl Write) -> std::io::Result<()> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        out.write_all(&self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.dir("bin");
        c.file("bin/x", 0o755, b"abc");
        let mut out = Vec::new();
        c.finish(&mut out).unwrap();
        assert!(out.len().is_multiple_of(4));
        assert_eq!(out.windows(6).filter(|w| w == b"070701").count(), 3);
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn results_are_parsed_from_console_lines() {
        let out = NodeOutput {
            console: "noise\r\n@@health ok version=1\n[  1.0] x @@late 5\n@@flag\n".into(),
            elapsed: Duration::ZERO,
        };
        assert_eq!(out.get("health"), "ok version=1");
        assert_eq!(out.get("late"), "5");
        assert_eq!(out.try_get("flag"), Some(""));
        assert_eq!(out.try_get("missing"), None);
    }

    #[test]
    fn static_and_dynamic_binaries_are_told_apart() {
        // This test binary is dynamically linked (host build).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&me));
        assert!(has_interpreter(b"not an elf"));
    }
}
