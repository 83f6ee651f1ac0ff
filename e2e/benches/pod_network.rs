//! Pod-to-pod TCP throughput and round-trip latency through the VM path,
//! next to the same measurement between two plain network namespaces on a
//! bridge (the runc-like baseline), and the ratio of the two.
//!
//! VM path: the daemon with a bridge + host-local + portmap + loopback CNI
//! conflist (as e2e/tests/cni.rs), two pods; pod A's container runs the
//! `netbench` server, pod B's container runs the client through ExecSync
//! (guest eth0, virtio-net, the VMM's tap, tc mirred to the CNI veth, the
//! bridge, and the same way back into pod A's VM). Baseline: the same
//! binary in two network namespaces whose veths are on a bridge of their
//! own, run with `ip netns exec`. Runs are interleaved (baseline, VM,
//! baseline, ...) so that a changing load hits both; the median of the runs
//! is printed, with the ratio VM/baseline.
//!
//! Timing: the baseline client times itself (the host's clock). Inside a
//! pod VM under TCG the guest's clock is jiffies (4 ms steps: each round
//! trip reads 0 or 4 ms), so the pod figures are timed on the host around
//! the ExecSync instead, as a difference: the big run minus the
//! same exec with one unit of work (1 MiB, 1 round trip), which removes the
//! exec's own cost (process start, connection, warm-up round trips). Hence
//! the latency compared is the mean round trip, on both sides. A difference
//! that is not clearly above the exec's own time fails the bench.
//!
//! `netbench` (e2e/examples/netbench.rs) uses only the standard library; it
//! is compiled here with `rustc` directly, static (the busybox containers
//! have no libc), which spares a release build of the runtime crate that
//! `cargo build --example` would do for the package's library. It reaches
//! the containers read-only through a CRI volume mount.
//!
//! `cargo bench -p carapace-e2e --bench pod_network` (or `cargo test`, same
//! flags, for a debug build of the bench; the measured paths are the same).
//! The daemon binary must be built for the same profile (`cargo build -p
//! carapace --bin carapace`, with `--release` for `cargo bench`). NET_MIB
//! (default 64) MiB per throughput run, NET_RR (default 2000) round trips
//! per latency run, NET_RUNS (default 3) runs of each. A measurement
//! that fails fails the bench with its output: no figure is made up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use carapace_e2e::cri::{self, Cri};
use carapace_e2e::daemon::Daemon;
use k8s_cri::v1::{
    ExecSyncRequest, Mount, PodSandboxStatusRequest, RemovePodSandboxRequest, StopPodSandboxRequest,
};

const PORT: &str = "5201";
/// The CNI network of the VM path.
const CNI_BRIDGE: &str = "carabench0";
const CNI_SUBNET: &str = "10.233.8.0/24";
/// The baseline's bridge, namespaces and addresses.
const BASE_BRIDGE: &str = "carabase0";
const BASE_NS: [&str; 2] = ["carabase-a", "carabase-b"];
const BASE_IP: [&str; 2] = ["10.233.9.2", "10.233.9.3"];
/// Where the containers see the directory holding `netbench`.
const BENCH_DIR: &str = "/bench";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{cmd:?}: cannot run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(args))
}

/// Compiles `netbench` static into `dir`.
fn build_netbench(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/netbench.rs");
    let bin = dir.join("netbench");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    run(Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
        ])
        .arg("-o")
        .arg(&bin)
        .arg(&source))
    .unwrap_or_else(|e| panic!("building netbench: {e}"));
    carapace_e2e::node::assert_static(&bin);
    bin
}

/// The value of the `key <number>` line of netbench's output.
fn value(output: &str, key: &str) -> Result<f64, String> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .ok_or_else(|| format!("no {key} in netbench's output: {output:?}"))
}

/// Two network namespaces with a veth each on a bridge; removed on drop
/// (with the server running in the first).
struct Baseline {
    server: Option<Child>,
}

