//! `node_probe`: the small client the node tests run inside the nested test node (see
//! `carapace_e2e::node`). It is built static and packed into the node's initramfs. Every
//! result is printed as a `@@<key> <value>` line on stdout, which the node's console carries
//! back to the test.
//!
//! ```text
//! node_probe health <vsock.sock> <timeout_ms>
//!     hybrid-vsock handshake + gRPC Health to the agent, retried until it answers
//! node_probe api <api.sock> <json request>
//!     one control API request to carapace-vmm, prints the reply line
//! node_probe boot <vsock.sock> <timeout_ms> <program> [args...]
//!     spawns the monitor, times spawn -> first Health answer (`boot_ms`), spawn -> the
//!     agent's readiness announcement (`ready_ms`) and, with debugfs mounted, spawn -> the
//!     node KVM's first VM exit (`first_exit_ms`: the guest's first instructions), reads the
//!     monitor's resident memory (in all, by kind, and that of its largest mapping: guest
//!     RAM), runs `sh -c "$NODE_PROBE_BEFORE_STOP"` if set (the VM still runs), then stops
//!     the monitor with SIGTERM. Like the runtime, it first waits for the agent's readiness
//!     announcement on `<vsock.sock>_1025` and only then connects: vhost-device-vsock (the
//!     QEMU side's backend) stops answering host connections that arrive while the guest's
//!     vsock driver is still starting (docs/design.md, record 8)
//! node_probe cri <cri.sock> <log_dir>
//!     a pod lifecycle through CRI as kubelet drives it: RunPodSandbox, a busybox container
//!     (CreateContainer, StartContainer) whose first line reaches its CRI log, ExecSync into
//!     it, StopPodSandbox, RemovePodSandbox; prints `@@cri-<step> ok` or `@@cri-<step> error ...`
//! node_probe pod-run <cri.sock> <log_dir> <name> <script>
//!     RunPodSandbox, then a busybox container running `sh -c <script>` (CreateContainer,
//!     StartContainer); prints `@@pod-id`, `@@ctr-id` and `@@pod-ip` (PodSandboxStatus), or
//!     `@@pod-run error ...`
//! node_probe exec <cri.sock> <container> <script>
//!     ExecSync `sh -c <script>` (60 s timeout): its stdout and stderr on ours, its exit code
//!     as ours (125 if the call itself fails)
//! node_probe pod-rm <cri.sock> <pod>
//!     StopPodSandbox, RemovePodSandbox; prints `@@pod-stop` and `@@pod-remove`, `ok` or
//!     `error ...`
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use carapace::agent_client::AgentClient;
use carapace::agent_ready::ReadyListener;

fn usage() -> ExitCode {
    eprintln!("usage: node_probe health <uds> <timeout_ms> | api <socket> <json> | boot <uds> <timeout_ms> <program> [args...] | cri <cri.sock> <log_dir> | pod-run <cri.sock> <log_dir> <name> <script> | exec <cri.sock> <container> <script> | pod-rm <cri.sock> <pod>");
    ExitCode::from(2)
}

fn result(key: &str, value: impl std::fmt::Display) {
    println!("@@{key} {value}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Calls Health until it answers; prints `@@health ok ...` or `@@health error ...`.
fn health(uds: &Path, timeout: Duration) -> bool {
    let start = Instant::now();
    // One runtime for both calls: the channel's connection task lives on it.
    let rt = runtime();
    match rt.block_on(AgentClient::wait_ready(uds, timeout)) {
        Ok((mut client, first)) => {
            // A second call on the same connection: the stream stays usable.
            let again = rt.block_on(client.health());
            result(
                "health",
                format!(
                    "ok version={} uptime_ms={} waited_ms={} second_call={}",
                    first.agent_version,
                    first.uptime_ms,
                    start.elapsed().as_millis(),
                    again.is_ok()
                ),
            );
            true
        }
        Err(e) => {
            result("health", format!("error {e}"));
            false
        }
    }
}

/// Sends one control API request and prints the reply.
fn api(socket: &Path, request: &str) -> bool {
    let reply = (|| -> std::io::Result<String> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(request.as_bytes())?;
        stream.write_all(b"\n")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line.trim_end().to_owned())
    })();
    match reply {
        Ok(line) => {
            result("api", line);
            true
        }
        Err(e) => {
            result("api", format!("error {e}"));
            false
        }
    }
}

