use std::time::Duration;

use super::*;

#[path = "../../../../vmm/tests/common/mod.rs"]
mod payloads;

fn spec(dir: &Path) -> VmSpec {
    VmSpec {
        kernel: dir.join("vmlinux"),
        initrd: dir.join("initrd"),
        vcpus: 1,
        mem_mib: 64,
        extra_cmdline: String::new(),
        run_dir: dir.to_owned(),
        shared_dir: None,
        network: None,
    }
}

fn driver(vmm: PathBuf) -> BuiltinDriver {
    BuiltinDriver {
        vmm,
        fs_backend: "virtiofsd".into(),
        jail_id_base: None,
        free_page_reporting: false,
    }
}

/// `carapace-vmm` as built next to this test binary (`cargo build --bins`;
/// the test command builds it first). Fails, never skips, without it.
fn built_vmm() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // <target>/<profile>/deps/<test binary>
    let vmm = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join(VMM_BINARY);
    assert!(
        vmm.is_file(),
        "{} is missing: build it first (cargo build --workspace --bins)",
        vmm.display()
    );
    vmm
}

#[test]
fn config_is_one_the_vmm_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path());
    std::fs::write(&s.kernel, payloads::elf_with(payloads::HALT_FOREVER)).unwrap();
    std::fs::write(&s.initrd, b"initrd").unwrap();
    let config = driver("carapace-vmm".into()).vmm_config(&s, None);
    assert_eq!(config["cmdline"], s.cmdline());
    assert_eq!(config["vsock"]["uds_path"], json!(s.vsock_socket()));
    assert_eq!(config["serial"]["file"], json!(s.console_log()));
    assert!(config.get("fs").is_none() && config.get("net").is_none());
    assert_eq!(config["free_page_reporting"], false);
    // The VMM's own parser and validation: field names and bounds agree.
    let parsed: carapace_vmm::config::VmConfig = serde_json::from_value(config).unwrap();
    parsed
        .validate()
        .expect("the VMM accepts the runtime's config");
    let config = driver("carapace-vmm".into())
        .with_free_page_reporting(true)
        .vmm_config(&s, None);
    let parsed: carapace_vmm::config::VmConfig = serde_json::from_value(config).unwrap();
    assert!(parsed.free_page_reporting);
    // Jailed: the run directory is the root, every socket is inside it.
    let config = driver("carapace-vmm".into()).vmm_config(&s, Some(2_000_000_007));
    assert_eq!(
        config["jail"],
        json!({"root": dir.path(), "uid": 2_000_000_007u32, "gid": 2_000_000_007u32})
    );
    let parsed: carapace_vmm::config::VmConfig = serde_json::from_value(config).unwrap();
    parsed
        .validate()
        .and_then(|valid| valid.with_jail_paths())
        .expect("the VMM accepts the runtime's jailed config");
}

#[test]
fn jail_ids_skip_ids_in_use_and_wrap_within_the_range() {
    let base = 2_000_000_000;
    let next = AtomicU32::new(0);
    let in_use = HashSet::from([base, base + 1, base + 3]);
    assert_eq!(next_free_id(base, &next, &in_use), Some(base + 2));
    assert_eq!(next_free_id(base, &next, &in_use), Some(base + 4));
    // Near the end of the range: back to its start, never past it.
    let next = AtomicU32::new(JAIL_IDS - 1);
    assert_eq!(
        next_free_id(base, &next, &HashSet::new()),
        Some(base + JAIL_IDS - 1)
    );
    assert_eq!(next_free_id(base, &next, &in_use), Some(base + 2));
    // Every id taken: none.
    let all: HashSet<u32> = (base..base + JAIL_IDS).collect();
    assert_eq!(next_free_id(base, &AtomicU32::new(5), &all), None);
    // This test's own ids are in use.
    let own = nix::unistd::getuid().as_raw();
    assert!(ids_in_use().contains(&own));
}

