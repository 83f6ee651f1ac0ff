//! Pod networking through CNI, as kubelet drives it: Debian's
//! containernetworking-plugins (bridge + host-local + loopback + portmap) on
//! a bridge and an address range of this test's own.

use std::path::Path;

use carapace_e2e::daemon::Daemon;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, DnsConfig, ExecSyncRequest,
    ImageSpec, ListPodSandboxMetricsRequest, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatsRequest, PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StatusRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;
use tonic::Code;

/// Each test has its own bridge and range (tests run in parallel).
fn conf_dir(data_dir: &Path, bridge: &str, subnet: &str) -> tempfile::TempDir {
    let _ = std::process::Command::new("ip")
        .args(["link", "del", bridge])
        .stderr(std::process::Stdio::null())
        .status();
    let dir = tempfile::tempdir().unwrap();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "carapace-e2e",
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "dataDir": data_dir,
                      "ranges": [[{"subnet": subnet}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"}
        ]
    });
    std::fs::write(dir.path().join("10-e2e.conflist"), conf.to_string()).unwrap();
    dir
}

fn pod_config(name: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        ..Default::default()
    }
}

fn allocations(data_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("carapace-e2e")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect()
}

fn in_netns(netns: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .expect("nsenter")
}

async fn network_ready(daemon: &Daemon) -> (bool, String) {
    let status = daemon
        .runtime()
        .await
        .status(StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let net = status
        .conditions
        .iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap()
        .clone();
    (net.status, format!("{}: {}", net.reason, net.message))
}

#[tokio::test]
async fn missing_cni_config_is_not_ready_and_fails_pods_clearly() {
    let empty = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with_network(false, Some(empty.path())).await;
    let (ready, why) = network_ready(&daemon).await;
    assert!(!ready);
    assert!(
        why.contains("NetworkPluginNotReady") && why.contains("no CNI network config"),
        "{why}"
    );
    let err = daemon
        .runtime()
        .await
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config("nonet")),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("no CNI network config"),
        "{}",
        err.message()
    );
    // Nothing was started.
    assert!(std::fs::read_dir(daemon.dir().join("netns"))
        .map(|d| d.count() == 0)
        .unwrap_or(true));
}

#[tokio::test]
async fn pod_gets_netns_tap_and_address_and_teardown_leaves_nothing() {
    let data = tempfile::tempdir().unwrap();
    const BRIDGE: &str = "carae2e0";
    let conf = conf_dir(data.path(), BRIDGE, "10.233.0.0/24");
    let mut daemon = Daemon::start_with_network(false, Some(conf.path())).await;
    let (ready, why) = network_ready(&daemon).await;
    assert!(ready, "{why}");
    let mut cri = daemon.runtime().await;
    let id = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config("net1")),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}\n{}", daemon.log()))
        .into_inner()
        .pod_sandbox_id;
    let netns = daemon.dir().join("netns").join(&id);
    assert!(netns.exists());
    assert_eq!(allocations(data.path()).len(), 1);
    let links = in_netns(&netns, &["ip", "-o", "link"]);
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(links.contains("tap0") && links.contains("eth0"), "{links}");
    let filters = in_netns(&netns, &["tc", "filter", "show", "dev", "eth0", "ingress"]);
    let filters = String::from_utf8_lossy(&filters.stdout);
    assert!(filters.contains("Redirect to device tap0"), "{filters}");
    // QEMU runs in the pod namespace, holding tap0 (else: NO-CARRIER).
    let tap = in_netns(&netns, &["ip", "-o", "link", "show", "dev", "tap0"]);
    let tap = String::from_utf8_lossy(&tap.stdout);
    assert!(
        tap.contains("LOWER_UP") && !tap.contains("NO-CARRIER"),
        "{tap}"
    );

    // A restarted daemon tears the network down from its record.
    daemon.restart().await;
    let mut cri = daemon.runtime().await;

    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .unwrap();
    assert!(!netns.exists(), "netns left after stop");
    assert!(
        allocations(data.path()).is_empty(),
        "address left after stop"
    );
    let host_links = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", BRIDGE])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&host_links.stdout)
            .trim()
            .is_empty(),
        "veth left on the bridge"
    );
    // Stop again, remove: idempotent.
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .unwrap();
    cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
        .await
        .unwrap();
    let _ = std::process::Command::new("ip")
        .args(["link", "del", BRIDGE])
        .status();
}

