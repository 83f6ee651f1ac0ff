//! `carapace-agent`: PID 1 of every Carapace pod VM.
//!
//! As init (PID 1) it prepares the guest's base mounts and serves the agent
//! API on vsock port 1024. Run as an ordinary process (tests, development) it
//! serves the same API on the address given with `--listen`.
//!
//! PID 1 must never exit while the VM is meant to run (the kernel panics when
//! init exits), so every failure past argument parsing is logged and retried.

mod announce;
mod cgroup;
mod container;
mod init;
mod listen;
mod network;
mod port_forward;
mod reaper;
mod sandbox;
mod service;
mod stdio;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use listen::ListenAddr;
use tracing_subscriber::filter::Targets;

const USAGE: &str = "usage: carapace-agent [--listen vsock:<port> | --listen unix:<path>]";

fn main() -> ExitCode {
    // The agent re-executes itself to create container processes (see
    // container::init); that helper must not start logging or threads.
    if std::env::args_os().nth(1).as_deref() == Some(container::init::INIT_ARG.as_ref()) {
        container::init::main();
    }
    let started = Instant::now();
    let is_init = std::process::id() == 1;
    init_logging();

    let listen = if is_init {
        // The kernel hands init the command-line words it did not consume:
        // they are not for us, so init ignores its arguments.
        init::setup();
        ListenAddr::Vsock(carapace_agent_api::AGENT_VSOCK_PORT)
    } else {
        match parse_args(std::env::args().skip(1)) {
            Ok(addr) => addr,
            Err(msg) => {
                eprintln!("carapace-agent: {msg}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    };

    if !is_init {
        // Orphans of container processes must come back to us, as they do
        // to init in the guest.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::error!("cannot become a child subreaper: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = run(listen, started, is_init);
    if is_init {
        // Unreachable in practice (`run` retries forever as init), but init
        // must not return: park the thread instead.
        tracing::error!("agent server loop ended; init stays parked");
        loop {
            std::thread::park();
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (the guest's console), filtered by `CARAPACE_AGENT_LOG` (`info` by default;
/// `level` or `target=level` items separated by commas). `Targets` rather than `EnvFilter`:
/// the same directives without field filters, and without the regex engine, which was a
/// sixth of the agent's size (every byte of the agent is guest RAM in every pod).
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("CARAPACE_AGENT_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .init();
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<ListenAddr, String> {
    let mut listen = None;
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "--listen" => args.next().ok_or("--listen needs a value")?,
            other => match other.strip_prefix("--listen=") {
                Some(v) => v.to_owned(),
                None => return Err(format!("unknown argument {other:?}")),
            },
        };
        listen = Some(value.parse::<ListenAddr>()?);
    }
    listen.ok_or_else(|| "--listen is required when not running as init".to_owned())
}

fn run(listen: ListenAddr, started: Instant, is_init: bool) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async move {
        let reaper = reaper::Reaper::start()
            .map_err(|e| format!("cannot watch for exited children: {e}"))?;
        let containers = std::sync::Arc::new(container::Manager::new(reaper));
        if let ListenAddr::Vsock(_) = listen {
            // Bound before the API serves (and announces readiness), so a
            // ready agent always takes port-forward connections.
            if let Err(e) = port_forward::start(carapace_agent_api::PORT_FORWARD_VSOCK_PORT) {
                tracing::error!("cannot serve port-forward: {e}");
            }
        }
        loop {
            let result = service::serve(&listen, started, containers.clone()).await;
            if !is_init {
                return result.map_err(|e| e.to_string());
            }
            if let Err(e) = result {
                tracing::error!("agent server failed, restarting in 1s: {e}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> impl Iterator<Item = String> {
        list.iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn parses_listen_forms() {
        assert_eq!(
            parse_args(args(&["--listen", "vsock:1024"])).unwrap(),
            ListenAddr::Vsock(1024)
        );
        assert_eq!(
            parse_args(args(&["--listen=unix:/run/a.sock"])).unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(parse_args(args(&[])).is_err());
        assert!(parse_args(args(&["--listen"])).is_err());
        assert!(parse_args(args(&["--bogus"])).is_err());
        assert!(parse_args(args(&["--listen", "tcp:1"])).is_err());
        assert!(parse_args(args(&["--listen", "vsock:notaport"])).is_err());
    }
}
