//! Pod sandboxes over CRI, as kubelet drives them: the daemon boots one VM
//! per pod with the qemu driver; pods survive a daemon restart; a VM killed
//! from outside is reported and cleanable; malformed requests get the right
//! codes; nothing is left after removal.

use std::collections::HashMap;

use carapace_e2e::daemon::{processes_mentioning, Daemon};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatusRequest, CreateContainerRequest,
    ExecSyncRequest, ImageSpec, ListContainersRequest, ListPodSandboxRequest, NetworkConfig,
    PodSandboxConfig, PodSandboxFilter, PodSandboxMetadata, PodSandboxState, PodSandboxStateValue,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    RuntimeConfig, StartContainerRequest, StatusRequest, StopContainerRequest,
    StopPodSandboxRequest, UpdateRuntimeConfigRequest, VersionRequest,
};
use tonic::transport::Channel;
use tonic::Code;

fn pod(name: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "e2e".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        ..Default::default()
    }
}

async fn run(cri: &mut RuntimeServiceClient<Channel>, name: &str) -> String {
    cri.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(pod(name)),
        runtime_handler: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}"))
    .into_inner()
    .pod_sandbox_id
}

async fn state(cri: &mut RuntimeServiceClient<Channel>, id: &str) -> PodSandboxState {
    let status = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner();
    PodSandboxState::try_from(status.status.unwrap().state).unwrap()
}

async fn list_ids(
    cri: &mut RuntimeServiceClient<Channel>,
    filter: Option<PodSandboxFilter>,
) -> Vec<String> {
    cri.list_pod_sandbox(ListPodSandboxRequest { filter })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items
        .into_iter()
        .map(|p| p.id)
        .collect()
}

