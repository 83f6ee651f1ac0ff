//! The `carapace` daemon as kubelet sees it: a process serving CRI on a unix
//! socket, with its own state and run directories, driven by a CRI client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::GuestArtifacts;

/// A running daemon with private directories (removed on drop, after its
/// pod VMs are killed).
pub struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    config: PathBuf,
}

impl Daemon {
    /// Writes a config for private directories and starts the daemon.
    pub async fn start() -> Daemon {
        Self::start_with(false, "").await
    }

    /// As [`Daemon::start`], with the busybox demo image
    /// (`docker.io/library/busybox:latest`) in its image store.
    pub async fn start_with_busybox() -> Daemon {
        Self::start_with(true, "").await
    }

    /// As [`Daemon::start`], with `extra` (TOML tables, e.g. `[registry]`)
    /// appended to the config.
    pub async fn start_with_config(extra: &str) -> Daemon {
        Self::start_with(false, extra).await
    }

    async fn start_with(busybox: bool, extra: &str) -> Daemon {
        Self::start_full(busybox, None, extra).await
    }

    /// As [`Daemon::start`], with pod networking from the CNI configuration
    /// directory `cni_conf_dir`, required (`network.required = true`: pods
    /// fail to start without a usable configuration). Without it (the other
    /// constructors) the daemon has an empty CNI directory and pods run
    /// without a network (`required = false`).
    pub async fn start_with_network(busybox: bool, cni_conf_dir: Option<&Path>) -> Daemon {
        Self::start_full(busybox, cni_conf_dir, "").await
    }

    /// As [`Daemon::start_with_busybox`], with `vm_lines` (TOML key = value
    /// lines) added to the config's `[vm]` table.
    pub async fn start_with_busybox_vm(vm_lines: &str) -> Daemon {
        Self::start_full_vm(true, None, "", vm_lines).await
    }

    /// As [`Daemon::start_with_network`], with `vm_lines` added to the
    /// config's `[vm]` table.
    pub async fn start_with_network_vm(
        busybox: bool,
        cni_conf_dir: Option<&Path>,
        vm_lines: &str,
    ) -> Daemon {
        Self::start_full_vm(busybox, cni_conf_dir, "", vm_lines).await
    }

    async fn start_full(busybox: bool, cni_conf_dir: Option<&Path>, extra: &str) -> Daemon {
        Self::start_full_vm(busybox, cni_conf_dir, extra, "").await
    }

    async fn start_full_vm(
        busybox: bool,
        cni_conf_dir: Option<&Path>,
        extra: &str,
        vm_lines: &str,
    ) -> Daemon {
        let artifacts = GuestArtifacts::locate();
        // Tests count a daemon's VMs: no warm VM unless a test asks.
        let vm_lines = if vm_lines.contains("warm_pool") {
            vm_lines.to_owned()
        } else {
            format!("warm_pool = 0\n{vm_lines}")
        };
        let dir = tempfile::Builder::new()
            .prefix("carapace-daemon-")
            .tempdir()
            .expect("daemon directory");
        let socket = dir.path().join("carapace.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "socket = {:?}\nstate_dir = {:?}\nimage_dir = {:?}\ncontainers_dir = {:?}\nrun_dir = {:?}\ncgroup_root = {:?}\nlog_level = \"info,carapace=debug\"\n\
                 [vm]\ndriver = \"qemu\"\nkernel = {:?}\ninitrd = {:?}\nboot_timeout_secs = 120\n{vm_lines}\n\
                 [network]\ncni_conf_dir = {:?}\nnetns_dir = {:?}\nrequired = {}\n{extra}\n",
                socket,
                dir.path().join("state"),
                dir.path().join("images"),
                dir.path().join("containers"),
                dir.path().join("run"),
                cgroup_root(),
                artifacts.kernel,
                artifacts.initrd,
                cni_conf_dir
                    .map(Path::to_owned)
                    .unwrap_or_else(|| dir.path().join("cni")),
                dir.path().join("netns"),
                cni_conf_dir.is_some(),
            ),
        )
        .expect("writing the daemon config");
        if busybox {
            import_busybox(&dir.path().join("images")).await;
        }
        let mut daemon = Daemon {
            child: None,
            dir,
            socket,
            config,
        };
        daemon.spawn().await;
        daemon
    }

    async fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon log");
        let child = Command::new(daemon_binary())
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting carapace serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).await.is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("carapace serve exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon socket never appeared:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Where the daemon keeps per-VM run directories.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Where the daemon keeps its records.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Where the daemon keeps containers' writable layers.
    pub fn containers_dir(&self) -> PathBuf {
        self.dir.path().join("containers")
    }

    /// The daemon's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A CRI ImageService client on the daemon's socket.
    pub async fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(connect(&self.socket).await)
    }

    /// A CRI RuntimeService client on the daemon's socket.
    pub async fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(connect(&self.socket).await)
    }

    /// Appends `toml` to the daemon's config file; it takes effect at the
    /// next [`Daemon::restart`].
    pub fn append_config(&self, toml: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)
            .expect("opening the daemon config");
        writeln!(f, "{toml}").expect("writing the daemon config");
    }

    /// Stops the daemon with SIGTERM (pod VMs keep running) and starts it
    /// again on the same state.
    pub async fn restart(&mut self) {
        self.terminate();
        self.spawn().await;
    }

    /// Stops the daemon with SIGTERM and waits for it to exit (pod VMs keep
    /// running); [`Daemon::start_again`] brings it back.
    pub fn stop(&mut self) {
        self.terminate();
    }

    /// Kills the daemon with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same state after [`Daemon::stop`] or
    /// [`Daemon::kill`].
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the daemon still runs");
        self.spawn().await;
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- carapace daemon log ---\n{}", self.log());
        }
        self.terminate();
        // Kill whatever VM a failed test left behind: every VM process of
        // this daemon has its run directory on its command line.
        kill_processes_mentioning(&self.run_dir());
    }
}

