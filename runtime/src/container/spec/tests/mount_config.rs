//! Default mounts, sandbox files and CRI mounts.

use super::*;

fn mount_with(path: &str, source: &str, readonly: bool, propagation: i32) -> GuestMount {
    GuestMount {
        container_path: path.into(),
        guest_source: source.into(),
        readonly,
        propagation,
    }
}

fn destinations(spec: &Value) -> Vec<String> {
    spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["destination"].as_str().unwrap().to_owned())
        .collect()
}

fn find_mount<'v>(spec: &'v Value, dest: &str) -> &'v Value {
    spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == dest)
        .unwrap_or_else(|| panic!("no mount at {dest}"))
}

#[test]
fn default_mounts_and_sandbox_files() {
    let c = config();
    let img = image();
    let mut inp = input(&c, &img);
    inp.sandbox_files = SandboxFiles {
        hostname: "/run/carapace/sandbox/hostname".into(),
        resolv_conf: "/run/carapace/sandbox/resolv.conf".into(),
        ..Default::default()
    };
    let (_, spec) = request(&inp);
    assert_eq!(
        destinations(&spec),
        [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/sys",
            "/sys/fs/cgroup",
            "/etc/hostname",
            "/etc/resolv.conf"
        ]
    );
    let cg = find_mount(&spec, "/sys/fs/cgroup");
    assert_eq!(cg["type"], "cgroup2");
    assert!(strings(&cg["options"]).contains(&"ro".to_owned()));
    let hostname = find_mount(&spec, "/etc/hostname");
    assert_eq!(hostname["type"], "bind");
    assert_eq!(hostname["source"], "/run/carapace/sandbox/hostname");
    assert_eq!(strings(&hostname["options"]), ["rbind", "rprivate", "rw"]);

    // A read-only rootfs makes them read-only; a CRI mount of the same
    // path replaces them.
    let c = with_sc(|sc| sc.readonly_rootfs = true);
    let mut inp = input(&c, &img);
    inp.sandbox_files = SandboxFiles {
        hostname: "/s/hostname".into(),
        resolv_conf: "/s/resolv.conf".into(),
        hosts: "/s/hosts".into(),
        ..Default::default()
    };
    inp.mounts = vec![mount_with("/etc/hosts", "/kubelet/etc-hosts", false, 0)];
    let (_, spec) = request(&inp);
    assert_eq!(
        strings(&find_mount(&spec, "/etc/hostname")["options"])[2],
        "ro"
    );
    assert_eq!(
        find_mount(&spec, "/etc/hosts")["source"],
        "/kubelet/etc-hosts"
    );
    assert_eq!(
        destinations(&spec)
            .iter()
            .filter(|d| *d == "/etc/hosts")
            .count(),
        1
    );
    assert_eq!(
        spec["root"],
        json!({"path": "/run/carapace/rootfs/c1", "readonly": true})
    );
}

#[test]
fn cri_mounts_bind_with_their_flags_in_depth_order() {
    let c = config();
    let img = image();
    let mut inp = input(&c, &img);
    inp.mounts = vec![
        mount_with("/data/cache/", "/guest/v2", false, 1),
        mount_with("/data", "/guest/v1", true, 0),
        mount_with("/dev/termination-log", "/guest/t", false, 0),
    ];
    let (_, spec) = request(&inp);
    let dests = destinations(&spec);
    let tail: Vec<&str> = dests[7..].iter().map(String::as_str).collect();
    // Stable: equal depths keep the CRI order.
    assert_eq!(tail, ["/data", "/data/cache", "/dev/termination-log"]);
    assert_eq!(
        strings(&find_mount(&spec, "/data")["options"]),
        ["rbind", "rprivate", "ro"]
    );
    assert_eq!(
        strings(&find_mount(&spec, "/data/cache")["options"]),
        ["rbind", "rslave", "rw"]
    );
    assert_eq!(spec["linux"]["rootfsPropagation"], "rslave");

    inp.mounts = vec![
        mount_with("/a", "/g/a", false, 2),
        mount_with("/b", "/g/b", false, 1),
    ];
    let (_, spec) = request(&inp);
    assert_eq!(strings(&find_mount(&spec, "/a")["options"])[1], "rshared");
    assert_eq!(spec["linux"]["rootfsPropagation"], "rshared");

    // A supplied /dev replaces every default mount under it.
    inp.mounts = vec![mount_with("/dev", "/guest/dev", false, 0)];
    let (_, spec) = request(&inp);
    assert_eq!(
        destinations(&spec),
        ["/proc", "/sys", "/sys/fs/cgroup", "/dev"]
    );
}

fn with_ipc(ipc: cri::NamespaceMode, readonly_rootfs: bool) -> cri::ContainerConfig {
    with_sc(|sc| {
        sc.readonly_rootfs = readonly_rootfs;
        sc.namespace_options = Some(NamespaceOption {
            ipc: ipc as i32,
            ..Default::default()
        })
    })
}

fn shm_mounts(spec: &Value) -> Vec<&Value> {
    spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["destination"] == "/dev/shm")
        .collect()
}