async fn remove(cri: &mut RuntimeServiceClient<Channel>, id: &str) {
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .expect("StopPodSandbox");
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .expect("RemovePodSandbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lifecycle_restart_and_cleanup() {
    let mut daemon = Daemon::start().await;
    let mut cri = daemon.runtime().await;

    let version = cri
        .version(VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.runtime_name, "carapace");
    assert_eq!(version.runtime_api_version, "v1");
    let status = cri
        .status(StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    // Kubelet admits pods with supplementalGroupsPolicy Strict only on a
    // runtime that says it supports it.
    assert_eq!(
        status
            .features
            .as_ref()
            .map(|f| f.supplemental_groups_policy),
        Some(true)
    );
    let conditions: HashMap<String, bool> = status
        .status
        .unwrap()
        .conditions
        .into_iter()
        .map(|c| (c.r#type, c.status))
        .collect();
    assert_eq!(conditions.get("RuntimeReady"), Some(&true));
    assert_eq!(conditions.get("NetworkReady"), Some(&false));

    let a = run(&mut cri, "alpha").await;
    let b = run(&mut cri, "beta").await;
    assert_ne!(a, b);
    assert_eq!(state(&mut cri, &a).await, PodSandboxState::SandboxReady);

    // The same pod (name, namespace, uid, attempt) cannot be created twice.
    let dup = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod("alpha")),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup}");

    // Filters: by label, by id prefix, by state.
    let by_label = PodSandboxFilter {
        label_selector: HashMap::from([("app".to_string(), "beta".to_string())]),
        ..Default::default()
    };
    assert_eq!(list_ids(&mut cri, Some(by_label)).await, vec![b.clone()]);
    let by_prefix = PodSandboxFilter {
        id: a[..12].to_string(),
        ..Default::default()
    };
    assert_eq!(list_ids(&mut cri, Some(by_prefix)).await, vec![a.clone()]);

    // kubelet's pod CIDR: kept, shown in the verbose Status; bad ones change nothing.
    let update = |cidr: Option<&str>| UpdateRuntimeConfigRequest {
        runtime_config: cidr.map(|c| RuntimeConfig {
            network_config: Some(NetworkConfig {
                pod_cidr: c.to_string(),
            }),
        }),
    };
    cri.update_runtime_config(update(Some("10.88.0.0/16,fd00:88::/64")))
        .await
        .expect("UpdateRuntimeConfig");
    for bad in [update(Some("10.88.0.0/99")), update(None)] {
        assert_eq!(
            code(cri.update_runtime_config(bad).await),
            Code::InvalidArgument
        );
    }
    assert_eq!(pod_cidr(&mut cri).await, "10.88.0.0/16,fd00:88::/64");

    // A daemon restart: both pods are still there and ready, their VMs ran on.
    daemon.restart().await;
    let mut cri = daemon.runtime().await;
    assert_eq!(
        pod_cidr(&mut cri).await,
        "10.88.0.0/16,fd00:88::/64",
        "the pod CIDR outlives a restart (kubelet does not send it again)"
    );
    let mut ids = list_ids(&mut cri, None).await;
    ids.sort();
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(state(&mut cri, &a).await, PodSandboxState::SandboxReady);

    // A VM killed from outside: reported as not ready, and cleanable.
    // A VM's run directory is named by the first 16 hex digits of its id.
    let b_run_dir = daemon.run_dir().join(&b[..16]);
    let pids = processes_mentioning(&b_run_dir);
    assert!(!pids.is_empty(), "no VM processes found for pod {b}");
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while state(&mut cri, &b).await != PodSandboxState::SandboxNotready {
        assert!(
            std::time::Instant::now() < deadline,
            "killed VM still reported ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let not_ready = PodSandboxFilter {
        state: Some(PodSandboxStateValue {
            state: PodSandboxState::SandboxNotready as i32,
        }),
        ..Default::default()
    };
    assert_eq!(list_ids(&mut cri, Some(not_ready)).await, vec![b.clone()]);

    remove(&mut cri, &a).await;
    remove(&mut cri, &b).await;
    // Idempotent: stopping and removing again is fine.
    remove(&mut cri, &a).await;
    assert!(list_ids(&mut cri, None).await.is_empty());

    // Nothing left: no VM process, no run directory, no state record.
    assert!(processes_mentioning(&daemon.run_dir()).is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(daemon.run_dir())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left in run dir: {leftovers:?}");
    let records: Vec<_> = std::fs::read_dir(daemon.state_dir().join("sandboxes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(records.is_empty(), "left in state dir: {records:?}");
}

/// The pod CIDR the verbose Status shows (a JSON object under "carapace", as crictl wants).
async fn pod_cidr(cri: &mut RuntimeServiceClient<Channel>) -> String {
    let status = cri
        .status(StatusRequest { verbose: true })
        .await
        .expect("Status")
        .into_inner();
    let ours: serde_json::Value =
        serde_json::from_str(&status.info["carapace"]).expect("info.carapace is JSON");
    ours["podCIDR"].as_str().expect("podCIDR").to_string()
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_requests_get_the_right_codes() {
    let daemon = Daemon::start().await;
    let mut cri = daemon.runtime().await;

    // Missing config, missing metadata, empty name.
    assert_eq!(
        code(cri.run_pod_sandbox(RunPodSandboxRequest::default()).await),
        Code::InvalidArgument
    );
    let mut no_meta = pod("x");
    no_meta.metadata = None;
    assert_eq!(
        code(
            cri.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(no_meta),
                runtime_handler: String::new(),
            })
            .await
        ),
        Code::InvalidArgument
    );
    // Unknown and empty ids.
    assert_eq!(
        code(
            cri.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: "0123456789abcdef".into(),
                verbose: false,
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            cri.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: String::new(),
                verbose: false,
            })
            .await
        ),
        Code::InvalidArgument
    );
    // Stopping or removing an absent pod is not an error.
    assert_eq!(
        code(
            cri.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: "0123456789abcdef".into(),
            })
            .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(
            cri.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: "0123456789abcdef".into(),
            })
            .await
        ),
        Code::Ok
    );
    // Container calls: empty ids are malformed, unknown ids not found,
    // stopping or removing an absent container is fine.
    let unknown = "0123456789abcdef".to_string();
    for id in [String::new(), unknown.clone()] {
        let want = if id.is_empty() {
            Code::InvalidArgument
        } else {
            Code::NotFound
        };
        let status = cri
            .container_status(ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            })
            .await;
        assert_eq!(code(status), want, "ContainerStatus {id:?}");
        let start = cri
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await;
        assert_eq!(code(start), want, "StartContainer {id:?}");
        let exec = cri
            .exec_sync(ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec!["true".into()],
                timeout: 1,
            })
            .await;
        assert_eq!(code(exec), want, "ExecSync {id:?}");
        let stop = cri
            .stop_container(StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            })
            .await;
        let remove = cri
            .remove_container(RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await;
        let absent_ok = if id.is_empty() {
            Code::InvalidArgument
        } else {
            Code::Ok
        };
        assert_eq!(code(stop), absent_ok, "StopContainer {id:?}");
        assert_eq!(code(remove), absent_ok, "RemoveContainer {id:?}");
    }
    // CreateContainer: no config, no metadata, an unknown pod.
    assert_eq!(
        code(
            cri.create_container(CreateContainerRequest {
                pod_sandbox_id: unknown.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    let config = ContainerConfig {
        image: Some(ImageSpec {
            image: "busybox".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        code(
            cri.create_container(CreateContainerRequest {
                pod_sandbox_id: unknown.clone(),
                config: Some(config.clone()),
                sandbox_config: None,
            })
            .await
        ),
        Code::InvalidArgument
    );
    let named = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "c".into(),
            attempt: 0,
        }),
        ..config
    };
    assert_eq!(
        code(
            cri.create_container(CreateContainerRequest {
                pod_sandbox_id: unknown.clone(),
                config: Some(named),
                sandbox_config: None,
            })
            .await
        ),
        Code::NotFound
    );
    // Nothing was created by any of it.
    assert!(list_ids(&mut cri, None).await.is_empty());
    let containers = cri
        .list_containers(ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(containers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_pods_start_concurrently() {
    let daemon = Daemon::start().await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut cri = daemon.runtime().await;
        tasks.push(tokio::spawn(async move {
            run(&mut cri, &format!("pod{i}")).await
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.expect("RunPodSandbox task"));
    }
    let mut cri = daemon.runtime().await;
    let mut listed = list_ids(&mut cri, None).await;
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    for id in &ids {
        assert_eq!(state(&mut cri, id).await, PodSandboxState::SandboxReady);
    }
    for id in &ids {
        remove(&mut cri, id).await;
    }
    assert!(processes_mentioning(&daemon.run_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_vm_processes_live_in_kubelets_pod_cgroup() {
    let daemon = Daemon::start().await;
    let mut cri = daemon.runtime().await;
    let parent = format!("carapace-e2e-{}/pod-cg", std::process::id());
    let root = carapace_e2e::daemon::cgroup_root();
    let mut config = pod("cg");
    config.linux = Some(k8s_cri::v1::LinuxPodSandboxConfig {
        cgroup_parent: format!("/{parent}"),
        ..Default::default()
    });
    let id = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", daemon.log()))
        .into_inner()
        .pod_sandbox_id;
    let leaf = root.join(&parent).join(format!("carapace-{}", &id[..16]));
    let pids = processes_mentioning(&daemon.run_dir().join(&id[..16]));
    assert!(
        pids.len() >= 3,
        "qemu, vsock backend and virtiofsd: {pids:?}"
    );
    for pid in &pids {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let unified = cgroup.lines().find(|l| l.starts_with("0::")).unwrap();
        assert_eq!(
            unified,
            format!("0::/{parent}/carapace-{}", &id[..16]),
            "pid {pid}"
        );
    }
    remove(&mut cri, &id).await;
    assert!(
        !leaf.exists(),
        "the pod VM's cgroup is removed with the pod"
    );
    // kubelet owns the parent; the test made it.
    let _ = std::fs::remove_dir(root.join(&parent));
    let _ = std::fs::remove_dir(root.join(format!("carapace-e2e-{}", std::process::id())));
}

/// A kubelet that stops waiting for RunPodSandbox (its deadline) cancels
/// the call; the sandbox is still finished and listed, so that kubelet
/// finds it and removes it, and nothing of it is left afterwards.
#[tokio::test]
async fn a_run_pod_sandbox_the_client_gave_up_on_is_finished_and_removable() {
    let daemon = Daemon::start().await;
    let mut cri = daemon.runtime().await;
    let given_up = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        cri.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod("impatient")),
            runtime_handler: String::new(),
        }),
    )
    .await;
    assert!(given_up.is_err(), "the boot takes longer than 300 ms");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let id = loop {
        if let Some(id) = list_ids(&mut cri, None).await.pop() {
            break id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sandbox never appeared:\n{}",
            daemon.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(state(&mut cri, &id).await, PodSandboxState::SandboxReady);
    // kubelet's retry with the same name is told which sandbox has it.
    let again = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod("impatient")),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert!(again.message().contains(&id), "{again:?}");
    remove(&mut cri, &id).await;
    assert!(processes_mentioning(&daemon.run_dir()).is_empty());
    assert!(list_ids(&mut cri, None).await.is_empty());
}
