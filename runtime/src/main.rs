//! `carapace`: the Carapace runtime's command-line entry point.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use std::sync::Arc;

use carapace::config::{Config, DriverChoice};
use carapace::container::Containers;
use carapace::cri::{self, CriService};
use carapace::host::KvmKind;
use carapace::image::pull::Puller;
use carapace::image::{CriImageService, ImageStore};
use carapace::sandbox::Sandboxes;
use carapace::vm::VmSpec;
use carapace::vm::{DriverKind, VmDriver, VmError};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "carapace",
    version,
    about = "Kubernetes CRI runtime: one KVM microVM per pod"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the CRI daemon (kubelet's --container-runtime-endpoint).
    Serve(ServeArgs),
    /// Report whether this host can run pod VMs; with --boot, boot a
    /// throwaway VM and ask its agent for its version.
    Check(CheckArgs),
    /// Import the images of an OCI image layout (directory or tar) into the
    /// image store, for air-gapped nodes. The daemon sees them when it
    /// (re)starts.
    Import(ImportArgs),
    /// Run a one-shot demo pod through a running daemon's CRI socket and
    /// print its container's log.
    Demo(DemoArgs),
}

#[derive(Debug, clap::Args)]
struct ImportArgs {
    #[arg(long, default_value = carapace::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Name for images whose layout gives only a tag (or none).
    #[arg(long)]
    name: Option<String>,
    /// The OCI image layout: a directory or a tar file.
    layout: PathBuf,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// The daemon's CRI socket.
    #[arg(long, default_value = "/run/carapace/carapace.sock")]
    socket: PathBuf,
    #[arg(long, default_value = "docker.io/library/busybox:latest")]
    image: String,
    /// How long the container may run.
    #[arg(long, default_value = "120", value_name = "SECONDS")]
    timeout: u64,
    /// The container's command (default: a greeting with facts about the VM).
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML); a missing default file means defaults.
    #[arg(long, default_value = carapace::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Override the config file's CRI socket path.
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Boot a VM with the guest kernel and image and call the agent.
    #[arg(long)]
    boot: bool,
    /// Guest kernel (uncompressed vmlinux).
    #[arg(long, default_value = "/usr/local/share/carapace/vmlinux")]
    kernel: PathBuf,
    /// Guest initramfs (the agent as /init).
    #[arg(long, default_value = "/usr/local/share/carapace/initramfs.cpio")]
    initrd: PathBuf,
    /// How long to wait for the agent to answer.
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    timeout: u64,
    /// The VM driver to check (as `vm.driver` in the daemon's config).
    #[arg(long, value_enum, default_value = "auto")]
    driver: DriverChoice,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // CARAPACE_LOG wins; else the config file's log_level (serve); else info.
    let default_level = match &cli.command {
        Command::Serve(args) => Config::load(&args.config)
            .map(|c| c.log_level)
            .unwrap_or_else(|_| "info".into()),
        Command::Check(_) | Command::Import(_) | Command::Demo(_) => "info".into(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CARAPACE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Check(args) => runtime.block_on(check(args)),
        Command::Import(args) => runtime.block_on(import(args)),
        Command::Demo(args) => {
            let code = runtime.block_on(demo(args))?;
            std::process::exit(code);
        }
    }
}

async fn import(args: ImportArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let store = Arc::new(ImageStore::open(&config.image_dir)?);
    let name = args
        .name
        .as_deref()
        .map(carapace::image::ImageRef::parse)
        .transpose()
        .context("--name")?;
    let images = carapace::image::import::import_layout(&store, &args.layout, name.as_ref())
        .await
        .with_context(|| format!("importing {}", args.layout.display()))?;
    for image in images {
        println!("{} {}", image.id, image.repo_tags.join(" "));
    }
    Ok(())
}

/// The demo container's default command.
const DEMO_SCRIPT: &str = "echo \"Hello from a container in its own Carapace pod VM\"; \
    echo \"kernel:   $(uname -r)\"; echo \"hostname: $(hostname)\"; \
    echo \"cpus:     $(grep -c ^processor /proc/cpuinfo)\"; \
    echo \"memory:   $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2) kB\"; \
    echo \"address:  $(ip -4 addr show eth0 2>/dev/null | grep -o 'inet [0-9./]*' | cut -d' ' -f2)\"; \
    echo \"dns:      $(grep nameserver /etc/resolv.conf)\"; \
    echo \"cgroup:   $(cat /proc/self/cgroup)\"";