type Cri = RuntimeServiceClient<Channel>;

/// Runs pod `name` with one busybox container running `script`; returns
/// the pod id, the container id and the pod IP.
async fn pod_with(
    cri: &mut Cri,
    daemon: &Daemon,
    logs: &Path,
    name: &str,
    script: &str,
    host_port: Option<i32>,
) -> (String, String, String) {
    let mut config = pod_config(name);
    config.port_mappings = host_port
        .map(|host_port| k8s_cri::v1::PortMapping {
            protocol: k8s_cri::v1::Protocol::Tcp as i32,
            container_port: 8080,
            host_port,
            host_ip: String::new(),
        })
        .into_iter()
        .collect();
    std::fs::create_dir_all(logs.join(name)).unwrap();
    config.log_directory = logs.join(name).display().to_string();
    config.dns_config = Some(DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["default.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}\n{}", daemon.log()))
        .into_inner()
        .pod_sandbox_id;
    let ctr = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: "docker.io/library/busybox:latest".into(),
                    ..Default::default()
                }),
                command: vec!["sh".into(), "-c".into(), script.into()],
                log_path: "app.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(config),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e:?}\n{}", daemon.log()))
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest {
        container_id: ctr.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer: {e:?}\n{}", daemon.log()));
    let ip = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .network
        .unwrap()
        .ip;
    (pod, ctr, ip)
}