/// The host's cgroup v2 hierarchy: the unified mount of a hybrid host
/// (such as this one), else the usual place.
pub fn cgroup_root() -> PathBuf {
    let hybrid = Path::new("/sys/fs/cgroup/unified");
    if hybrid.join("cgroup.controllers").is_file() {
        hybrid.to_owned()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

/// Builds the demo image (as `cargo xtask busybox-image`) and imports it
/// into the image store at `image_dir`, as the daemon will open it.
async fn import_busybox(image_dir: &Path) {
    let out = tempfile::tempdir().expect("image build directory");
    let (layout, _tar) = crate::oci_image::build(out.path()).expect("building the busybox image");
    let store = std::sync::Arc::new(
        carapace::image::ImageStore::open(image_dir).expect("opening the image store"),
    );
    let name =
        carapace::image::ImageRef::parse("docker.io/library/busybox:latest").expect("image name");
    carapace::image::import::import_layout(&store, &layout, Some(&name))
        .await
        .expect("importing the busybox image");
}

/// The `carapace` binary of the same build as this test: test binaries live
/// in `<target>/<profile>/deps/`, binaries in `<target>/<profile>/`.
fn daemon_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in <target>/<profile>/deps");
    let binary = profile_dir.join("carapace");
    // A bench (release profile) brings its daemon up to date itself: `cargo bench -p
    // carapace-e2e` does not rebuild another package's binary, and a stale daemon would be
    // measured without a word. Tests run after scripts/test.sh's `cargo build --workspace
    // --bins`.
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        static BUILT: std::sync::Once = std::sync::Once::new();
        BUILT.call_once(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
                .args([
                    "build",
                    "--release",
                    "--quiet",
                    "-p",
                    "carapace",
                    "--bin",
                    "carapace",
                ])
                .status()
                .expect("running cargo build for the daemon");
            assert!(status.success(), "building the release daemon failed");
        });
    }
    assert!(
        binary.is_file(),
        "{} is missing: build it with `cargo build --workspace --bins` (scripts/test.sh does)",
        binary.display()
    );
    binary
}

/// SIGKILLs every process whose command line mentions `path`.
pub fn kill_processes_mentioning(path: &Path) {
    for pid in processes_mentioning(path) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Pids of live processes whose command line mentions `path`.
pub fn processes_mentioning(path: &Path) -> Vec<i32> {
    let needle = path.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'));
            !zombie && String::from_utf8_lossy(&cmdline).contains(&needle)
        })
        .collect()
}

/// A gRPC channel over a unix socket.
pub async fn connect(socket: &Path) -> Channel {
    let socket = socket.to_owned();
    Endpoint::from_static("http://carapace.sock")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .expect("connecting to the CRI socket")
}