#[test]
fn config_wires_the_share_and_the_pod_network() {
    let s = VmSpec {
        shared_dir: Some("/run/pods/p1/shared".into()),
        network: Some(crate::network::tap::VmNetwork {
            netns: "/run/carapace/netns/p1".into(),
            tap: "tap0".into(),
            mac: "0a:58:0a:00:00:05".into(),
            mtu: 1450,
        }),
        ..spec(Path::new("/run/vm1"))
    };
    let config = driver("carapace-vmm".into()).vmm_config(&s, None);
    assert_eq!(
        config["fs"],
        json!([{"tag": "carapace", "socket": "/run/vm1/virtiofs.sock",
                "num_request_queues": 1, "queue_size": 1024}])
    );
    assert_eq!(
        config["net"],
        json!([{"tap": "tap0", "mac": "0a:58:0a:00:00:05", "mtu": 1450}])
    );
    // The share's path is virtiofsd's business, not the VMM's.
    assert!(!config.to_string().contains("/run/pods/p1/shared"));
    // The VMM's own types take it (validation needs the files; see above).
    let parsed: carapace_vmm::config::VmConfig = serde_json::from_value(config).unwrap();
    assert_eq!(parsed.net[0].mac_bytes(), Some([0x0a, 0x58, 0x0a, 0, 0, 5]));
    assert_eq!(parsed.net[0].mtu, Some(1450));
    assert_eq!(parsed.fs[0].tag, SHARED_FS_TAG);
    // A warm VM's tap has no MTU yet: the guest gets no MTU limit.
    let mut warm = s.clone();
    warm.network.as_mut().unwrap().mtu = 0;
    let config = driver("carapace-vmm".into()).vmm_config(&warm, None);
    let parsed: carapace_vmm::config::VmConfig = serde_json::from_value(config).unwrap();
    assert_eq!(parsed.net[0].mtu, None);
}

/// The real VMM on this host's KVM, with a payload that halts forever in
/// place of a Linux guest (this host cannot boot Linux; the node tests do):
/// the driver starts it, it runs with its sockets, and stopping it leaves
/// neither process nor socket.
#[tokio::test]
async fn starts_and_stops_the_vmm() {
    start_and_stop(None).await;
}

/// The same, jailed: the VMM (the supervisor's child) runs as the jail's
/// id, the readiness socket is the jail's, and the daemon finds the child
/// to place it in the pod's cgroup.
#[tokio::test]
async fn starts_and_stops_the_vmm_in_its_jail() {
    let (handle, id) = start_and_stop(Some(2_100_000_000)).await;
    let id = id.unwrap();
    assert!((2_100_000_000..2_100_000_000 + JAIL_IDS).contains(&id));
    assert!(!handle.is_running());
}

/// Starts the payload VM (jailed from `jail_id_base` if given), checks it
/// runs, stops it; returns its handle and jail id.
async fn start_and_stop(jail_id_base: Option<u32>) -> (VmHandle, Option<u32>) {
    payloads::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path());
    std::fs::write(&s.kernel, payloads::elf_with(payloads::HALT_FOREVER)).unwrap();
    std::fs::write(&s.initrd, b"initrd").unwrap();
    let driver = BuiltinDriver {
        jail_id_base,
        ..driver(built_vmm())
    };
    let vm = driver.start(&s).await.unwrap();
    let api = vm.handle.api_socket.clone().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(api.exists() && std::fs::read(vm.console_log()).is_ok_and(|c| c == b"H")) {
        assert!(
            vm.handle.is_running(),
            "carapace-vmm exited: {:?}",
            std::fs::read_to_string(dir.path().join(VMM_LOG))
        );
        assert!(Instant::now() < deadline, "the payload never wrote its 'H'");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(vm.vsock_socket().exists() && ready_socket(&s).exists());
    let handle = vm.handle.clone();
    assert_eq!(handle.pids(), vec![handle.monitor.pid]);
    let owner = |path: &Path| std::os::unix::fs::MetadataExt::uid(&path.metadata().unwrap());
    let jail_id = jail_id_base.map(|_| owner(&ready_socket(&s)));
    match jail_id {
        None => assert!(handle.monitor.children().is_empty()),
        Some(id) => {
            // The supervisor's one child is the VMM, running as the jail's id.
            let children = handle.monitor.children();
            assert_eq!(children.len(), 1, "{children:?}");
            let status = std::fs::read_to_string(format!("/proc/{}/status", children[0])).unwrap();
            let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            assert!(
                uid_line
                    .split_whitespace()
                    .skip(1)
                    .all(|u| u == id.to_string()),
                "{uid_line}"
            );
            assert_eq!(owner(dir.path()), id, "the VMM owns its root");
        }
    }
    vm.stop().await;
    assert!(!handle.is_running());
    assert!(!api.exists() && !handle.vsock_socket.exists());
    (handle, jail_id)
}

#[tokio::test]
async fn a_config_the_vmm_refuses_fails_the_start_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path());
    // Not an ELF: validation passes (a file), the VMM refuses to load it.
    std::fs::write(&s.kernel, b"not a kernel").unwrap();
    std::fs::write(&s.initrd, b"initrd").unwrap();
    let vm = driver(built_vmm()).start(&s).await.unwrap();
    let err = vm.wait_agent(Duration::from_secs(10)).await.unwrap_err();
    assert!(!vm.handle.is_running(), "{err}");
    let log = std::fs::read_to_string(dir.path().join(VMM_LOG)).unwrap();
    assert!(log.contains("kernel") || log.contains("ELF"), "{log}");
    vm.stop().await;
}
