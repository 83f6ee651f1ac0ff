//! `carapace-vmm --config <file.json>`: runs one microVM until the guest resets or shuts
//! down, the control API says `shutdown`, or SIGTERM/SIGINT arrive. With `"jail"` in the
//! configuration the process forks: the child, PID 1 of a new pid namespace, is jailed and
//! runs the VM; this process supervises it (forwards signals, exits with its status).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use carapace_vmm::builder::build_vm;
use carapace_vmm::config::{JailConfig, ValidatedConfig, VmConfig};
use carapace_vmm::jail::{self, Role};
use carapace_vmm::seccomp::{self, ThreadKind};
use carapace_vmm::vmm::StopHandle;
use carapace_vmm::vstate::vcpu::ExitReason;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// The command line.
#[derive(Debug, PartialEq)]
struct Args {
    /// JSON VM configuration.
    config: PathBuf,
    /// Do not install the seccomp filters (debugging only; same as `"seccomp": false`).
    no_seccomp: bool,
}

const USAGE: &str = "Carapace's KVM microVM monitor: one process per pod VM

Usage: carapace-vmm --config <CONFIG> [--no-seccomp]

Options:
      --config <CONFIG>  JSON VM configuration
      --no-seccomp       Do not install the seccomp filters (debugging only; same as
                         \"seccomp\": false)
  -h, --help             Print help
  -V, --version          Print version";

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Command {
    Run(Args),
    Help,
    Version,
}

/// Parses the arguments after the program name. Hand-rolled on `lexopt` rather than clap:
/// two options do not need clap's parser, which took 15–20 ms of every VM's start in the
/// nested test node (docs/vmm.md).
fn parse_args(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Result<Command, lexopt::Error> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut config = None;
    let mut no_seccomp = false;
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => config = Some(PathBuf::from(parser.value()?)),
            Long("no-seccomp") => no_seccomp = true,
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            _ => return Err(arg.unexpected()),
        }
    }
    let config = config.ok_or_else(|| lexopt::Error::from("the option --config is required"))?;
    Ok(Command::Run(Args { config, no_seccomp }))
}

/// Blocks SIGTERM and SIGINT (and SIGCHLD for the jail's supervisor) in this thread, and so
/// in every thread and child made after, and returns the signal set for `sigwait`.
fn block_stop_signals(with_sigchld: bool) -> anyhow::Result<libc::sigset_t> {
    // SAFETY: an all-zero sigset_t is a valid value that sigemptyset then initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t; return values are checked.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if with_sigchld {
            libc::sigaddset(&mut set, libc::SIGCHLD);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    anyhow::ensure!(rc == 0, "cannot block SIGTERM/SIGINT");
    Ok(set)
}

/// The thread that takes SIGTERM/SIGINT (blocked in every other thread) and stops the VM.
///
/// Spawned before the VM is built when there is no jail, so that its start and its seccomp
/// filter overlap with the build instead of delaying the first vCPU run; [`Self::arm`] hands
/// it the VM's stop handle and waits until its filter is on. With a jail it is spawned after
/// entering the jail: the `setresuid` there is broadcast to every thread by glibc, which a
/// filtered thread may not do.
struct SignalThread {
    installed: std::sync::mpsc::Receiver<Result<(), seccomp::SeccompError>>,
    stop: std::sync::mpsc::Sender<StopHandle>,
}

impl SignalThread {
    fn spawn(signals: libc::sigset_t, seccomp_on: bool) -> anyhow::Result<Self> {
        let filter = if seccomp_on {
            Some(seccomp::filter(ThreadKind::Signals)?)
        } else {
            None
        };
        let (installed_tx, installed) = std::sync::mpsc::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<StopHandle>();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(filter) = filter {
                    let result = seccomp::apply(ThreadKind::Signals, &filter);
                    let failed = result.is_err();
                    let _ = installed_tx.send(result);
                    if failed {
                        return;
                    }
                } else {
                    let _ = installed_tx.send(Ok(()));
                }
                let mut sig = 0;
                // SAFETY: `signals` is an initialised set and `sig` a valid out-pointer.
                if unsafe { libc::sigwait(&signals, &mut sig) } == 0 {
                    tracing::info!(signal = sig, "stop requested");
                    // A signal taken while the VM is still being built stops it as soon
                    // as it is armed. (Arming does not wake this thread, so it does not
                    // compete with the vCPU threads for the CPU at start.)
                    if let Ok(stop) = stop_rx.recv() {
                        stop.stop();
                    }
                }
            })
            .context("cannot spawn the signal thread")?;
        Ok(Self { installed, stop })
    }

    /// Gives the thread the VM's stop handle; returns once its filter is installed.
    fn arm(self, stop: StopHandle) -> anyhow::Result<()> {
        self.installed
            .recv()
            .context("the signal thread died")?
            .context("signal thread")?;
        self.stop
            .send(stop)
            .map_err(|_| anyhow::anyhow!("the signal thread died"))
    }
}

