//! Containers through CRI, as kubelet drives them: a real daemon, a real
//! pod VM (qemu driver), the busybox image in the daemon's store.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use carapace_e2e::cri::{self, busybox, create, create_running, status, wait_state, BUSYBOX};
use carapace_e2e::daemon::Daemon;
use k8s_cri::v1::{
    ContainerConfig, ContainerEventType, ContainerFilter, ContainerState, ContainerStatsRequest,
    ContainerStatusRequest, CreateContainerRequest, DnsConfig, ExecSyncRequest, ExecSyncResponse,
    GetEventsRequest, ImageSpec, Int64Value, LinuxContainerConfig, LinuxContainerSecurityContext,
    ListContainersRequest, ListMetricDescriptorsRequest, ListPodSandboxMetricsRequest, Mount,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxStatsRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, ReopenContainerLogRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest, SupplementalGroupsPolicy,
};
use tonic::Code;

fn pod_config(log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        hostname: "web-0".into(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        ..cri::pod_config("web", log_dir)
    }
}

/// Waits until the CRI log at `path` has a line whose content contains
/// `needle`; returns the whole log.
async fn wait_log(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.lines().any(|l| l.contains(needle)) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{} never showed {needle:?}; it holds:\n{log}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Content of CRI log lines of `stream` (`stdout`/`stderr`).
fn entries(log: &str, stream: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(4, ' ');
            let (_time, s, tag, content) = (
                parts.next()?,
                parts.next()?,
                parts.next()?,
                parts.next().unwrap_or(""),
            );
            assert!(tag == "F" || tag == "P", "bad tag in {l:?}");
            (s == stream).then(|| content.to_owned())
        })
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_run_log_exec_survive_a_restart_and_leave_nothing() {
    let mut daemon = Daemon::start_with_busybox().await;
    let mut cri = daemon.runtime().await;
    let mut events = cri
        .get_container_events(GetEventsRequest {})
        .await
        .expect("GetContainerEvents")
        .into_inner();

    let logs = tempfile::tempdir().unwrap();
    std::fs::create_dir(logs.path().join("app")).unwrap();
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("greeting"), "from the host\n").unwrap();
    let pod_config = pod_config(logs.path());
    let pod = cri::run_pod(&mut cri, &daemon, &pod_config).await;

    // Unknown image, unknown pod: clear codes, nothing created.
    let mut bad = busybox("bad", &["true"], "");
    bad.image = Some(ImageSpec {
        image: "example.com/absent:1".into(),
        ..Default::default()
    });
    let err = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(bad),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let err = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: "0".repeat(64),
            config: Some(busybox("x", &["true"], "")),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    // A mount asking for what is not done yet (here recursive read-only):
    // refused before anything is bound.
    let mut rro = busybox("rro", &["true"], "");
    rro.mounts = vec![Mount {
        container_path: "/data".into(),
        host_path: volume.path().display().to_string(),
        readonly: true,
        recursive_read_only: true,
        ..Default::default()
    }];
    let err = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(rro),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("recursive_read_only"), "{err}");
    assert!(mounts_under(daemon.dir()).is_empty());

    // A long-running container with a read-only volume.
    let script =
        "trap '' TERM; echo hello; echo oops >&2; cat /etc/resolv.conf; cat /etc/hostname; \
                  i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done";
    let mut app = busybox("app", &["sh", "-c", script], "app/0.log");
    app.mounts = vec![Mount {
        container_path: "/data".into(),
        host_path: volume.path().display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    let app_id = create(&mut cri, &pod, app.clone(), &pod_config).await;
    let s = status(&mut cri, &app_id).await;
    assert_eq!(s.state, ContainerState::ContainerCreated as i32);
    assert_eq!(s.image.as_ref().unwrap().image, BUSYBOX);
    // The same name again is refused while the first exists.
    let err = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(app),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");

    cri.start_container(StartContainerRequest {
        container_id: app_id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", daemon.log()));
    let log_path = logs.path().join("app/0.log");
    let log = wait_log(&log_path, "tick 1").await;
    let out = entries(&log, "stdout");
    assert_eq!(out[0], "hello", "{log}");
    assert!(out.contains(&"nameserver 10.96.0.10".to_string()), "{log}");
    assert!(
        out.contains(&"search default.svc.cluster.local".to_string()),
        "{log}"
    );
    assert!(out.contains(&"web-0".to_string()), "{log}");
    assert_eq!(entries(&log, "stderr"), ["oops"], "{log}");
    let s = status(&mut cri, &app_id).await;
    assert_eq!(s.state, ContainerState::ContainerRunning as i32);
    assert!(s.started_at >= s.created_at && s.started_at > 0);
    assert_eq!(s.log_path, log_path.display().to_string());
    assert_eq!(s.mounts.len(), 1);

    // ExecSync: output, exit code, the volume, read-only.
    let exec = cri
        .exec_sync(ExecSyncRequest {
            container_id: app_id.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "cat /data/greeting; echo x > /data/new || echo refused >&2; exit 3".into(),
            ],
            timeout: 30,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "from the host\n");
    assert!(String::from_utf8_lossy(&exec.stderr).contains("refused"));
    assert_eq!(exec.exit_code, 3);
    assert!(!volume.path().join("new").exists());
    // A command that outlives its timeout.
    let started = Instant::now();
    let err = cri
        .exec_sync(ExecSyncRequest {
            container_id: app_id.clone(),
            cmd: vec!["sleep".into(), "30".into()],
            timeout: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));

    // Stats from the guest's cgroups.
    let stats = cri
        .container_stats(ContainerStatsRequest {
            container_id: app_id.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .unwrap();
    let memory = stats.memory.expect("memory stats");
    assert!(memory.working_set_bytes.unwrap().value > 0);
    assert!(
        stats
            .cpu
            .expect("cpu stats")
            .usage_core_nano_seconds
            .unwrap()
            .value
            > 0
    );
    let pod_stats = cri
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(pod_stats.linux.unwrap().containers.len(), 1);

    // The same figures as Prometheus metrics (kubelet's
    // PodAndContainerStatsFromCRI): each with its descriptor's labels.
    let descriptors: HashMap<String, usize> = cri
        .list_metric_descriptors(ListMetricDescriptorsRequest {})
        .await
        .expect("ListMetricDescriptors")
        .into_inner()
        .descriptors
        .into_iter()
        .map(|d| (d.name, d.label_keys.len()))
        .collect();
    let pod_metrics = cri
        .list_pod_sandbox_metrics(ListPodSandboxMetricsRequest {})
        .await
        .expect("ListPodSandboxMetrics")
        .into_inner()
        .pod_metrics;
    let ours = pod_metrics
        .iter()
        .find(|m| m.pod_sandbox_id == pod)
        .expect("the pod's metrics");
    assert!(ours.metrics.is_empty(), "a pod without a network: {ours:?}");
    assert_eq!(ours.container_metrics.len(), 1);
    assert_eq!(ours.container_metrics[0].container_id, app_id);
    let metrics = &ours.container_metrics[0].metrics;
    for m in metrics {
        assert_eq!(
            descriptors.get(&m.name),
            Some(&m.label_values.len()),
            "{m:?}"
        );
        assert_eq!(
            m.label_values[..3],
            [app_id.as_str(), "app", BUSYBOX],
            "{m:?}"
        );
    }
    let metric = |name: &str| {
        metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name} in {metrics:?}"))
            .value
            .as_ref()
            .unwrap()
            .value
    };
    assert!(metric("container_memory_working_set_bytes") > 0);
    assert!(
        (1..=2).contains(&metric("container_processes")),
        "sh, and its sleep"
    );
    let started = metric("container_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now - 600 < started && started <= now, "{started} {now}");

    // The daemon restarts: the container still runs and its log goes on.
    daemon.restart().await;
    let mut cri = daemon.runtime().await;
    let s = status(&mut cri, &app_id).await;
    assert_eq!(
        s.state,
        ContainerState::ContainerRunning as i32,
        "{}",
        daemon.log()
    );
    let before = entries(&std::fs::read_to_string(&log_path).unwrap(), "stdout").len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while entries(&std::fs::read_to_string(&log_path).unwrap(), "stdout").len() < before + 2 {
        assert!(
            Instant::now() < deadline,
            "the log stopped after the restart:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Log rotation: kubelet renames the file and asks for a reopen.
    let rotated = logs.path().join("app/0.log.rotated");
    std::fs::rename(&log_path, &rotated).unwrap();
    cri.reopen_container_log(ReopenContainerLogRequest {
        container_id: app_id.clone(),
    })
    .await
    .expect("ReopenContainerLog");
    wait_log(&log_path, "tick").await;

    // Stop: the script ignores SIGTERM, so SIGKILL follows the timeout.
    let started = Instant::now();
    cri.stop_container(StopContainerRequest {
        container_id: app_id.clone(),
        timeout: 2,
    })
    .await
    .expect("StopContainer");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let s = wait_state(&mut cri, &app_id, ContainerState::ContainerExited).await;
    assert_eq!(s.exit_code, 137, "{s:?}");
    assert!(s.finished_at >= s.started_at);
    // Stopping again is fine; ReopenContainerLog of a stopped one is not.
    cri.stop_container(StopContainerRequest {
        container_id: app_id.clone(),
        timeout: 0,
    })
    .await
    .expect("StopContainer again");
    let err = cri
        .reopen_container_log(ReopenContainerLogRequest {
            container_id: app_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A container that exits by itself, quickly, with its last words.
    let quick_id = create(
        &mut cri,
        &pod,
        busybox(
            "quick",
            &["sh", "-c", "echo last words; exit 4"],
            "app/quick.log",
        ),
        &pod_config,
    )
    .await;
    cri.start_container(StartContainerRequest {
        container_id: quick_id.clone(),
    })
    .await
    .expect("StartContainer quick");
    let s = wait_state(&mut cri, &quick_id, ContainerState::ContainerExited).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (4, "Error"));
    let log = std::fs::read_to_string(logs.path().join("app/quick.log")).unwrap();
    assert_eq!(entries(&log, "stdout"), ["last words"], "{log}");

    // Filters.
    let listed = cri
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: pod.clone(),
                label_selector: HashMap::from([("app".to_string(), "quick".to_string())]),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, quick_id);

    // Remove everything: no record, no mount, no layer left.
    for id in [&app_id, &quick_id] {
        cri.remove_container(RemoveContainerRequest {
            container_id: id.to_string(),
        })
        .await
        .expect("RemoveContainer");
        let err = cri
            .container_status(ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    cri.remove_container(RemoveContainerRequest {
        container_id: app_id.clone(),
    })
    .await
    .expect("removing twice is fine");
    assert!(
        mounts_under(daemon.dir()).is_empty(),
        "{:?}",
        mounts_under(daemon.dir())
    );
    assert_eq!(
        std::fs::read_dir(daemon.containers_dir()).unwrap().count(),
        0
    );

    // Events, in order, for the quick container (the stream started before
    // the daemon restarted, so it ended there; the first ones are in it).
    let mut seen = Vec::new();
    while let Ok(Some(e)) = events.message().await {
        seen.push((e.container_id.clone(), e.container_event_type));
    }
    let app_events: Vec<i32> = seen
        .iter()
        .filter(|(id, _)| *id == app_id)
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(
        app_events,
        [
            ContainerEventType::ContainerCreatedEvent as i32,
            ContainerEventType::ContainerStartedEvent as i32
        ],
        "{seen:?}"
    );

    cri::remove_pod(&mut cri, &pod).await;
    assert!(mounts_under(daemon.dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn events_follow_a_container_and_removing_a_pod_removes_its_containers() {
    let daemon = Daemon::start_with_busybox().await;
    let mut cri = daemon.runtime().await;
    let logs = tempfile::tempdir().unwrap();
    let pod_config = pod_config(logs.path());
    let pod = cri::run_pod(&mut cri, &daemon, &pod_config).await;
    let mut events = cri
        .get_container_events(GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let id = create(
        &mut cri,
        &pod,
        busybox("ev", &["sleep", "1000"], ""),
        &pod_config,
    )
    .await;
    cri.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();
    // Removing the pod kills and removes its container.
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    let s = status(&mut cri, &id).await;
    assert_eq!(s.state, ContainerState::ContainerExited as i32);
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    let err = cri
        .container_status(ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let want = [
        ContainerEventType::ContainerCreatedEvent,
        ContainerEventType::ContainerStartedEvent,
        ContainerEventType::ContainerStoppedEvent,
        ContainerEventType::ContainerDeletedEvent,
    ];
    for expected in want {
        let e = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        assert_eq!(e.container_id, id);
        assert_eq!(e.container_event_type, expected as i32);
        if expected == ContainerEventType::ContainerStartedEvent {
            assert_eq!(e.pod_sandbox_status.unwrap().id, pod);
            assert_eq!(e.containers_statuses.len(), 1);
        }
    }
    assert!(mounts_under(daemon.dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_containers_oom_live_volume_updates_and_a_killed_vm() {
    let daemon = Daemon::start_with_busybox().await;
    let mut cri = daemon.runtime().await;
    let logs = tempfile::tempdir().unwrap();
    let config_map = tempfile::tempdir().unwrap();
    std::fs::write(config_map.path().join("setting"), "v1\n").unwrap();
    let pod_config = pod_config(logs.path());
    let pod = cri::run_pod(&mut cri, &daemon, &pod_config).await;

    // Two containers of the pod running side by side, one with a
    // ConfigMap-like volume.
    let mut web = busybox("web", &["sleep", "100000"], "");
    web.mounts = vec![Mount {
        container_path: "/etc/config".into(),
        host_path: config_map.path().display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    let web_id = create(&mut cri, &pod, web, &pod_config).await;
    let side_id = create(
        &mut cri,
        &pod,
        busybox("side", &["sleep", "100000"], ""),
        &pod_config,
    )
    .await;
    for id in [&web_id, &side_id] {
        cri.start_container(StartContainerRequest {
            container_id: id.to_string(),
        })
        .await
        .expect("StartContainer");
    }
    for id in [&web_id, &side_id] {
        wait_state(&mut cri, id, ContainerState::ContainerRunning).await;
    }
    let cat = |id: String| ExecSyncRequest {
        container_id: id,
        cmd: vec!["cat".into(), "/etc/config/setting".into()],
        timeout: 30,
    };
    let out = cri
        .exec_sync(cat(web_id.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v1\n");
    // kubelet updates a ConfigMap by swapping in a new file: seen inside.
    let tmp = config_map.path().join(".setting.new");
    std::fs::write(&tmp, "v2\n").unwrap();
    std::fs::rename(&tmp, config_map.path().join("setting")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = cri
            .exec_sync(cat(web_id.clone()))
            .await
            .unwrap()
            .into_inner();
        if String::from_utf8_lossy(&out.stdout) == "v2\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the update never showed: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A container over its memory limit is OOM-killed and says so.
    let mut hog = busybox(
        "hog",
        &[
            "sh",
            "-c",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived",
        ],
        "",
    );
    hog.linux = Some(k8s_cri::v1::LinuxContainerConfig {
        resources: Some(k8s_cri::v1::LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let hog_id = create(&mut cri, &pod, hog, &pod_config).await;
    cri.start_container(StartContainerRequest {
        container_id: hog_id.clone(),
    })
    .await
    .expect("StartContainer hog");
    let s = wait_state(&mut cri, &hog_id, ContainerState::ContainerExited).await;
    assert_eq!(s.reason, "OOMKilled", "{s:?}");
    assert_eq!(s.exit_code, 137, "{s:?}");
    // The others are untouched.
    assert_eq!(
        status(&mut cri, &side_id).await.state,
        ContainerState::ContainerRunning as i32
    );

    // The VM is killed from outside: its containers are reported exited,
    // and everything can still be removed.
    let pids = carapace_e2e::daemon::processes_mentioning(&daemon.run_dir().join(&pod[..16]));
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for id in [&web_id, &side_id] {
        let s = wait_state(&mut cri, id, ContainerState::ContainerExited).await;
        assert_eq!(s.reason, "Error", "{s:?}");
        assert!(s.finished_at > 0);
    }
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("StopPodSandbox after the VM died");
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("RemovePodSandbox after the VM died");
    let listed = cri
        .list_containers(ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(listed.is_empty(), "{listed:?}");
    assert!(
        mounts_under(daemon.dir()).is_empty(),
        "{:?}",
        mounts_under(daemon.dir())
    );
    assert_eq!(
        std::fs::read_dir(daemon.containers_dir()).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(daemon.state_dir().join("containers"))
            .unwrap()
            .count(),
        0
    );
    // The ConfigMap's host directory is untouched.
    assert_eq!(
        std::fs::read_to_string(config_map.path().join("setting")).unwrap(),
        "v2\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_pulled_from_a_registry_runs_in_a_pod() {
    let registry = carapace_e2e::registry::Registry::start();
    let build = tempfile::tempdir().unwrap();
    let (layout, _) = carapace_e2e::oci_image::build(build.path()).expect("busybox layout");
    registry.push(&layout, "library/busybox");
    let image = format!("{}/library/busybox:latest", registry.host());
    let daemon = Daemon::start_with_config(&format!(
        "[registry]\ninsecure = [\"{}\"]\n",
        registry.host()
    ))
    .await;
    let mut images = daemon.images().await;
    let image_ref = images
        .pull_image(k8s_cri::v1::PullImageRequest {
            image: Some(ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", registry.log()))
        .into_inner()
        .image_ref;
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");

    let mut cri = daemon.runtime().await;
    let logs = tempfile::tempdir().unwrap();
    let pod_config = pod_config(logs.path());
    let pod = cri::run_pod(&mut cri, &daemon, &pod_config).await;
    let mut config = busybox(
        "pulled",
        &["sh", "-c", "echo pulled and running"],
        "pulled.log",
    );
    config.image = Some(ImageSpec {
        image: image.clone(),
        ..Default::default()
    });
    let id = create(&mut cri, &pod, config, &pod_config).await;
    cri.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("StartContainer");
    let s = wait_state(&mut cri, &id, ContainerState::ContainerExited).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"));
    // As containerd: the repo digest of the pulled image.
    assert!(
        s.image_ref
            .starts_with(&format!("{}/library/busybox@sha256:", registry.host())),
        "{}",
        s.image_ref
    );
    let log = std::fs::read_to_string(logs.path().join("pulled.log")).unwrap();
    assert_eq!(entries(&log, "stdout"), ["pulled and running"]);
    cri::remove_pod(&mut cri, &pod).await;
    images
        .remove_image(k8s_cri::v1::RemoveImageRequest {
            image: Some(ImageSpec {
                image,
                ..Default::default()
            }),
        })
        .await
        .expect("RemoveImage");
    assert!(mounts_under(daemon.dir()).is_empty());
    assert!(
        carapace_e2e::daemon::processes_mentioning(&daemon.run_dir()).is_empty(),
        "no VM process is left"
    );
}

/// `config` with the security context `sc`.
fn secured(config: ContainerConfig, sc: LinuxContainerSecurityContext) -> ContainerConfig {
    ContainerConfig {
        linux: Some(LinuxContainerConfig {
            security_context: Some(sc),
            ..Default::default()
        }),
        ..config
    }
}

async fn exec(cri: &mut cri::Cri, id: &str, cmd: &[&str]) -> ExecSyncResponse {
    cri.exec_sync(ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: 30,
    })
    .await
    .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e}"))
    .into_inner()
}

/// What containerd gives the containers of a pod and carapace must too:
/// one `/dev/shm` for those in the pod's IPC namespace (the sandbox's
/// 64 MiB tmpfs, so POSIX shared memory works between them), a numeric
/// user without a group running with its `/etc/passwd` gid, a user name
/// with a group, and an ephemeral container sharing its target's processes.
#[tokio::test(flavor = "multi_thread")]
async fn pod_dev_shm_is_shared_and_a_numeric_user_gets_its_passwd_gid() {
    let daemon = Daemon::start_with_busybox().await;
    let mut cri = daemon.runtime().await;
    let logs = tempfile::tempdir().unwrap();
    let pod_config = pod_config(logs.path());
    let pod = cri::run_pod(&mut cri, &daemon, &pod_config).await;

    // a and b share the pod's IPC namespace (CRI's default); b runs as the
    // image's nobody by uid alone (65534; its passwd entry says gid
    // 65534); c has an IPC namespace of its own.
    let a = create_running(
        &mut cri,
        &pod,
        busybox("shm-a", &["sleep", "100000"], ""),
        &pod_config,
    )
    .await;
    let b_config = secured(
        busybox("shm-b", &["sh", "-c", "id; exec sleep 100000"], "b.log"),
        LinuxContainerSecurityContext {
            run_as_user: Some(Int64Value { value: 65534 }),
            ..Default::default()
        },
    );
    let b = create_running(&mut cri, &pod, b_config, &pod_config).await;
    let c_config = secured(
        busybox("shm-c", &["sleep", "100000"], ""),
        LinuxContainerSecurityContext {
            namespace_options: Some(NamespaceOption {
                ipc: NamespaceMode::Container as i32,
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let c = create_running(&mut cri, &pod, c_config, &pod_config).await;

    // The user: the container's process and an exec alike.
    let nobody = "uid=65534(nobody) gid=65534(nobody)";
    let log = wait_log(&logs.path().join("b.log"), "uid=").await;
    assert!(entries(&log, "stdout")[0].starts_with(nobody), "{log}");
    let out = exec(&mut cri, &b, &["id"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(nobody),
        "{out:?}"
    );

    // A user name with a group (CRI run_as_username and run_as_group): the
    // agent resolves the name and sets the group, for execs too.
    let grouped_config = secured(
        busybox(
            "grouped",
            &["sh", "-c", "id -u; id -g; exec sleep 100000"],
            "grouped.log",
        ),
        LinuxContainerSecurityContext {
            run_as_username: "nobody".into(),
            run_as_group: Some(Int64Value { value: 29 }),
            ..Default::default()
        },
    );
    let grouped = create_running(&mut cri, &pod, grouped_config, &pod_config).await;
    let log = wait_log(&logs.path().join("grouped.log"), "F 29").await;
    assert_eq!(entries(&log, "stdout")[..2], ["65534", "29"], "{log}");
    let out = exec(&mut cri, &grouped, &["id", "-g"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "29\n", "{out:?}");
    let linux_user = |s: k8s_cri::v1::ContainerStatus| {
        let u = s.user.expect("ContainerStatus.user").linux.unwrap();
        (u.uid, u.gid, u.supplemental_groups)
    };
    assert_eq!(
        linux_user(status(&mut cri, &grouped).await),
        (65534, 29, vec![])
    );

    // SupplementalGroupsPolicy: with Merge (the default) the user's
    // /etc/group memberships are added to the requested groups, with
    // Strict they are not. The image's /etc/group lists none, so a
    // volume gives root one.
    let group_file = logs.path().join("group");
    std::fs::write(&group_file, "root:x:0:\nstaff:x:50:root\n").unwrap();
    let with_policy = |name: &str, policy: SupplementalGroupsPolicy| ContainerConfig {
        mounts: vec![Mount {
            container_path: "/etc/group".into(),
            host_path: group_file.display().to_string(),
            readonly: true,
            ..Default::default()
        }],
        ..secured(
            busybox(name, &["sleep", "100000"], ""),
            LinuxContainerSecurityContext {
                run_as_user: Some(Int64Value { value: 0 }),
                supplemental_groups: vec![7],
                supplemental_groups_policy: policy as i32,
                ..Default::default()
            },
        )
    };
    let merge = with_policy("merge", SupplementalGroupsPolicy::Merge);
    let merge = create_running(&mut cri, &pod, merge, &pod_config).await;
    let strict = with_policy("strict", SupplementalGroupsPolicy::Strict);
    let strict = create_running(&mut cri, &pod, strict, &pod_config).await;
    assert_eq!(
        linux_user(status(&mut cri, &merge).await),
        (0, 0, vec![7, 50])
    );
    assert_eq!(linux_user(status(&mut cri, &strict).await), (0, 0, vec![7]));
    for (id, want) in [(&merge, "0 7 50\n"), (&strict, "0 7\n")] {
        let out = exec(&mut cri, id, &["id", "-G"]).await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{out:?}");
    }

    // /dev/shm: written in a, read in b, and the other way round (b is not
    // root: the tmpfs is world-writable).
    let out = exec(&mut cri, &a, &["sh", "-c", "echo from-a > /dev/shm/x"]).await;
    assert_eq!(out.exit_code, 0, "{out:?}");
    let out = exec(&mut cri, &b, &["cat", "/dev/shm/x"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-a\n", "{out:?}");
    let out = exec(&mut cri, &b, &["sh", "-c", "echo from-b > /dev/shm/y"]).await;
    assert_eq!(out.exit_code, 0, "{out:?}");
    let out = exec(&mut cri, &a, &["cat", "/dev/shm/y"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-b\n", "{out:?}");
    // The pod's tmpfs, restricted as containerd's.
    let out = exec(
        &mut cri,
        &b,
        &["grep", " /dev/shm ", "/proc/self/mountinfo"],
    )
    .await;
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let (mount, fs) = line.trim().split_once(" - ").expect("a /dev/shm mount");
    let flags: Vec<&str> = mount.split(' ').nth(5).unwrap().split(',').collect();
    for want in ["rw", "nosuid", "nodev", "noexec"] {
        assert!(flags.contains(&want), "{want} missing: {line}");
    }
    assert!(
        fs.starts_with("tmpfs ") && fs.contains("size=65536k"),
        "{line}"
    );

    // c sees none of it: its /dev/shm is its own.
    let out = exec(&mut cri, &c, &["ls", "-A", "/dev/shm"]).await;
    assert_eq!(
        (out.exit_code, out.stdout.as_slice()),
        (0, &b""[..]),
        "{out:?}"
    );
    let out = exec(&mut cri, &c, &["sh", "-c", "echo from-c > /dev/shm/x"]).await;
    assert_eq!(out.exit_code, 0, "{out:?}");
    let out = exec(&mut cri, &a, &["cat", "/dev/shm/x"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-a\n", "{out:?}");

    // `kubectl debug --target`: an ephemeral container in pid mode TARGET
    // sees the processes of its target, which has a pid namespace of its
    // own (kubelet's default without shareProcessNamespace).
    let pid_ns = |pid: NamespaceMode, target_id: &str| NamespaceOption {
        pid: pid as i32,
        target_id: target_id.into(),
        ..Default::default()
    };
    let own_pids = |name: &str, cmd: &[&str], ns: NamespaceOption| {
        secured(
            busybox(name, cmd, ""),
            LinuxContainerSecurityContext {
                namespace_options: Some(ns),
                ..Default::default()
            },
        )
    };
    let target = create_running(
        &mut cri,
        &pod,
        own_pids(
            "target",
            &["sleep", "100001"],
            pid_ns(NamespaceMode::Container, ""),
        ),
        &pod_config,
    )
    .await;
    for (target_id, code) in [("", Code::InvalidArgument), ("absent", Code::NotFound)] {
        let config = own_pids(
            "debug",
            &["sleep", "100002"],
            pid_ns(NamespaceMode::Target, target_id),
        );
        let err = cri
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "target {target_id:?}: {err}");
    }
    let debug = create_running(
        &mut cri,
        &pod,
        own_pids(
            "debug",
            &["sleep", "100002"],
            pid_ns(NamespaceMode::Target, &target),
        ),
        &pod_config,
    )
    .await;
    let cmdlines = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done";
    let out = exec(&mut cri, &debug, &["sh", "-c", cmdlines]).await;
    let seen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        seen.contains("sleep 100001"),
        "the target's process: {seen}"
    );
    assert!(seen.contains("sleep 100002"), "its own: {seen}");
    assert!(
        !seen.contains("sleep 100000"),
        "not the pod's others: {seen}"
    );
    let out = exec(&mut cri, &debug, &["cat", "/proc/1/cmdline"]).await;
    assert_eq!(out.stdout, b"sleep\x00100001\x00", "{out:?}");
    // The target itself sees the debug container's process, but not the pod's.
    let out = exec(&mut cri, &target, &["sh", "-c", cmdlines]).await;
    let seen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        seen.contains("sleep 100002") && !seen.contains("sleep 100000"),
        "{seen}"
    );

    cri::remove_pod(&mut cri, &pod).await;
    assert!(mounts_under(daemon.dir()).is_empty());
}