/// Hybrid-vsock handshake by hand, then an HTTP/2 preface and an empty SETTINGS frame;
/// prints what comes back within `wait` (an HTTP/2 server answers with its own SETTINGS).
fn raw(uds: &Path, port: u32, wait: Duration) -> bool {
    let run = || -> std::io::Result<(String, Vec<u8>)> {
        let mut stream = UnixStream::connect(uds)?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < 32 {
            std::io::Read::read_exact(&mut stream, &mut byte)?;
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")?;
        stream.set_read_timeout(Some(wait))?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stream, &mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok((String::from_utf8_lossy(&line).into_owned(), got))
    };
    match run() {
        Ok((line, got)) => {
            let hex: String = got.iter().take(64).map(|b| format!("{b:02x}")).collect();
            result("raw", format!("reply={line:?} got={} hex={hex}", got.len()));
            !got.is_empty()
        }
        Err(e) => {
            result("raw", format!("error {e}"));
            false
        }
    }
}

/// The resident KiB of the process's largest mapping: guest RAM, whether a shared memfd or
/// private anonymous memory (no other mapping of either monitor comes near its size).
fn guest_ram_rss_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let field = |line: &str, name: &str| -> Option<u64> {
        line.strip_prefix(name)?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    // (Size, Rss) of each mapping, in the order smaps lists their fields.
    let mut mappings: Vec<(u64, u64)> = Vec::new();
    for line in smaps.lines() {
        if let Some(size) = field(line, "Size:") {
            mappings.push((size, 0));
        } else if let (Some(rss), Some(last)) = (field(line, "Rss:"), mappings.last_mut()) {
            last.1 = rss;
        }
    }
    mappings.iter().max_by_key(|m| m.0).map_or(0, |m| m.1)
}

/// The time from `start` to the node KVM's first VM exit after it, i.e. to the new guest's
/// first instructions (any guest soon exits, for I/O or a timer): how long the monitor took to
/// start running its guest. Watched on a thread that reads the node's summed exit counter
/// (`/sys/kernel/debug/kvm/exits`, when debugfs is mounted) every millisecond, so it assumes
/// no other VM runs.
struct FirstExit(std::sync::Arc<std::sync::OnceLock<Duration>>);

impl FirstExit {
    fn watch(start: Instant) -> Self {
        const EXITS: &str = "/sys/kernel/debug/kvm/exits";
        let seen = std::sync::Arc::new(std::sync::OnceLock::new());
        let read = || {
            std::fs::read_to_string(EXITS)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        if let Some(before) = read() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                while start.elapsed() < Duration::from_secs(600) {
                    if read().is_some_and(|now| now != before) {
                        let _ = seen.set(start.elapsed());
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
        FirstExit(seen)
    }

    fn ms(&self) -> Option<u128> {
        self.0.get().map(Duration::as_millis)
    }
}

/// Spawns the monitor, times it to the agent's first answer, measures it, stops it.
fn boot(uds: &Path, timeout: Duration, program: &str, args: &[String]) -> bool {
    let rt = runtime();
    // Bound before the monitor starts, so the announcement cannot be missed.
    let listener = match rt.block_on(async { ReadyListener::bind(uds) }) {
        Ok(l) => l,
        Err(e) => {
            result("boot", format!("error {e}"));
            return false;
        }
    };
    let start = Instant::now();
    let mut child = match Command::new(program).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            result("boot", format!("error cannot spawn {program}: {e}"));
            return false;
        }
    };
    let first_exit = FirstExit::watch(start);
    let running = std::cell::RefCell::new(&mut child);
    let mut announced = None;
    let ready = rt.block_on(async {
        listener
            .wait(timeout, || {
                matches!(running.borrow_mut().try_wait(), Ok(None))
            })
            .await
            .map_err(|e| e.to_string())?;
        announced = Some(start.elapsed());
        let left = timeout.saturating_sub(start.elapsed());
        AgentClient::wait_ready(uds, left)
            .await
            .map_err(|e| e.to_string())
    });
    let elapsed = start.elapsed();
    let pid = child.id();
    let ok = match ready {
        Ok(_) => {
            result("boot_ms", elapsed.as_millis());
            if let Some(announced) = announced {
                result("ready_ms", announced.as_millis());
            }
            if let Some(ms) = first_exit.ms() {
                result("first_exit_ms", ms);
            }
            for (key, field) in [
                ("rss_kb", "VmRSS"),
                ("rss_anon_kb", "RssAnon"),
                ("rss_file_kb", "RssFile"),
                ("rss_shmem_kb", "RssShmem"),
                ("vm_hwm_kb", "VmHWM"),
            ] {
                result(key, carapace_e2e::status_kib(pid, field));
            }
            result("rss_guest_kb", guest_ram_rss_kib(pid));
            true
        }
        Err(e) => {
            result("boot", format!("error {e}"));
            false
        }
    };
    // A profile's hook: reads the live VM's state (the node's KVM counters) before it goes.
    if let Ok(hook) = std::env::var("NODE_PROBE_BEFORE_STOP") {
        let _ = Command::new("sh").arg("-c").arg(hook).status();
    }
    // Our own child, not yet waited for: the pid cannot have been reused.
    if let Err(e) = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
    {
        result("kill", format!("error {e}"));
        let _ = child.kill();
    }
    let status = child.wait();
    result(
        "exit",
        status.map_or_else(|e| format!("error {e}"), |s| s.to_string()),
    );
    ok
}

/// A pod lifecycle through CRI (see the module comment).
fn cri(socket: &Path, log_dir: &Path) -> bool {
    use carapace_e2e::cri::{busybox, pod_config};
    use k8s_cri::v1::{
        CreateContainerRequest, ExecSyncRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
        StartContainerRequest, StopPodSandboxRequest,
    };
    let step = |name: &str, r: Result<(), String>| {
        result(
            &format!("cri-{name}"),
            r.as_ref()
                .map_or_else(|e| format!("error {e}"), |_| "ok".into()),
        );
        r.is_ok()
    };
    runtime().block_on(async {
        let mut cri = match carapace::demo::connect(socket).await {
            Ok(c) => c,
            Err(e) => return step("connect", Err(format!("{e:#}"))),
        };
        let config = pod_config("node-pod", log_dir);
        let pod = match cri
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
        {
            Ok(r) => r.into_inner().pod_sandbox_id,
            Err(e) => return step("run-pod", Err(e.to_string())),
        };
        step("run-pod", Ok(()));
        let container = async {
            let id = cri
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(busybox(
                        "sleeper",
                        &["sh", "-c", "echo started; exec sleep 600"],
                        "sleeper.log",
                    )),
                    sandbox_config: Some(config.clone()),
                })
                .await
                .map_err(|e| format!("CreateContainer: {e}"))?
                .into_inner()
                .container_id;
            cri.start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(|e| format!("StartContainer: {e}"))?;
            Ok::<_, String>(id)
        }
        .await;
        let ok = step(
            "container",
            container.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        let mut all = ok;
        if let Ok(id) = container {
            let log = log_dir.join("sleeper.log");
            let deadline = Instant::now() + Duration::from_secs(60);
            let logged = loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.lines().any(|l| l.ends_with(" stdout F started")) {
                    break Ok(());
                }
                if Instant::now() > deadline {
                    break Err(format!("{} holds {text:?}", log.display()));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            all &= step("log", logged);
            let exec = cri
                .exec_sync(ExecSyncRequest {
                    container_id: id,
                    cmd: vec!["sh".into(), "-c".into(), "echo exec-ok; exit 3".into()],
                    timeout: 30,
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    let r = r.into_inner();
                    match (String::from_utf8_lossy(&r.stdout).as_ref(), r.exit_code) {
                        ("exec-ok\n", 3) => Ok(()),
                        (out, code) => Err(format!("stdout {out:?}, exit code {code}")),
                    }
                });
            all &= step("exec", exec);
        }
        let stop = cri
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        all &= step("stop-pod", stop);
        let remove = cri
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        all &= step("remove-pod", remove);
        all
    })
}

/// A pod with one busybox container running `script` (see the module comment).
fn pod_run(socket: &Path, log_dir: &Path, name: &str, script: &str) -> bool {
    use carapace_e2e::cri::{busybox, pod_config};
    use k8s_cri::v1::{
        CreateContainerRequest, PodSandboxStatusRequest, RunPodSandboxRequest,
        StartContainerRequest,
    };
    let run = async {
        let mut cri = carapace::demo::connect(socket)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let config = pod_config(name, log_dir);
        let pod = cri
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .map_err(|e| format!("RunPodSandbox: {e}"))?
            .into_inner()
            .pod_sandbox_id;
        result("pod-id", &pod);
        let ctr = cri
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(busybox(name, &["sh", "-c", script], &format!("{name}.log"))),
                sandbox_config: Some(config),
            })
            .await
            .map_err(|e| format!("CreateContainer: {e}"))?
            .into_inner()
            .container_id;
        cri.start_container(StartContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .map_err(|e| format!("StartContainer: {e}"))?;
        result("ctr-id", &ctr);
        let ip = cri
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod,
                verbose: false,
            })
            .await
            .map_err(|e| format!("PodSandboxStatus: {e}"))?
            .into_inner()
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        result("pod-ip", ip);
        Ok::<_, String>(())
    };
    match runtime().block_on(run) {
        Ok(()) => true,
        Err(e) => {
            result("pod-run", format!("error {e}"));
            false
        }
    }
}

