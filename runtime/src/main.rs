//! `carapace`: the Carapace runtime's command-line entry point.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use carapace::agent_client::AgentClient;
use carapace::host::KvmKind;
use carapace::vm::qemu::QemuDriver;
use carapace::vm::VmSpec;
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
    /// Report whether this host can run pod VMs; with --boot, boot a
    /// throwaway VM and ask its agent for its version.
    Check(CheckArgs),
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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CARAPACE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Check(args) => runtime.block_on(check(args)),
    }
}

async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let kvm = KvmKind::detect();
    println!("kvm:     {}", kvm.describe());
    let driver = QemuDriver::from_host();
    match &driver {
        Ok(d) => println!("driver:  qemu ({:?})", d.accel()),
        Err(e) => println!("driver:  qemu unavailable: {e}"),
    }
    for (what, path) in [("kernel", &args.kernel), ("initrd", &args.initrd)] {
        let state = if path.is_file() { "ok" } else { "MISSING" };
        println!("{what}:  {} ({state})", path.display());
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
    };
    let vm = driver.start(&spec).await?;
    let started = vm.started_at();
    let ready = AgentClient::wait_ready(vm.vsock_socket(), Duration::from_secs(args.timeout)).await;
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
            eprintln!("guest console:\n{console}");
            bail!("the guest agent did not answer: {e}")
        }
    }
}