#[test]
fn dev_shm_is_the_pods_in_the_pod_ipc_namespace() {
    let img = image();
    let pod_shm = SandboxFiles {
        shm: "/run/carapace/shm".into(),
        ..Default::default()
    };
    // Pod IPC mode (CRI's default, what kubelet sends), read-only rootfs or
    // not: the pod's tmpfs, bound writable with its restrictions.
    for readonly in [false, true] {
        let c = with_ipc(cri::NamespaceMode::Pod, readonly);
        let mut inp = input(&c, &img);
        inp.sandbox_files = pod_shm.clone();
        let (req, spec) = request(&inp);
        assert_eq!(req.ipc_mode, NamespaceMode::Pod as i32);
        let shm = shm_mounts(&spec);
        assert_eq!(shm.len(), 1, "{shm:?}");
        assert_eq!(shm[0]["type"], "bind");
        assert_eq!(shm[0]["source"], "/run/carapace/shm");
        assert_eq!(
            strings(&shm[0]["options"]),
            ["rbind", "rprivate", "nosuid", "nodev", "noexec", "rw"]
        );
        // After the /dev tmpfs it lands on.
        let dests = destinations(&spec);
        let pos = |d: &str| dests.iter().position(|x| x == d).unwrap();
        assert!(pos("/dev") < pos("/dev/shm"), "{dests:?}");
    }
    let c = config();
    let mut inp = input(&c, &img);
    inp.sandbox_files = pod_shm.clone();
    assert_eq!(shm_mounts(&request(&inp).1)[0]["type"], "bind");

    // An IPC namespace of its own: a tmpfs of its own.
    let tmpfs = |spec: &Value| {
        let shm = shm_mounts(spec);
        assert_eq!(shm.len(), 1, "{shm:?}");
        assert_eq!(shm[0]["type"], "tmpfs");
        assert!(strings(&shm[0]["options"]).contains(&"size=65536k".to_owned()));
    };
    let c = with_ipc(cri::NamespaceMode::Container, false);
    let mut inp = input(&c, &img);
    inp.sandbox_files = pod_shm.clone();
    let (req, spec) = request(&inp);
    assert_eq!(req.ipc_mode, NamespaceMode::Container as i32);
    tmpfs(&spec);
    // An agent that made no pod /dev/shm: a tmpfs per container, as before.
    let c = with_ipc(cri::NamespaceMode::Pod, false);
    tmpfs(&request(&input(&c, &img)).1);
    // A CRI mount of /dev/shm wins (containerd's `isInCRIMounts`).
    let mut inp = input(&c, &img);
    inp.sandbox_files = pod_shm.clone();
    inp.mounts = vec![mount_with("/dev/shm", "/guest/big-shm", false, 0)];
    let (_, spec) = request(&inp);
    let shm = shm_mounts(&spec);
    assert_eq!(shm.len(), 1, "{shm:?}");
    assert_eq!(shm[0]["source"], "/guest/big-shm");
    // A path the agent would not answer is refused.
    inp.mounts.clear();
    inp.sandbox_files.shm = "run/shm".into();
    let err = agent_request(&inp).unwrap_err().to_string();
    assert!(err.starts_with("sandbox /dev/shm:"), "{err}");
}

#[test]
fn bad_mounts_name_the_field() {
    let c = config();
    let img = image();
    for (m, want) in [
        (
            mount_with("data", "/g", false, 0),
            "mounts[0].container_path:",
        ),
        (
            mount_with("/a/../etc", "/g", false, 0),
            "mounts[0].container_path:",
        ),
        (mount_with("/", "/g", false, 0), "mounts[0].container_path:"),
        (mount_with("/a", "g", false, 0), "mounts[0] guest source:"),
        (mount_with("/a", "/g", false, 7), "mounts[0].propagation:"),
    ] {
        let mut inp = input(&c, &img);
        inp.mounts = vec![m];
        let err = agent_request(&inp).unwrap_err().to_string();
        assert!(err.starts_with(want), "{err}");
    }
}

#[test]
fn mounts_asking_for_what_is_not_done_yet_are_refused() {
    let with = |m: cri::Mount| cri::ContainerConfig {
        mounts: vec![
            cri::Mount {
                container_path: "/ok".into(),
                host_path: "/tmp".into(),
                ..Default::default()
            },
            m,
        ],
        ..config()
    };
    let plain = cri::Mount {
        container_path: "/data".into(),
        host_path: "/srv".into(),
        readonly: true,
        ..Default::default()
    };
    assert!(check_mounts(&with(plain.clone())).is_ok());
    let cases = [
        (
            cri::Mount {
                recursive_read_only: true,
                ..plain.clone()
            },
            "mounts[1].recursive_read_only: ",
        ),
        (
            cri::Mount {
                uid_mappings: vec![cri::IdMapping {
                    host_id: 1000,
                    container_id: 0,
                    length: 1,
                }],
                ..plain.clone()
            },
            "mounts[1].uidMappings: ",
        ),
        (
            cri::Mount {
                image: Some(cri::ImageSpec {
                    image: "busybox".into(),
                    ..Default::default()
                }),
                host_path: String::new(),
                ..plain.clone()
            },
            "mounts[1].image: ",
        ),
    ];
    for (m, prefix) in cases {
        let err = check_mounts(&with(m)).unwrap_err();
        assert!(matches!(err, SpecError::Unsupported { .. }), "{err}");
        assert!(err.to_string().starts_with(prefix), "{err}");
    }
}