/// ExecSync into `container`; the process's output becomes ours, its exit code is returned.
fn exec(socket: &Path, container: &str, script: &str) -> u8 {
    use k8s_cri::v1::ExecSyncRequest;
    let run = async {
        let mut cri = carapace::demo::connect(socket)
            .await
            .map_err(|e| format!("{e:#}"))?;
        cri.exec_sync(ExecSyncRequest {
            container_id: container.into(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 60,
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|e| format!("ExecSync: {e}"))
    };
    match runtime().block_on(run) {
        Ok(r) => {
            let _ = std::io::stdout().write_all(&r.stdout);
            let _ = std::io::stderr().write_all(&r.stderr);
            u8::try_from(r.exit_code).unwrap_or(255)
        }
        Err(e) => {
            eprintln!("node_probe exec: {e}");
            125
        }
    }
}

/// StopPodSandbox and RemovePodSandbox, as kubelet ends a pod.
fn pod_rm(socket: &Path, pod: &str) -> bool {
    use k8s_cri::v1::{RemovePodSandboxRequest, StopPodSandboxRequest};
    runtime().block_on(async {
        let mut cri = match carapace::demo::connect(socket).await {
            Ok(c) => c,
            Err(e) => {
                result("pod-stop", format!("error {e:#}"));
                return false;
            }
        };
        let stop = cri
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await;
        let remove = cri
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await;
        let mut ok = true;
        for (key, r) in [("pod-stop", stop.err()), ("pod-remove", remove.err())] {
            ok &= r.is_none();
            result(key, r.map_or_else(|| "ok".into(), |e| format!("error {e}")));
        }
        ok
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ms = |s: &String| s.parse::<u64>().ok().map(Duration::from_millis);
    let ok = match args.as_slice() {
        [cmd, uds, timeout] if cmd == "health" => match ms(timeout) {
            Some(t) => health(Path::new(uds), t),
            None => return usage(),
        },
        [cmd, socket, request] if cmd == "api" => api(Path::new(socket), request),
        [cmd, socket, log_dir] if cmd == "cri" => cri(Path::new(socket), Path::new(log_dir)),
        [cmd, socket, log_dir, name, script] if cmd == "pod-run" => {
            pod_run(Path::new(socket), Path::new(log_dir), name, script)
        }
        [cmd, socket, container, script] if cmd == "exec" => {
            return ExitCode::from(exec(Path::new(socket), container, script))
        }
        [cmd, socket, pod] if cmd == "pod-rm" => pod_rm(Path::new(socket), pod),
        [cmd, uds, port, wait] if cmd == "raw" => match (port.parse(), ms(wait)) {
            (Ok(p), Some(w)) => raw(Path::new(uds), p, w),
            _ => return usage(),
        },
        [cmd, uds, timeout, program, rest @ ..] if cmd == "boot" => match ms(timeout) {
            Some(t) => boot(Path::new(uds), t, program, rest),
            None => return usage(),
        },
        _ => return usage(),
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