impl Baseline {
    fn remove_leftovers() {
        for ns in BASE_NS {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", BASE_BRIDGE])
            .stderr(Stdio::null())
            .status();
    }

    fn setup(netbench: &Path) -> Result<Baseline, String> {
        Self::remove_leftovers();
        let mut baseline = Baseline { server: None };
        ip(&["link", "add", BASE_BRIDGE, "type", "bridge"])?;
        ip(&["link", "set", BASE_BRIDGE, "up"])?;
        for (ns, addr) in BASE_NS.into_iter().zip(BASE_IP) {
            let host_end = format!("{ns}-h");
            ip(&["netns", "add", ns])?;
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ])?;
            ip(&["link", "set", &host_end, "master", BASE_BRIDGE, "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let server = Command::new("ip")
            .args(["netns", "exec", BASE_NS[0]])
            .arg(netbench)
            .args(["server", PORT])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the baseline server: {e}"))?;
        baseline.server = Some(server);
        Ok(baseline)
    }

    fn client(&self, netbench: &Path, args: &[&str]) -> Result<String, String> {
        run(Command::new("ip")
            .args(["netns", "exec", BASE_NS[1]])
            .arg(netbench)
            .args(["client", BASE_IP[0], PORT])
            .args(args))
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        Self::remove_leftovers();
    }
}

fn cni_conf(data_dir: &Path) -> tempfile::TempDir {
    let _ = Command::new("ip")
        .args(["link", "del", CNI_BRIDGE])
        .stderr(Stdio::null())
        .status();
    let dir = tempfile::tempdir().expect("CNI config directory");
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "carapace-bench",
        "plugins": [
            {"type": "bridge", "bridge": CNI_BRIDGE, "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "dataDir": data_dir,
                      "ranges": [[{"subnet": CNI_SUBNET}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"}
        ]
    });
    std::fs::write(dir.path().join("10-bench.conflist"), conf.to_string())
        .expect("writing the conflist");
    dir
}

/// Runs a pod with one busybox container running `cmd`, `bin_dir` mounted
/// read-only at [`BENCH_DIR`]; returns the pod id, container id, pod IP.
async fn pod(
    cri: &mut Cri,
    daemon: &Daemon,
    logs: &Path,
    name: &str,
    cmd: &[&str],
    bin_dir: &Path,
) -> (String, String, String) {
    let config = cri::pod_config(name, logs);
    let pod = cri::run_pod(cri, daemon, &config).await;
    let mut container = cri::busybox("netbench", cmd, "netbench.log");
    container.mounts = vec![Mount {
        container_path: BENCH_DIR.into(),
        host_path: bin_dir.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    let ctr = cri::create_running(cri, &pod, container, &config).await;
    let ip = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(!ip.is_empty(), "pod {name} has no IP:\n{}", daemon.log());
    (pod, ctr, ip)
}

/// netbench's client in container `ctr`, against `server_ip`, timed on
/// the host around the ExecSync.
async fn vm_client(
    cri: &mut Cri,
    ctr: &str,
    server_ip: &str,
    args: &[&str],
) -> Result<(Duration, String), String> {
    let mut cmd: Vec<String> = vec![
        format!("{BENCH_DIR}/netbench"),
        "client".into(),
        server_ip.into(),
        PORT.into(),
    ];
    cmd.extend(args.iter().map(|a| a.to_string()));
    let start = Instant::now();
    let out = cri
        .exec_sync(ExecSyncRequest {
            container_id: ctr.into(),
            cmd,
            timeout: 600,
        })
        .await
        .map_err(|e| format!("ExecSync: {e}"))?
        .into_inner();
    let elapsed = start.elapsed();
    if out.exit_code != 0 {
        return Err(format!(
            "netbench client {args:?} in the pod exited with {}: {}{}",
            out.exit_code,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok((elapsed, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// The host-clock time of `big` minus that of `small` (the same ExecSync
/// with one unit of work): what the extra `units` took, without the exec.
async fn vm_differential(
    cri: &mut Cri,
    ctr: &str,
    server_ip: &str,
    mode: &str,
    units: u64,
) -> Result<f64, String> {
    let (small, _) = vm_client(cri, ctr, server_ip, &[mode, "1"]).await?;
    let (big, guest_says) = vm_client(cri, ctr, server_ip, &[mode, &units.to_string()]).await?;
    let extra = big.as_secs_f64() - small.as_secs_f64();
    // What the guest's own clock made of the big run, to show why it is
    // not used.
    let guest_says = guest_says.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("  {mode}: exec with 1 unit {small:.2?}, with {units} {big:.2?} (guest clock: {guest_says})");
    if extra <= 0.0 || extra < small.as_secs_f64() / 4.0 {
        return Err(format!(
            "{mode}: {units} units took {big:?}, 1 took {small:?}: the exec's own time \
             is not small beside the measured part; raise NET_MIB / NET_RR"
        ));
    }
    Ok(extra)
}

/// Per path (baseline, VM): throughput (MiB/s) and mean round trip (µs)
/// of every run.
#[derive(Default)]
struct Figures {
    throughput: Vec<f64>,
    rtt_mean: Vec<f64>,
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn measure(
    netbench: &Path,
    baseline: &Baseline,
    cri: &mut Cri,
    client_ctr: &str,
    server_ip: &str,
) -> Result<(), String> {
    let mib = env_or("NET_MIB", 64).max(2);
    let rr = env_or("NET_RR", 2000).max(2);
    let runs = env_or("NET_RUNS", 3).max(1);
    let (mut base, mut vm) = (Figures::default(), Figures::default());
    let mut base_rtt_median = Vec::new();
    // Unmeasured: the first exec pages the binary in over virtio-fs and
    // resolves the peer's address.
    for mode in ["throughput", "rr"] {
        vm_client(cri, client_ctr, server_ip, &[mode, "1"]).await?;
    }
    for i in 0..runs {
        let out = baseline.client(netbench, &["throughput", &mib.to_string()])?;
        base.throughput.push(value(&out, "throughput_mib_s")?);
        let secs = vm_differential(cri, client_ctr, server_ip, "throughput", mib).await?;
        vm.throughput.push((mib - 1) as f64 / secs);
        let out = baseline.client(netbench, &["rr", &rr.to_string()])?;
        base.rtt_mean.push(value(&out, "rtt_us_mean")?);
        base_rtt_median.push(value(&out, "rtt_us_median")?);
        let secs = vm_differential(cri, client_ctr, server_ip, "rr", rr).await?;
        vm.rtt_mean.push(secs * 1e6 / (rr - 1) as f64);
        let i = i as usize;
        eprintln!(
            "run {}/{runs}: baseline {:.1} MiB/s, {:.1} µs; pod VMs {:.1} MiB/s, {:.1} µs",
            i + 1,
            base.throughput[i],
            base.rtt_mean[i],
            vm.throughput[i],
            vm.rtt_mean[i],
        );
    }
    println!(
        "pod-to-pod TCP, {runs} interleaved runs (median of the runs); {mib} MiB per \
         throughput run, {rr} 1-byte round trips per latency run"
    );
    println!(
        "{:<26} {:>15} {:>15} {:>9}",
        "", "baseline netns", "pod VMs", "VM/base"
    );
    for (what, b, v) in [
        ("throughput (MiB/s)", &base.throughput, &vm.throughput),
        ("round trip, mean (µs)", &base.rtt_mean, &vm.rtt_mean),
    ] {
        let (b, v) = (median(b), median(v));
        println!("{what:<26} {b:>15.1} {v:>15.1} {:>9.3}", v / b);
    }
    println!(
        "(baseline round trip median {:.1} µs; the pod figures are timed on the host \
         around ExecSync, big run minus a 1-unit run: the guest's clock is jiffies under TCG)",
        median(&base_rtt_median)
    );
    Ok(())
}

/// Stops and removes a pod; a failure is reported with the daemon's log,
/// not fatal (the daemon's drop kills what is left).
async fn remove_pod(cri: &mut Cri, daemon: &Daemon, pod: &str) {
    if let Err(e) = cri
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
    {
        let log = daemon.log();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!(
            "StopPodSandbox {pod}: {}\n--- daemon log (tail) ---\n{}",
            e.message(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
    if let Err(e) = cri
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
    {
        eprintln!("RemovePodSandbox {pod}: {}", e.message());
    }
}

fn main() {
    let bin_dir = tempfile::tempdir().expect("netbench directory");
    let netbench = build_netbench(bin_dir.path());
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async {
        let baseline = Baseline::setup(&netbench)?;
        let data = tempfile::tempdir().expect("host-local data directory");
        let conf = cni_conf(data.path());
        let logs = tempfile::tempdir().expect("log directory");
        let daemon = Daemon::start_with_network(true, Some(conf.path())).await;
        let mut cri = daemon.runtime().await;
        let server_cmd = [&format!("{BENCH_DIR}/netbench") as &str, "server", PORT];
        let (pod_a, _, ip_a) = pod(
            &mut cri,
            &daemon,
            logs.path(),
            "netbench-a",
            &server_cmd,
            bin_dir.path(),
        )
        .await;
        let (pod_b, ctr_b, _) = pod(
            &mut cri,
            &daemon,
            logs.path(),
            "netbench-b",
            &["sleep", "1000000"],
            bin_dir.path(),
        )
        .await;
        let measured = measure(&netbench, &baseline, &mut cri, &ctr_b, &ip_a).await;
        for pod in [pod_a, pod_b] {
            remove_pod(&mut cri, &daemon, &pod).await;
        }
        drop(daemon);
        let _ = Command::new("ip")
            .args(["link", "del", CNI_BRIDGE])
            .status();
        drop(baseline);
        measured
    });
    if let Err(e) = result {
        panic!("the pod network benchmark could not measure: {e}");
    }
}
