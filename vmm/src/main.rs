//! `carapace-vmm --config <file.json>`: runs one microVM until the guest resets or shuts
//! down, the control API says `shutdown`, or SIGTERM/SIGINT arrive.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use carapace_vmm::builder::build_vm;
use carapace_vmm::config::VmConfig;
use carapace_vmm::vstate::vcpu::ExitReason;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Carapace's KVM microVM monitor: one process per pod VM"
)]
struct Args {
    /// JSON VM configuration.
    #[arg(long)]
    config: PathBuf,
}

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread spawned after), and
/// returns the signal set for `sigwait`.
fn block_stop_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: an all-zero sigset_t is a valid value that sigemptyset then initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t; return values are checked.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    anyhow::ensure!(rc == 0, "cannot block SIGTERM/SIGINT");
    Ok(set)
}

fn run(args: Args) -> anyhow::Result<ExitReason> {
    let config = VmConfig::from_file(&args.config)?.validate()?;
    let api_socket = config.get().api_socket.clone();
    let signals = block_stop_signals()?;
    let mut vmm = build_vm(&config).context("cannot build the VM")?;
    if let Some(path) = api_socket {
        vmm.enable_api(&path)?;
    }
    let stop = vmm.stop_handle()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `signals` is an initialised set and `sig` a valid out-pointer.
            if unsafe { libc::sigwait(&signals, &mut sig) } == 0 {
                tracing::info!(signal = sig, "stop requested");
                stop.stop();
            }
        })
        .context("cannot spawn the signal thread")?;
    tracing::info!(cmdline = vmm.cmdline(), "starting the VM");
    Ok(vmm.run()?)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CARAPACE_VMM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match run(Args::parse()) {
        Ok(ExitReason::Error(e)) => {
            eprintln!("carapace-vmm: the VM failed: {e}");
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("carapace-vmm: {e:#}");
            ExitCode::FAILURE
        }
    }
}
