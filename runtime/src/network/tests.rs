//! Pod networks with Debian's CNI plugins (bridge, host-local, loopback),
//! as root.

use std::path::Path;

use super::*;

/// A conf dir with a bridge + host-local + loopback list whose bridge and
/// address range are this test's own, so tests do not meet.
fn conf_dir(bridge: &str, subnet: &str, data_dir: &Path) -> tempfile::TempDir {
    // A bridge left by an earlier, failed run would keep its address.
    let _ = std::process::Command::new("ip")
        .args(["link", "del", bridge])
        .stderr(std::process::Stdio::null())
        .status();
    let dir = tempfile::tempdir().unwrap();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("test-{bridge}"),
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "dataDir": data_dir,
                      "ranges": [[{"subnet": subnet}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "loopback"}
        ]
    });
    std::fs::write(dir.path().join("10-test.conflist"), conf.to_string()).unwrap();
    dir
}

fn network(conf_dir: &Path, netns_dir: &Path) -> Network {
    Network::new(NetworkConfig {
        cni_conf_dir: conf_dir.to_owned(),
        netns_dir: netns_dir.to_owned(),
        ..NetworkConfig::default()
    })
}

fn pod(id: &str) -> PodIdentity {
    PodIdentity {
        sandbox_id: id.into(),
        name: format!("pod-{id}"),
        namespace: "default".into(),
        uid: format!("uid-{id}"),
    }
}

fn allocations(data_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("test-cnitest0")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect()
}

#[tokio::test]
async fn setup_assigns_addresses_and_teardown_releases_everything() {
    assert!(nix::unistd::geteuid().is_root(), "CNI tests run as root");
    let data = tempfile::tempdir().unwrap();
    let conf = conf_dir("cnitest0", "10.231.0.0/24", data.path());
    let nsdir = tempfile::tempdir().unwrap();
    let net = network(conf.path(), nsdir.path());
    assert_eq!(net.conf().unwrap().name, "test-cnitest0");

    let a = net.setup(&pod("aaaa"), BTreeMap::new()).await.unwrap();
    let b = net.setup(&pod("bbbb"), BTreeMap::new()).await.unwrap();
    let addr = |n: &PodNetwork| n.result.ips[0].address.clone();
    assert!(addr(&a).starts_with("10.231.0."), "{:?}", a.result);
    assert_ne!(addr(&a), addr(&b));
    assert_eq!(a.result.ips[0].gateway.as_deref(), Some("10.231.0.1"));
    let eth0 = a
        .result
        .interfaces
        .iter()
        .find(|i| i.name == POD_IFNAME && !i.sandbox.is_empty())
        .expect("eth0 in the pod namespace");
    assert_eq!(eth0.mac.len(), 17);
    // eth0 really is in the pod's namespace, with the address.
    let ip = addr(&a);
    let seen = netns::run_in(&a.netns, move || {
        let out = std::process::Command::new("ip")
            .args(["-o", "addr", "show", "dev", POD_IFNAME])
            .output()
            .map_err(|source| NetworkError::Io {
                what: "ip addr".into(),
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .unwrap();
    assert!(seen.contains(&ip), "{seen}");
    assert_eq!(allocations(data.path()).len(), 2);

    // The record survives a round trip (a daemon restart) and still tears
    // down.
    let a: PodNetwork = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
    net.teardown(&a).await.unwrap();
    assert!(!a.netns.exists());
    net.teardown(&a).await.unwrap();
    assert_eq!(allocations(data.path()).len(), 1);

    // With its namespace already gone, DEL still releases the address.
    netns::remove(&b.netns).unwrap();
    net.teardown(&b).await.unwrap();
    assert!(allocations(data.path()).is_empty());
    let _ = std::process::Command::new("ip")
        .args(["link", "del", "cnitest0"])
        .status();
}

#[tokio::test]
async fn a_failing_add_leaves_nothing_behind() {
    assert!(nix::unistd::geteuid().is_root(), "CNI tests run as root");
    let data = tempfile::tempdir().unwrap();
    // Room for one pod (.1 is the gateway): the second ADD fails in
    // host-local, after the bridge plugin created its veth pair.
    let conf = conf_dir("cnitest1", "10.232.0.0/30", data.path());
    let nsdir = tempfile::tempdir().unwrap();
    let net = network(conf.path(), nsdir.path());
    let first = net.setup(&pod("eeee"), BTreeMap::new()).await.unwrap();
    let err = net.setup(&pod("cccc"), BTreeMap::new()).await.unwrap_err();
    assert!(matches!(err, NetworkError::Plugin { .. }), "{err}");
    let left = nsdir.path().join("cccc");
    assert!(!left.exists(), "{err}");
    net.teardown(&first).await.unwrap();
    let _ = std::process::Command::new("ip")
        .args(["link", "del", "cnitest1"])
        .status();
}

#[tokio::test]
async fn no_config_is_a_clear_error() {
    let empty = tempfile::tempdir().unwrap();
    let net = network(empty.path(), empty.path());
    let err = net.setup(&pod("dddd"), BTreeMap::new()).await.unwrap_err();
    assert!(matches!(err, NetworkError::NoConfig(_)));
    assert!(err.to_string().contains("no CNI network config"), "{err}");
}
