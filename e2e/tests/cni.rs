//! Pod networking through CNI, as kubelet drives it: Debian's
//! containernetworking-plugins (bridge + host-local + loopback + portmap) on
//! a bridge and an address range of this test's own.

use std::path::Path;

use carapace_e2e::daemon::Daemon;
use k8s_cri::v1::{
    PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest,
    StatusRequest, StopPodSandboxRequest,
};
use tonic::Code;

const BRIDGE: &str = "carae2e0";
const SUBNET: &str = "10.233.0.0/24";

fn conf_dir(data_dir: &Path) -> tempfile::TempDir {
    let _ = std::process::Command::new("ip")
        .args(["link", "del", BRIDGE])
        .stderr(std::process::Stdio::null())
        .status();
    let dir = tempfile::tempdir().unwrap();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "carapace-e2e",
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "dataDir": data_dir,
                      "ranges": [[{"subnet": SUBNET}]],
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
    let conf = conf_dir(data.path());
    let daemon = Daemon::start_with_network(false, Some(conf.path())).await;
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