/// Builds and runs the VM; with a jail, enters it between building and running.
fn run_vm(
    config: ValidatedConfig,
    signals: libc::sigset_t,
    jail: Option<(&JailConfig, std::io::PipeWriter)>,
) -> anyhow::Result<ExitReason> {
    let api_socket = config.get().api_socket.clone();
    let seccomp_on = config.get().seccomp;
    let early_signal_thread = match jail {
        None => Some(SignalThread::spawn(signals, seccomp_on)?),
        Some(_) => None,
    };
    let mut vmm = build_vm(&config).context("cannot build the VM")?;
    if let Some(path) = api_socket {
        vmm.enable_api(&path)?;
    }
    if let Some((jail, ready)) = jail {
        jail::enter(jail, ready).context("cannot enter the jail")?;
    }
    let signal_thread = match early_signal_thread {
        Some(thread) => thread,
        None => SignalThread::spawn(signals, seccomp_on)?,
    };
    signal_thread.arm(vmm.stop_handle()?)?;
    tracing::info!(cmdline = vmm.cmdline(), "starting the VM");
    Ok(vmm.run()?)
}

fn exit_code(reason: ExitReason) -> ExitCode {
    match reason {
        ExitReason::Error(e) => {
            eprintln!("carapace-vmm: the VM failed: {e}");
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut config = VmConfig::from_file(&args.config)?.validate()?;
    if args.no_seccomp {
        config = config.without_seccomp();
    }
    let Some(jail_cfg) = config.get().jail.clone() else {
        let signals = block_stop_signals(false)?;
        return Ok(exit_code(run_vm(config, signals, None)?));
    };
    let config = config.with_jail_paths()?;
    let signals = block_stop_signals(true)?;
    match jail::fork_into_pid_namespace()? {
        Role::Supervisor { child, ready } => {
            let code = jail::supervise(child, ready, &jail_cfg, config.get().seccomp, &signals)?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        Role::Vmm { ready } => {
            jail::prepare_mounts(&jail_cfg).context("cannot prepare the jail")?;
            Ok(exit_code(run_vm(
                config,
                signals,
                Some((&jail_cfg, ready)),
            )?))
        }
    }
}

/// Logs to stderr, filtered by `CARAPACE_VMM_LOG` (`warn` by default; `level` or
/// `target=level` items separated by commas). `Targets` rather than `EnvFilter`: the same
/// directives without field filters, and no regex engine in the binary every VM starts.
fn init_logging() {
    let filter = std::env::var("CARAPACE_VMM_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::WARN));
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("carapace-vmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("carapace-vmm: {e} (see carapace-vmm --help)");
            return ExitCode::from(2);
        }
    };
    init_logging();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("carapace-vmm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(std::ffi::OsString::from)).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_the_config_and_the_seccomp_switch() {
        let run = |config: &str, no_seccomp| {
            Ok(Command::Run(Args {
                config: config.into(),
                no_seccomp,
            }))
        };
        assert_eq!(parse(&["--config", "/a.json"]), run("/a.json", false));
        assert_eq!(parse(&["--config=/a.json"]), run("/a.json", false));
        assert_eq!(
            parse(&["--no-seccomp", "--config", "b.json"]),
            run("b.json", true)
        );
        assert_eq!(parse(&["--help"]), Ok(Command::Help));
        assert_eq!(parse(&["-V"]), Ok(Command::Version));
    }

    #[test]
    fn rejects_what_it_does_not_know() {
        assert!(parse(&[]).unwrap_err().contains("--config is required"));
        assert!(parse(&["--config"]).unwrap_err().contains("--config"));
        assert!(parse(&["--config", "a", "--bogus"])
            .unwrap_err()
            .contains("--bogus"));
        assert!(parse(&["--config", "a", "extra"])
            .unwrap_err()
            .contains("extra"));
    }
}
