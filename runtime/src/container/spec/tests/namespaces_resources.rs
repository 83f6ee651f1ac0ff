//! Namespaces, resources, OOM score, sysctls, hostname and annotations.

use super::*;

fn with_ns(pid: cri::NamespaceMode, ipc: cri::NamespaceMode) -> cri::ContainerConfig {
    with_sc(|sc| {
        sc.namespace_options = Some(NamespaceOption {
            pid: pid as i32,
            ipc: ipc as i32,
            ..Default::default()
        })
    })
}

#[test]
fn namespace_modes_map_or_are_refused() {
    use cri::NamespaceMode as M;
    let img = image();
    let (req, _) = request(&input(&config(), &img));
    assert_eq!(
        (req.pid_mode, req.ipc_mode),
        (NamespaceMode::Pod as i32, NamespaceMode::Pod as i32)
    );
    let c = with_ns(M::Container, M::Pod);
    let (req, _) = request(&input(&c, &img));
    assert_eq!(req.pid_mode, NamespaceMode::Container as i32);
    assert_eq!(req.ipc_mode, NamespaceMode::Pod as i32);

    let err = error_for(&with_ns(M::Node, M::Pod), &img);
    assert!(
        err.starts_with(
            "linux.security_context.namespace_options.pid: NODE: the pod runs in its own VM"
        ),
        "{err}"
    );
    assert!(error_for(&with_ns(M::Pod, M::Node), &img).contains("namespace_options.ipc: NODE"));
    // TARGET: the target's id goes to the agent; without one it is refused.
    let err = match agent_request(&input(&with_ns(M::Target, M::Pod), &img)) {
        Err(e @ SpecError::Invalid { .. }) => e.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(
        err.starts_with("linux.security_context.namespace_options.target_id: pid mode TARGET"),
        "{err}"
    );
    let c = with_sc(|sc| {
        sc.namespace_options = Some(NamespaceOption {
            pid: M::Target as i32,
            ipc: M::Pod as i32,
            target_id: "abc".into(),
            ..Default::default()
        })
    });
    assert_eq!(pid_target(&c), "abc");
    let (req, _) = request(&input(&c, &img));
    assert_eq!(req.pid_mode, NamespaceMode::Target as i32);
    assert_eq!(req.pid_target_container_id, "abc");
    let (req, _) = request(&input(&config(), &img));
    assert_eq!(req.pid_target_container_id, "");
    assert_eq!(pid_target(&config()), "");
    assert!(error_for(&with_ns(M::Pod, M::Target), &img).contains("only defined for the pid"));
    let c = with_sc(|sc| {
        sc.namespace_options = Some(NamespaceOption {
            network: M::Node as i32,
            ..Default::default()
        })
    });
    assert!(error_for(&c, &img).contains("namespace_options.network: NODE"));
    let c = with_sc(|sc| {
        sc.namespace_options = Some(NamespaceOption {
            userns_options: Some(cri::UserNamespace {
                mode: M::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
    });
    assert!(error_for(&c, &img).contains("user namespaces"));
}

#[test]
fn resources_and_oom_score() {
    let c = cri::ContainerConfig {
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 50_000,
                cpu_shares: 512,
                memory_limit_in_bytes: 64 << 20,
                oom_score_adj: 999,
                cpuset_cpus: "0-1,3".into(),
                cpuset_mems: "0".into(),
                hugepage_limits: vec![cri::HugepageLimit {
                    page_size: "2MB".into(),
                    limit: 0,
                }],
                unified: [("memory.high".to_string(), "60000000".to_string())]
                    .into_iter()
                    .collect(),
                memory_swap_limit_in_bytes: 0,
            }),
            security_context: None,
        }),
        ..config()
    };
    let spec = spec_for(&c, &image());
    assert_eq!(
        spec["linux"]["resources"],
        json!({
            "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1,3", "mems": "0"},
            "memory": {"limit": 67108864, "swap": 67108864},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
            "unified": {"memory.high": "60000000"},
        })
    );
    assert_eq!(spec["process"]["oomScoreAdj"], 999);

    // Only what is set: the agent needs cgroups for any section.
    let only_oom = cri::ContainerConfig {
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                oom_score_adj: -997,
                ..Default::default()
            }),
            security_context: None,
        }),
        ..config()
    };
    let spec = spec_for(&only_oom, &image());
    assert!(spec["linux"].get("resources").is_none());
    assert_eq!(spec["process"]["oomScoreAdj"], -997);
    assert!(spec_for(&config(), &image())["process"]
        .get("oomScoreAdj")
        .is_none());

    let res = |r: LinuxContainerResources| resources(Some(&r)).map_err(|e| e.to_string());
    let (r, _) = res(LinuxContainerResources {
        memory_limit_in_bytes: 100,
        memory_swap_limit_in_bytes: -1,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(r.unwrap()["memory"], json!({"limit": 100, "swap": -1}));
    for (bad, field) in [
        (
            LinuxContainerResources {
                oom_score_adj: 1001,
                ..Default::default()
            },
            "oom_score_adj",
        ),
        (
            LinuxContainerResources {
                memory_limit_in_bytes: 100,
                memory_swap_limit_in_bytes: 50,
                ..Default::default()
            },
            "memory_swap_limit_in_bytes",
        ),
        (
            LinuxContainerResources {
                cpuset_cpus: "0-a".into(),
                ..Default::default()
            },
            "cpuset_cpus",
        ),
        (
            LinuxContainerResources {
                cpu_shares: -2,
                ..Default::default()
            },
            "cpu_shares",
        ),
        (
            LinuxContainerResources {
                hugepage_limits: vec![cri::HugepageLimit {
                    page_size: "2MB/../x".into(),
                    limit: 0,
                }],
                ..Default::default()
            },
            "hugepage_limits",
        ),
        (
            LinuxContainerResources {
                unified: [("../x".to_string(), "1".to_string())]
                    .into_iter()
                    .collect(),
                ..Default::default()
            },
            "unified",
        ),
    ] {
        let err = res(bad).unwrap_err();
        assert!(
            err.starts_with(&format!("linux.resources.{field}:")),
            "{err}"
        );
    }
}

#[test]
fn ipc_sysctls_hostname_and_annotations() {
    let c = cri::ContainerConfig {
        annotations: [
            ("team".to_string(), "a".to_string()),
            (
                "io.kubernetes.cri.container-name".to_string(),
                "spoof".to_string(),
            ),
        ]
        .into_iter()
        .collect(),
        ..config()
    };
    let img = image();
    let mut inp = input(&c, &img);
    inp.pod_sysctls = [
        ("kernel.shm_rmid_forced", "1"),
        ("kernel/msgmax", "65536"),
        ("fs.mqueue.msg_max", "20"),
        ("net.ipv4.ip_local_port_range", "1024 65000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (req, spec) = request(&inp);
    assert_eq!(
        spec["linux"]["sysctl"],
        json!({"kernel.shm_rmid_forced": "1", "kernel.msgmax": "65536", "fs.mqueue.msg_max": "20"})
    );
    assert_eq!(spec["hostname"], "pod-a");
    assert_eq!(
        spec["annotations"],
        json!({
            "team": "a",
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": "app",
            "io.kubernetes.cri.image-name": "docker.io/library/busybox:1",
        })
    );
    assert_eq!(req.container_id, "c1");
    assert!(!req.stdin);
    assert_eq!(spec["process"]["terminal"], false);

    inp.pod_sysctls = [("kernel.shm$".to_string(), "1".to_string())]
        .into_iter()
        .collect();
    assert!(agent_request(&inp)
        .unwrap_err()
        .to_string()
        .contains("sysctl"));
}