async fn demo(args: DemoArgs) -> anyhow::Result<i32> {
    let command = if args.command.is_empty() {
        vec!["sh".into(), "-c".into(), DEMO_SCRIPT.into()]
    } else {
        args.command
    };
    carapace::demo::run(
        &args.socket,
        carapace::demo::DemoPod {
            image: args.image,
            command,
            timeout: Duration::from_secs(args.timeout),
        },
    )
    .await
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config)?;
    if let Some(socket) = args.socket {
        config.socket = socket;
    }
    let kvm = KvmKind::detect();
    let (kind, why) = DriverKind::pick(config.vm.driver, kvm).map_err(anyhow::Error::msg)?;
    let driver = VmDriver::from_host(kind, &config.vm)?;
    tracing::info!("VM driver: {} ({why})", driver.describe());
    let store = Arc::new(ImageStore::open(&config.image_dir)?);
    for warning in store.load_warnings() {
        tracing::error!("image store: {warning}");
    }
    // The image reference grammar is a regex compiled on first use (0.6 s in
    // a debug build); pay for it here rather than in the first
    // CreateContainer or PullImage.
    let _ = carapace::image::reference::ImageRef::parse("registry.k8s.io/pause:3.10");
    let puller = Arc::new(Puller::new(store.clone(), config.registry.clone()));
    let images = CriImageService::new(puller);
    let sandboxes = Arc::new(Sandboxes::load(config.clone(), driver)?);
    sandboxes.start_warm_pool();
    let pool_owner = sandboxes.clone();
    let containers = Containers::load(config.clone(), sandboxes.clone(), store)?;
    let streaming = carapace::streaming::StreamingServer::start(
        &config.streaming,
        containers.clone(),
        sandboxes.clone(),
    )
    .await
    .with_context(|| {
        format!(
            "starting the streaming server on {}",
            config.streaming.address
        )
    })?;
    let runtime_config = carapace::cri::runtime_config::NodeRuntimeConfig::load(&config.state_dir)
        .context("loading the runtime configuration record")?;
    let service =
        CriService::new(sandboxes, containers, Arc::new(runtime_config)).with_streaming(streaming);
    let handle = service.clone();
    let (signalled, on_signal) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        // Pod VMs keep running: a restarted daemon finds them again.
        tracing::info!("shutting down; pod VMs keep running, warm VMs are stopped");
        handle.begin_shutdown();
        // Warm VMs belong to no pod: they go with the daemon.
        pool_owner.shutdown().await;
        let _ = signalled.send(());
    };
    let serving = cri::serve(&config.socket, service, images, shutdown);
    // The graceful drain can wait forever for a client that keeps its
    // connection open (kubelet does; hyperium/hyper#4170): after the
    // signal, in-flight calls get SHUTDOWN_DRAIN to finish.
    let drained = async {
        if on_signal.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_DRAIN).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        served = serving => served,
        () = drained => {
            tracing::info!(
                "CRI connections still open {} s after the signal; exiting",
                SHUTDOWN_DRAIN.as_secs()
            );
            let _ = std::fs::remove_file(&config.socket);
            Ok(())
        }
    };
    // Starts the shutdown cut short killed their processes on the way out.
    if !carapace::vm::process::wait_killed(std::time::Duration::from_secs(5)).await {
        tracing::warn!("processes of starts cut short by the shutdown are still exiting");
    }
    result
}

/// How long in-flight CRI calls may take to finish once the daemon is
/// asked to stop.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// How the host's cgroups are mounted (kubelet must use the same driver).
fn cgroup_layout() -> &'static str {
    let root = std::path::Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        "v2 (unified hierarchy)"
    } else if root.join("unified").is_dir() {
        "hybrid (v1 controllers, v2 at /sys/fs/cgroup/unified)"
    } else if root.is_dir() {
        "v1"
    } else {
        "none mounted"
    }
}

async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let kvm = KvmKind::detect();
    println!("kvm:     {}", kvm.describe());
    let picked = DriverKind::pick(args.driver, kvm);
    let driver = picked
        .clone()
        .map_err(VmError::InvalidSpec)
        .and_then(|(kind, why)| {
            let driver = VmDriver::from_host(kind, &carapace::config::VmConfig::default())?;
            println!("driver:  {} ({why})", driver.describe());
            Ok(driver)
        });
    if let Err(e) = &driver {
        println!("driver:  unavailable: {e}");
    }
    let mut missing = Vec::new();
    for (what, path) in [("kernel", &args.kernel), ("initrd", &args.initrd)] {
        let state = if path.is_file() {
            "ok"
        } else {
            missing.push(what.to_owned());
            "MISSING"
        };
        println!("{what}:  {} ({state})", path.display());
    }
    let tools: &[&str] = match picked {
        Ok((DriverKind::Builtin, _)) => &["virtiofsd"],
        _ => &["qemu-system-x86_64", "vhost-device-vsock", "virtiofsd"],
    };
    for &tool in tools {
        match carapace::vm::find_in_path(tool) {
            Some(path) => println!("tool:    {tool} {}", path.display()),
            None => {
                println!("tool:    {tool} MISSING (scripts/setup.sh installs it)");
                missing.push(tool.to_owned());
            }
        }
    }
    if let Err(e) = &driver {
        missing.push(format!("a VM driver ({e})"));
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    for fs in ["overlay", "nsfs"] {
        let found = filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(fs));
        println!("kernel:  {fs} {}", if found { "ok" } else { "MISSING" });
        if !found && fs == "overlay" {
            missing.push("overlayfs".into());
        }
    }
    println!("cgroups: {}", cgroup_layout());
    if !missing.is_empty() {
        bail!(
            "this host cannot run pods yet: missing {}",
            missing.join(", ")
        );
    }
    if !args.boot {
        return Ok(());
    }

    let driver = driver?;
    let run_dir = tempfile::Builder::new()
        .prefix("carapace-check-")
        .tempdir()
        .context("creating the VM's run directory")?;
    let spec = VmSpec {
        kernel: args.kernel,
        initrd: args.initrd,
        vcpus: 1,
        mem_mib: 256,
        extra_cmdline: String::new(),
        run_dir: run_dir.path().to_owned(),
        shared_dir: None,
        network: None,
    };
    let vm = driver.start(&spec).await?;
    let started = vm.started_at();
    let ready = vm.wait_agent(Duration::from_secs(args.timeout)).await;
    let elapsed = started.elapsed();
    let console = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
    vm.stop().await;
    match ready {
        Ok((_, health)) => {
            println!(
                "agent:   carapace-agent {} (API {}..={}) answered {} ms after the VM started",
                health.agent_version,
                health.min_api_version,
                health.api_version,
                elapsed.as_millis()
            );
            Ok(())
        }
        Err(e) => {
            let kept = run_dir.keep();
            eprintln!("guest console:\n{console}");
            bail!(
                "the guest agent did not answer: {e} (VM logs kept in {})",
                kept.display()
            )
        }
    }
}