async fn exec(cri: &mut Cri, ctr: &str, script: &str) -> (i32, String, String) {
    let out = cri
        .exec_sync(ExecSyncRequest {
            container_id: ctr.into(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 60,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    (
        out.exit_code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SERVER: &str = "while true; do echo pong | nc -l -p 8080; done";
const HOST_PORT: i32 = 18080;

/// Connects to `addr` and reads what the server says, retrying for a while.
async fn read_from(addr: (&str, u16)) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = String::new();
    for _ in 0..30 {
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                s.read_to_string(&mut got),
            )
            .await;
            if !got.is_empty() {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    got
}

/// This host's address on its default route.
fn node_ip() -> String {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "route", "get", "192.0.2.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == "src")
        .and_then(|_| words.next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no source address in {text:?}"))
}

#[tokio::test]
async fn pods_reach_each_other_and_the_node_reaches_them() {
    let data = tempfile::tempdir().unwrap();
    const BRIDGE: &str = "carae2e1";
    let conf = conf_dir(data.path(), BRIDGE, "10.233.1.0/24");
    let logs = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with_network(true, Some(conf.path())).await;
    let mut cri = daemon.runtime().await;
    let (pod_a, ctr_a, ip_a) = pod_with(
        &mut cri,
        &daemon,
        logs.path(),
        "net-a",
        SERVER,
        Some(HOST_PORT),
    )
    .await;
    let (pod_b, ctr_b, ip_b) =
        pod_with(&mut cri, &daemon, logs.path(), "net-b", SERVER, None).await;
    assert!(
        ip_a.starts_with("10.233.1.") && ip_b.starts_with("10.233.1."),
        "{ip_a} {ip_b}"
    );
    assert_ne!(ip_a, ip_b);

    // The guest's interface carries the pod IP; DNS is the CRI DNSConfig.
    let (_, addrs, _) = exec(&mut cri, &ctr_a, "ip -o addr; ip route").await;
    assert!(addrs.contains(&format!("{ip_a}/24")), "{addrs}");
    let (_, resolv, _) = exec(&mut cri, &ctr_a, "cat /etc/resolv.conf").await;
    assert_eq!(
        resolv,
        "nameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:5\n"
    );

    // Pod to pod over TCP, both ways (retried while the servers start).
    for (from, to) in [(&ctr_b, &ip_a), (&ctr_a, &ip_b)] {
        let script = format!(
            "for i in $(seq 1 30); do nc -w 3 {to} 8080 </dev/null && exit 0; sleep 1; done; exit 1"
        );
        let (code, out, err) = exec(&mut cri, from, &script).await;
        assert_eq!((code, out.trim()), (0, "pong"), "to {to}: {err}\n{addrs}");
    }

    // The node reaches a pod's server by pod IP, and through its hostPort
    // (portmap's DNAT on the node's own address).
    assert_eq!(read_from((ip_a.as_str(), 8080)).await.trim(), "pong");
    let node = node_ip();
    let via_host_port = read_from((node.as_str(), HOST_PORT as u16)).await;
    assert_eq!(
        via_host_port.trim(),
        "pong",
        "hostPort {HOST_PORT} on {node}"
    );

    // The traffic shows in pod A's stats and metrics: its eth0's counters.
    let stats = cri
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod_a.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let eth0 = stats
        .linux
        .unwrap()
        .network
        .expect("network stats")
        .default_interface
        .unwrap();
    assert_eq!(eth0.name, "eth0");
    let rx = eth0.rx_bytes.unwrap().value;
    let tx = eth0.tx_bytes.unwrap().value;
    // At least the node's and pod B's requests in, and "pong" twice out.
    assert!(rx > 200 && tx > 200, "{rx} {tx}");
    let metrics = cri
        .list_pod_sandbox_metrics(ListPodSandboxMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pod_metrics;
    let of_a = metrics.iter().find(|m| m.pod_sandbox_id == pod_a).unwrap();
    let rx_metric = of_a
        .metrics
        .iter()
        .find(|m| m.name == "container_network_receive_bytes_total")
        .unwrap_or_else(|| panic!("{of_a:?}"));
    assert_eq!(rx_metric.label_values, [pod_a.as_str(), "POD", "", "eth0"]);
    assert!(rx_metric.value.as_ref().unwrap().value >= rx);

    for pod in [pod_a, pod_b] {
        cri.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
        cri.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    }
    assert!(allocations(data.path()).is_empty());
    let left = std::fs::read_dir(daemon.dir().join("netns"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "netns left");
    let _ = std::process::Command::new("ip")
        .args(["link", "del", BRIDGE])
        .status();
}

/// The ids of the warm VMs on record and whether each has its processes
/// recorded yet (`vm`), from the daemon's `state/warm`.
fn warm_vms(daemon: &Daemon) -> Vec<(String, bool)> {
    let Ok(entries) = std::fs::read_dir(daemon.state_dir().join("warm")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".json")?.to_owned();
            let record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            Some((id, !record["vm"].is_null()))
        })
        .collect()
}

/// Waits until the daemon has a ready warm VM other than `not`: its record
/// is there and the log says its agent answered. Returns its id.
async fn ready_warm_vm(daemon: &Daemon, not: &[&str]) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let log = daemon.log();
        let ready = warm_vms(daemon).into_iter().find(|(id, has_vm)| {
            *has_vm
                && !not.contains(&id.as_str())
                && log
                    .lines()
                    .any(|l| l.contains("warm VM ready") && l.contains(id.as_str()))
        });
        if let Some((id, _)) = ready {
            return id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no warm VM became ready: {:?}\n{log}",
            warm_vms(daemon)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Waits until no process has `dir` on its command line.
async fn gone(dir: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !carapace_e2e::daemon::processes_mentioning(dir).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "processes of {} still run",
            dir.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `vm.warm_pool = 1`: a pod without limits gets the VM booted ahead for it,
/// with its network joined afterwards (the guest interface takes eth0's
/// MAC and the pod IP, and the node reaches it); a replacement boots; a pod
/// with limits boots its own VM. Warm VMs go when the daemon stops, and
/// those of a daemon that crashed are removed by the next one.
#[tokio::test]
async fn warm_vms_become_pods_and_never_outlive_the_daemon() {
    let data = tempfile::tempdir().unwrap();
    const BRIDGE: &str = "carae2e2";
    let conf = conf_dir(data.path(), BRIDGE, "10.233.2.0/24");
    let logs = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start_with_network_vm(true, Some(conf.path()), "warm_pool = 1").await;
    let warm = ready_warm_vm(&daemon, &[]).await;
    let warm_netns = daemon.dir().join("netns").join(&warm);
    assert!(warm_netns.exists(), "the warm VM's namespace");
    assert!(
        allocations(data.path()).is_empty(),
        "no address before a pod"
    );

    let mut cri = daemon.runtime().await;
    let (pod, ctr, ip) = pod_with(&mut cri, &daemon, logs.path(), "warm-a", SERVER, None).await;
    assert_eq!(pod, warm, "the pod got the warm VM");
    assert!(ip.starts_with("10.233.2."), "{ip}");
    // The guest interface carries eth0's MAC (not the warm VM's own) and
    // the pod IP; the node reaches the pod's server by its IP.
    let eth0 = in_netns(&warm_netns, &["ip", "-o", "link", "show", "dev", "eth0"]);
    let eth0 = String::from_utf8_lossy(&eth0.stdout).into_owned();
    let eth0_mac = eth0
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {eth0:?}"))
        .to_owned();
    let (code, guest, err) = exec(&mut cri, &ctr, "ip -o link; ip -o addr").await;
    assert_eq!(code, 0, "{err}");
    assert!(guest.contains(&eth0_mac), "{eth0_mac} not in\n{guest}");
    assert!(guest.contains(&format!("{ip}/24")), "{guest}");
    assert_eq!(read_from((ip.as_str(), 8080)).await.trim(), "pong");

    // A replacement boots; a pod with a memory limit does not take it.
    let next = ready_warm_vm(&daemon, &[&warm]).await;
    let mut limited = pod_config("warm-limited");
    limited.linux = Some(k8s_cri::v1::LinuxPodSandboxConfig {
        resources: Some(k8s_cri::v1::LinuxContainerResources {
            memory_limit_in_bytes: 200 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let other = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(limited),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}\n{}", daemon.log()))
        .into_inner()
        .pod_sandbox_id;
    assert_ne!(other, next);
    assert_eq!(warm_vms(&daemon).len(), 1, "{:?}", warm_vms(&daemon));
    for pod in [pod, other] {
        cri.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
        cri.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    }
    assert!(allocations(data.path()).is_empty());

    // Stopping the daemon stops its warm VM and removes all of it.
    daemon.stop();
    let next_dir = daemon.run_dir().join(&next[..16]);
    gone(&next_dir).await;
    assert!(warm_vms(&daemon).is_empty(), "{:?}", warm_vms(&daemon));
    assert!(!next_dir.exists() && !daemon.dir().join("netns").join(&next).exists());

    // A crashed daemon's warm VM is removed by the next daemon.
    daemon.start_again().await;
    let crashed = ready_warm_vm(&daemon, &[&warm, &next]).await;
    daemon.kill();
    let crashed_dir = daemon.run_dir().join(&crashed[..16]);
    assert!(!carapace_e2e::daemon::processes_mentioning(&crashed_dir).is_empty());
    daemon.start_again().await;
    gone(&crashed_dir).await;
    let fresh = ready_warm_vm(&daemon, &[&warm, &next, &crashed]).await;
    assert_eq!(warm_vms(&daemon), vec![(fresh.clone(), true)]);
    assert!(!crashed_dir.exists());

    // A warm VM killed from outside is not given to a pod: the pod boots
    // its own VM and the dead one is removed.
    let fresh_dir = daemon.run_dir().join(&fresh[..16]);
    carapace_e2e::daemon::kill_processes_mentioning(&fresh_dir);
    gone(&fresh_dir).await;
    let mut cri = daemon.runtime().await;
    let (pod, _, ip) = pod_with(&mut cri, &daemon, logs.path(), "warm-b", SERVER, None).await;
    assert!(pod != fresh && ip.starts_with("10.233.2."), "{pod} {ip}");
    assert!(!fresh_dir.exists() && !daemon.dir().join("netns").join(&fresh).exists());
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
    daemon.stop();
    let left = std::fs::read_dir(daemon.dir().join("netns"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "netns left");
    assert!(carapace_e2e::daemon::processes_mentioning(&daemon.run_dir()).is_empty());
    let _ = std::process::Command::new("ip")
        .args(["link", "del", BRIDGE])
        .status();
}
