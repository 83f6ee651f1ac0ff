//! Containers created by the agent on this host, as root, from a busybox
//! root filesystem: namespaces, identity, capabilities, rlimits, mounts,
//! exit statuses, stdio (pipes and TTY) and cleanup. (cgroup v2 behaviour
//! needs the guest: see e2e/tests/agent_containers.rs.)

mod common;

use std::collections::HashMap;
use std::time::Duration;

use carapace_agent_api::v1::*;
use common::*;
use serde_json::json;

fn ns_links(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn own_ns(kind: &str) -> String {
    std::fs::read_link(format!("/proc/self/ns/{kind}"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

const PRINT_NS: &str =
    "for n in mnt pid ipc uts net; do echo $n=$(readlink /proc/self/ns/$n); done; echo pid1=$$";

#[tokio::test]
async fn output_and_exit_code_come_back() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let spec = spec(&rootfs, &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    let (out, status) = run(&mut c, create_req("c1", &spec)).await;
    assert_eq!(out.stdout(), "out\n");
    assert_eq!(out.stderr(), "err\n");
    assert_eq!((status.exit_code, status.signal), (3, 0));
    assert_eq!(status.reason, "Error");
    assert!(status.finished_at_unix_nanos > 0);
    delete(&mut c, "c1").await;
}

#[tokio::test]
async fn namespaces_are_new_and_network_is_shared() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let (out, status) = run(
        &mut c,
        create_req("ns", &spec(&rootfs, &["sh", "-c", PRINT_NS])),
    )
    .await;
    assert_eq!(status.exit_code, 0, "{}", out.stderr());
    let links = ns_links(&out.stdout());
    for kind in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(links[kind], own_ns(kind), "{kind} namespace must be new");
    }
    assert_eq!(links["net"], own_ns("net"), "the network is the pod's");
    assert_eq!(
        links["pid1"], "1",
        "the container's process is PID 1 of its namespace"
    );
    delete(&mut c, "ns").await;
}

#[tokio::test]
async fn pod_namespaces_are_shared_between_containers() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    // Both stay alive while compared: namespace inode numbers of a
    // namespace that is gone get reused.
    let script = format!("{PRINT_NS}; exec sleep 1000");
    let mut links = Vec::new();
    for id in ["a", "b"] {
        let req = CreateContainerRequest {
            pid_mode: NamespaceMode::Pod as i32,
            ipc_mode: NamespaceMode::Pod as i32,
            ..create_req(id, &spec(&rootfs, &["sh", "-c", &script]))
        };
        c.create_container(req).await.unwrap();
        let mut out = c
            .clone()
            .read_output(ReadOutputRequest {
                process: pref(id, ""),
            })
            .await
            .unwrap()
            .into_inner();
        c.start_container(StartContainerRequest {
            container_id: id.into(),
        })
        .await
        .unwrap();
        let mut text = String::new();
        while !text.contains("pid1=") || !text.ends_with('\n') {
            let chunk = out.message().await.unwrap().expect("namespace links");
            text.push_str(&String::from_utf8_lossy(&chunk.data));
        }
        links.push(ns_links(&text));
    }
    assert_eq!(links[0]["pid"], links[1]["pid"]);
    assert_eq!(links[0]["ipc"], links[1]["ipc"]);
    assert_ne!(links[0]["pid"], own_ns("pid"));
    assert_ne!(
        links[0]["mnt"], links[1]["mnt"],
        "mount namespaces stay per container"
    );
    assert_ne!(
        links[0]["pid1"], "1",
        "in the pod namespace PID 1 is the holder"
    );
    for id in ["a", "b"] {
        delete(&mut c, id).await;
    }
    // The namespace holder (the agent's remaining child) ends with the
    // agent: nothing is left behind on a host.
    let holders = children_of(agent.pid());
    assert_eq!(holders.len(), 1, "{holders:?}");
    let mut agent = agent;
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{}", holders[0])).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the holder outlived the agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.to_owned()))
                .and_then(|rest| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .collect()
}

/// Zombie processes among the descendants of `root`.
fn zombies_under(root: u32) -> Vec<String> {
    // pid -> (state, ppid, stat line)
    let mut procs = HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid: u32 = fields.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        procs.insert(pid, (fields.first() == Some(&"Z"), ppid, stat.clone()));
    }
    let is_under = |mut pid: u32| {
        for _ in 0..64 {
            match procs.get(&pid) {
                Some((_, ppid, _)) if *ppid == root => return true,
                Some((_, ppid, _)) => pid = *ppid,
                None => return false,
            }
        }
        false
    };
    procs
        .iter()
        .filter(|(pid, (zombie, _, _))| *zombie && is_under(**pid))
        .map(|(_, (_, _, stat))| stat.clone())
        .collect()
}

fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("{name} missing from {status}"))
        .trim()
}

#[tokio::test]
async fn identity_capabilities_and_no_new_privs_are_applied() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let caps = ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"];
    let mut s = spec(&rootfs, &["cat", "/proc/self/status"]);
    s["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [20, 30]});
    s["process"]["capabilities"] = json!({
        "bounding": caps, "effective": caps, "permitted": caps,
        "inheritable": caps, "ambient": caps
    });
    s["process"]["noNewPrivileges"] = json!(true);
    let (out, status) = run(&mut c, create_req("who", &s)).await;
    assert_eq!(status.exit_code, 0, "{}", out.stderr());
    let st = out.stdout();
    assert_eq!(
        status_field(&st, "Uid")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["1000"; 4]
    );
    assert_eq!(
        status_field(&st, "Gid")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["1001"; 4]
    );
    assert_eq!(status_field(&st, "Groups"), "20 30");
    // CAP_CHOWN is bit 0, CAP_NET_BIND_SERVICE bit 10.
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"] {
        assert_eq!(status_field(&st, set), "0000000000000401", "{set}");
    }
    assert_eq!(status_field(&st, "NoNewPrivs"), "1");
    // No signal ignored or blocked from the agent's side.
    assert_eq!(status_field(&st, "SigIgn"), "0000000000000000");
    assert_eq!(status_field(&st, "SigBlk"), "0000000000000000");
    delete(&mut c, "who").await;
}

#[tokio::test]
async fn username_is_resolved_from_the_containers_passwd() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let req = CreateContainerRequest {
        username: "app".into(),
        ..create_req("user", &spec(&rootfs, &["sh", "-c", "id; echo HOME=$HOME"]))
    };
    let (out, status) = run(&mut c, req).await;
    assert_eq!(status.exit_code, 0, "{}", out.stderr());
    let stdout = out.stdout();
    assert!(stdout.contains("uid=1234(app) gid=1235(app)"), "{stdout}");
    assert!(stdout.contains("groups=10(wheel)"), "{stdout}");
    assert!(stdout.contains("HOME=/home/app"), "{stdout}");
    delete(&mut c, "user").await;
}

/// A busybox root whose /etc/passwd has `svc` (uid 1234, gid 2345) and
/// whose /etc/group has svc's own group, staff (gid 50) with svc as a
/// member, and `more`.
fn svc_rootfs(agent: &Agent, more: &str) -> std::path::PathBuf {
    let rootfs = busybox_rootfs(agent.dir.path());
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nsvc:x:1234:2345:Svc:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        rootfs.join("etc/group"),
        format!("root:x:0:\nsvc:x:2345:\nstaff:x:50:svc\n{more}"),
    )
    .unwrap();
    rootfs
}

/// Runs `req`, a container printing its /proc/self/status, and checks its
/// uid, gid and supplementary groups; removes it.
async fn assert_identity(c: &mut Client, req: CreateContainerRequest, want: (&str, &str, &str)) {
    let id = req.container_id.clone();
    let (out, status) = run(c, req).await;
    assert_eq!(status.exit_code, 0, "{id}: {}", out.stderr());
    let st = out.stdout();
    let field = |name| {
        status_field(&st, name)
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid"), [want.0; 4], "{id}");
    assert_eq!(field("Gid"), [want.1; 4], "{id}");
    assert_eq!(status_field(&st, "Groups"), want.2, "{id}");
    delete(c, &id).await;
}

#[tokio::test]
async fn a_group_by_name_or_number_sets_the_primary_gid() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = svc_rootfs(&agent, "audio:x:63:\n");
    // (container, username, group) -> Uid, Gid and Groups of the process.
    let cases = [
        ("name-name", "svc", "audio", "1234", "63", "50"),
        ("name-number", "svc", "77", "1234", "77", "50"),
        ("uid-name", "", "audio", "4321", "63", ""),
    ];
    for (id, username, group, uid, gid, groups) in cases {
        let mut s = spec(&rootfs, &["cat", "/proc/self/status"]);
        s["process"]["user"] = json!({"uid": 4321, "gid": 0});
        let req = CreateContainerRequest {
            username: username.into(),
            group: group.into(),
            ..create_req(id, &s)
        };
        assert_identity(&mut c, req, (uid, gid, groups)).await;
    }
    // A group the container does not have: the create fails, naming it.
    let req = CreateContainerRequest {
        group: "ghosts".into(),
        ..create_req("no-group", &spec(&rootfs, &["true"]))
    };
    let err = c.create_container(req).await.unwrap_err();
    assert!(err.message().contains("\"ghosts\""), "{err}");

    // Strict supplementary groups: the requested ones, not svc's staff
    // membership; the created process's identity comes back.
    let mut s = spec(&rootfs, &["true"]);
    s["process"]["user"] = json!({"uid": 0, "gid": 0, "additionalGids": [7]});
    let req = CreateContainerRequest {
        username: "svc".into(),
        strict_supplemental_groups: true,
        ..create_req("strict", &s)
    };
    let created = c.create_container(req).await.unwrap().into_inner();
    assert!(created.identity_known);
    assert_eq!(
        (created.uid, created.gid, created.groups),
        (1234, 2345, vec![7])
    );
    delete(&mut c, "strict").await;
}

#[tokio::test]
async fn numeric_user_takes_its_gid_from_the_containers_passwd() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = svc_rootfs(&agent, "");
    // (container, uid, gid_from_passwd) -> Gid and Groups of the process.
    let cases = [
        ("passwd-gid", "1234", true, "2345", "50"),
        // Without the flag the spec's gid stands (the groups still come
        // from /etc/group, as runc adds them).
        ("spec-gid", "1234", false, "0", "50"),
        // A uid /etc/passwd does not know keeps the spec's gid.
        ("no-entry", "4321", true, "0", ""),
    ];
    for (id, uid, gid_from_passwd, gid, groups) in cases {
        let mut s = spec(&rootfs, &["cat", "/proc/self/status"]);
        s["process"]["user"] = json!({"uid": uid.parse::<u32>().unwrap(), "gid": 0});
        let req = CreateContainerRequest {
            gid_from_passwd,
            ..create_req(id, &s)
        };
        assert_identity(&mut c, req, (uid, gid, groups)).await;
    }

    // An exec asks for it the same way.
    let mut s = spec(&rootfs, &["sleep", "1000"]);
    s["process"]["user"] = json!({"uid": 1234, "gid": 0});
    c.create_container(CreateContainerRequest {
        gid_from_passwd: true,
        ..create_req("srv", &s)
    })
    .await
    .unwrap();
    c.start_container(StartContainerRequest {
        container_id: "srv".into(),
    })
    .await
    .unwrap();
    let process = json!({
        "user": {"uid": 1234, "gid": 0},
        "args": ["grep", "^Gid:", "/proc/self/status"],
        "env": ["PATH=/bin"],
        "cwd": "/"
    });
    c.exec_process(ExecProcessRequest {
        container_id: "srv".into(),
        exec_id: "e".into(),
        oci_process_json: process.to_string(),
        gid_from_passwd: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(wait(&mut c, "srv", "e").await.exit_code, 0);
    let out = read_all(&mut c, "srv", "e").await.stdout();
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["Gid:", "2345", "2345", "2345", "2345"]
    );
    delete(&mut c, "srv").await;
}

#[tokio::test]
async fn cwd_env_rlimits_hostname_and_oom_score_adj() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let mut s = spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "pwd; echo $GREETING; ulimit -n; hostname; cat /proc/self/oom_score_adj",
        ],
    );
    s["process"]["cwd"] = json!("/tmp");
    s["process"]["env"] = json!(["PATH=/bin", "GREETING=hello"]);
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 123, "soft": 100}]);
    s["process"]["oomScoreAdj"] = json!(-500);
    let (out, status) = run(&mut c, create_req("env", &s)).await;
    assert_eq!(status.exit_code, 0, "{}", out.stderr());
    let lines: Vec<String> = out.stdout().lines().map(str::to_owned).collect();
    assert_eq!(&lines[..4], ["/tmp", "hello", "100", "box"]);
    // Hosts without CAP_SYS_RESOURCE refuse a negative value: the agent
    // clamps it to its own value instead of failing.
    let own = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", agent.pid())).unwrap();
    assert!(
        lines[4] == "-500" || lines[4] == own.trim(),
        "oom_score_adj {}",
        lines[4]
    );
    delete(&mut c, "env").await;
}

#[tokio::test]
async fn mounts_masked_readonly_paths_and_readonly_root() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let volume = agent.dir.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    let mut s = spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "echo vol > /data/file && echo volume-ok; \
             touch /rootfile 2>/dev/null || echo root-ro; \
             echo 1 > /proc/sys/kernel/domainname 2>/dev/null || echo procsys-ro; \
             echo timer_list=$(wc -c < /proc/timer_list); echo firmware=$(ls /sys/firmware | wc -l); \
             ls /dev; echo shm > /dev/shm/x && echo shm-ok",
        ],
    );
    s["root"]["readonly"] = json!(true);
    s["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/data", "type": "bind", "source": volume, "options": ["rbind", "rw"]}));
    let (out, status) = run(&mut c, create_req("mounts", &s)).await;
    assert_eq!(status.exit_code, 0, "{}", out.stderr());
    let stdout = out.stdout();
    for want in [
        "volume-ok",
        "root-ro",
        "procsys-ro",
        "timer_list=0",
        "firmware=0",
        "null",
        "urandom",
        "pts",
        "shm-ok",
    ] {
        assert!(
            stdout.contains(want),
            "{want} missing from {stdout}; stderr {}",
            out.stderr()
        );
    }
    assert_eq!(
        std::fs::read_to_string(volume.join("file")).unwrap(),
        "vol\n"
    );
    delete(&mut c, "mounts").await;
}

#[tokio::test]
async fn exit_codes_and_signals_are_exact() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    for (id, code, reason) in [
        ("zero", 0, "Completed"),
        ("one", 1, "Error"),
        ("big", 255, "Error"),
    ] {
        let (_, status) = run(
            &mut c,
            create_req(id, &spec(&rootfs, &["sh", "-c", &format!("exit {code}")])),
        )
        .await;
        assert_eq!(
            (status.exit_code, status.signal, status.reason.as_str()),
            (code, 0, reason)
        );
        delete(&mut c, id).await;
    }

    // SIGKILL to a container's PID 1: 128 + 9.
    c.create_container(create_req("kill", &spec(&rootfs, &["sleep", "1000"])))
        .await
        .unwrap();
    c.start_container(StartContainerRequest {
        container_id: "kill".into(),
    })
    .await
    .unwrap();
    c.signal_process(SignalProcessRequest {
        process: pref("kill", ""),
        signal: 9,
    })
    .await
    .unwrap();
    let status = wait(&mut c, "kill", "").await;
    assert_eq!((status.exit_code, status.signal), (137, 9));

    // SIGTERM handled by the process: its own exit code.
    let trap = "trap 'exit 7' TERM; echo ready; while true; do sleep 0.05; done";
    c.create_container(create_req("trap", &spec(&rootfs, &["sh", "-c", trap])))
        .await
        .unwrap();
    let mut reader = c.clone();
    let mut out = reader
        .read_output(ReadOutputRequest {
            process: pref("trap", ""),
        })
        .await
        .unwrap()
        .into_inner();
    c.start_container(StartContainerRequest {
        container_id: "trap".into(),
    })
    .await
    .unwrap();
    let first = out.message().await.unwrap().unwrap();
    assert_eq!(first.data, b"ready\n");
    c.signal_process(SignalProcessRequest {
        process: pref("trap", ""),
        signal: 15,
    })
    .await
    .unwrap();
    let status = wait(&mut c, "trap", "").await;
    assert_eq!((status.exit_code, status.signal), (7, 0));

    // SIGTERM with the default action (not PID 1 in the pod namespace).
    let req = CreateContainerRequest {
        pid_mode: NamespaceMode::Pod as i32,
        ..create_req("term", &spec(&rootfs, &["sleep", "1000"]))
    };
    c.create_container(req).await.unwrap();
    c.start_container(StartContainerRequest {
        container_id: "term".into(),
    })
    .await
    .unwrap();
    c.signal_process(SignalProcessRequest {
        process: pref("term", ""),
        signal: 15,
    })
    .await
    .unwrap();
    let status = wait(&mut c, "term", "").await;
    assert_eq!(
        (status.exit_code, status.signal, status.reason.as_str()),
        (143, 15, "Error")
    );
    for id in ["kill", "trap", "term"] {
        delete(&mut c, id).await;
    }
}

#[tokio::test]
async fn output_of_fast_exiting_processes_is_complete() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    // 1 MB written right before exit, and read only after the exit (the
    // agent buffers up to 2 MiB per process).
    let script = "dd if=/dev/zero bs=1000 count=1000 2>/dev/null | tr '\\0' x; echo -n END";
    let id = "fast";
    c.create_container(create_req(id, &spec(&rootfs, &["sh", "-c", script])))
        .await
        .unwrap();
    c.start_container(StartContainerRequest {
        container_id: id.into(),
    })
    .await
    .unwrap();
    let status = wait(&mut c, id, "").await;
    assert_eq!(status.exit_code, 0);
    let out = read_all(&mut c, id, "").await;
    assert_eq!(out.stdout.len(), 1_000_003);
    assert!(out.stdout.ends_with(b"xEND"));
    delete(&mut c, id).await;
    // More than the agent buffers: the writer waits for the reader, and
    // nothing is lost.
    let script = "dd if=/dev/zero bs=1000 count=5000 2>/dev/null | tr '\\0' y; echo -n END";
    let (out, status) = run(
        &mut c,
        create_req("big", &spec(&rootfs, &["sh", "-c", script])),
    )
    .await;
    assert_eq!(status.exit_code, 0);
    assert_eq!(out.stdout.len(), 5_000_003);
    assert!(out.stdout.ends_with(b"yEND"));
    delete(&mut c, "big").await;
    // Many tiny processes: the last line always arrives.
    for i in 0..10 {
        let id = format!("tiny{i}");
        let (out, _) = run(
            &mut c,
            create_req(&id, &spec(&rootfs, &["echo", "last words"])),
        )
        .await;
        assert_eq!(out.stdout(), "last words\n");
        delete(&mut c, &id).await;
    }
}

#[tokio::test]
async fn stdin_is_written_and_closed() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let req = CreateContainerRequest {
        stdin: true,
        ..create_req("cat", &spec(&rootfs, &["sh", "-c", "cat; echo done"]))
    };
    c.create_container(req).await.unwrap();
    c.start_container(StartContainerRequest {
        container_id: "cat".into(),
    })
    .await
    .unwrap();
    for (data, close) in [(&b"hello "[..], false), (&b"world\n"[..], true)] {
        c.write_stdin(WriteStdinRequest {
            process: pref("cat", ""),
            data: data.to_vec(),
            close,
        })
        .await
        .unwrap();
    }
    let status = wait(&mut c, "cat", "").await;
    assert_eq!(status.exit_code, 0);
    assert_eq!(
        read_all(&mut c, "cat", "").await.stdout(),
        "hello world\ndone\n"
    );
    // Stdin is closed now.
    let err = c
        .write_stdin(WriteStdinRequest {
            process: pref("cat", ""),
            data: b"x".to_vec(),
            close: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    delete(&mut c, "cat").await;
}

#[tokio::test]
async fn terminal_resize_is_seen_by_the_process() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let mut s = spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "trap 'stty size; exit 0' WINCH; echo ready; while true; do sleep 0.05; done",
        ],
    );
    s["process"]["terminal"] = json!(true);
    c.create_container(create_req("tty", &s)).await.unwrap();
    let mut out = c
        .clone()
        .read_output(ReadOutputRequest {
            process: pref("tty", ""),
        })
        .await
        .unwrap()
        .into_inner();
    c.start_container(StartContainerRequest {
        container_id: "tty".into(),
    })
    .await
    .unwrap();
    let mut text = String::new();
    while !text.contains("ready") {
        let chunk = out.message().await.unwrap().expect("output before ready");
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    c.resize_tty(ResizeTtyRequest {
        process: pref("tty", ""),
        rows: 33,
        cols: 77,
    })
    .await
    .unwrap();
    while let Some(chunk) = out.message().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    // A terminal turns "\n" into "\r\n".
    assert!(text.contains("33 77\r\n"), "{text:?}");
    assert_eq!(wait(&mut c, "tty", "").await.exit_code, 0);
    delete(&mut c, "tty").await;
}

#[tokio::test]
async fn exec_runs_inside_the_container() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    c.create_container(create_req("srv", &spec(&rootfs, &["sleep", "1000"])))
        .await
        .unwrap();
    c.start_container(StartContainerRequest {
        container_id: "srv".into(),
    })
    .await
    .unwrap();
    let process = json!({
        "user": {"uid": 0, "gid": 0},
        "args": ["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; exit 5"],
        "env": ["PATH=/bin"],
        "cwd": "/"
    });
    c.exec_process(ExecProcessRequest {
        container_id: "srv".into(),
        exec_id: "e1".into(),
        oci_process_json: process.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    let status = wait(&mut c, "srv", "e1").await;
    let out = read_all(&mut c, "srv", "e1").await;
    assert_eq!(out.stdout(), "sleep 1000 \nbox\n", "{}", out.stderr());
    assert_eq!(status.exit_code, 5);
    // Waited and read: the agent forgot it.
    let err = c
        .wait_process(WaitProcessRequest {
            process: pref("srv", "e1"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // A live exec's id cannot be used twice.
    let long = json!({
        "user": {"uid": 0, "gid": 0}, "args": ["sleep", "1000"], "env": [], "cwd": "/"
    });
    for expected in [None, Some(tonic::Code::AlreadyExists)] {
        let got = c
            .exec_process(ExecProcessRequest {
                container_id: "srv".into(),
                exec_id: "long".into(),
                oci_process_json: long.to_string(),
                ..Default::default()
            })
            .await;
        assert_eq!(got.err().map(|e| e.code()), expected);
    }
    // An exec whose process names no capabilities gets the container's,
    // not the agent's full set.
    let caps = json!({
        "user": {"uid": 0, "gid": 0},
        "args": ["sh", "-c", "grep -E 'CapBnd|CapEff' /proc/self/status /proc/1/status"],
        "env": ["PATH=/bin"], "cwd": "/"
    });
    c.exec_process(ExecProcessRequest {
        container_id: "srv".into(),
        exec_id: "caps".into(),
        oci_process_json: caps.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(wait(&mut c, "srv", "caps").await.exit_code, 0);
    let out = read_all(&mut c, "srv", "caps").await.stdout();
    let values: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split(':').nth(2))
        .map(str::trim)
        .collect();
    assert_eq!(values.len(), 4, "{out}");
    assert_eq!(values[0..2], values[2..4], "{out}");
    assert_ne!(values[0], "000001ffffffffff", "{out}");
    delete(&mut c, "srv").await;
}

#[tokio::test]
async fn failed_starts_name_the_cause_and_leave_nothing_behind() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let mounts_before = agent.mountinfo();
    let mut bad_cwd = spec(&rootfs, &["true"]);
    bad_cwd["process"]["cwd"] = json!("/nowhere");
    let cases = [
        (
            create_req("nobin", &spec(&rootfs, &["no-such-binary"])),
            "\"no-such-binary\" not found",
        ),
        (
            CreateContainerRequest {
                username: "ghost".into(),
                ..create_req("nouser", &spec(&rootfs, &["true"]))
            },
            "user \"ghost\" not found",
        ),
        (create_req("nocwd", &bad_cwd), "/nowhere"),
    ];
    for (req, cause) in cases {
        let id = req.container_id.clone();
        let err = c.create_container(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{id}: {err:?}");
        assert!(err.message().contains(cause), "{id}: {}", err.message());
        // Nothing was registered: the id is free and unknown.
        let err = c
            .wait_process(WaitProcessRequest {
                process: pref(&id, ""),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }
    // A binary that exists but cannot be executed fails at start.
    std::fs::write(rootfs.join("bin/noexec"), "data").unwrap();
    c.create_container(create_req("noexec", &spec(&rootfs, &["/bin/noexec"])))
        .await
        .unwrap();
    let err = c
        .start_container(StartContainerRequest {
            container_id: "noexec".into(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("exec /bin/noexec"),
        "{}",
        err.message()
    );
    delete(&mut c, "noexec").await;
    assert_eq!(agent.mountinfo(), mounts_before);
}

#[tokio::test]
async fn delete_leaves_no_mounts_and_refuses_running_containers() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let mounts_before = agent.mountinfo();
    let volume = agent.dir.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    let mut s = spec(&rootfs, &["sleep", "1000"]);
    s["mounts"].as_array_mut().unwrap().push(
        json!({"destination": "/data", "type": "bind", "source": volume, "options": ["rbind"]}),
    );
    c.create_container(create_req("long", &s)).await.unwrap();
    c.start_container(StartContainerRequest {
        container_id: "long".into(),
    })
    .await
    .unwrap();
    let err = c
        .delete_container(DeleteContainerRequest {
            container_id: "long".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    delete(&mut c, "long").await;
    // Created but never started: deleted without force.
    c.create_container(create_req("idle", &s)).await.unwrap();
    c.delete_container(DeleteContainerRequest {
        container_id: "idle".into(),
        force: false,
    })
    .await
    .unwrap();
    assert_eq!(agent.mountinfo(), mounts_before);
    assert!(!agent.mountinfo().contains(rootfs.to_str().unwrap()));
    // Orphans left behind in the pod's pid namespace, and the helpers of
    // every create, were all reaped: the agent has no zombie children.
    let req = CreateContainerRequest {
        pid_mode: NamespaceMode::Pod as i32,
        ..create_req(
            "orphans",
            &spec(&rootfs, &["sh", "-c", "sleep 0.1 & sleep 0.1 & exit 0"]),
        )
    };
    run(&mut c, req).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(zombies_under(agent.pid()), Vec::<String>::new());
    delete(&mut c, "orphans").await;
    // The ids can be used again.
    let (out, _) = run(
        &mut c,
        create_req("long", &spec(&rootfs, &["echo", "again"])),
    )
    .await;
    assert_eq!(out.stdout(), "again\n");
}

#[tokio::test]
async fn malformed_requests_are_rejected_without_changes() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let good = spec(&rootfs, &["true"]);
    let mut no_args = good.clone();
    no_args["process"]["args"] = json!([]);
    let mut user_ns = good.clone();
    user_ns["linux"]["namespaces"] = json!([{"type": "user"}]);
    let mut missing_root = good.clone();
    missing_root["root"]["path"] = json!("/does/not/exist");
    let bad = [
        (
            CreateContainerRequest {
                oci_spec_json: "{not json".into(),
                ..create_req("x", &good)
            },
            tonic::Code::InvalidArgument,
        ),
        (create_req("../escape", &good), tonic::Code::InvalidArgument),
        (create_req("", &good), tonic::Code::InvalidArgument),
        (create_req("x", &no_args), tonic::Code::InvalidArgument),
        (create_req("x", &missing_root), tonic::Code::InvalidArgument),
        (create_req("x", &user_ns), tonic::Code::Unimplemented),
        (
            CreateContainerRequest {
                pid_mode: 99,
                ..create_req("x", &good)
            },
            tonic::Code::InvalidArgument,
        ),
    ];
    for (req, code) in bad {
        let err = c.create_container(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
    }
    let err = c
        .start_container(StartContainerRequest {
            container_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = c
        .signal_process(SignalProcessRequest {
            process: pref("x", ""),
            signal: 9,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = c
        .wait_process(WaitProcessRequest { process: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Limits without cgroup v2 (this host): refused, not ignored.
    let mut limited = good.clone();
    limited["linux"]["resources"] = json!({"memory": {"limit": 10_000_000}});
    let err = c
        .create_container(create_req("x", &limited))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        err.message()
    );

    // After all that, a good container still runs, with the id never taken.
    c.create_container(create_req("x", &good)).await.unwrap();
    let err = c
        .create_container(create_req("x", &good))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let err = c
        .signal_process(SignalProcessRequest {
            process: pref("x", ""),
            signal: 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    c.start_container(StartContainerRequest {
        container_id: "x".into(),
    })
    .await
    .unwrap();
    assert_eq!(wait(&mut c, "x", "").await.exit_code, 0);
    let err = c
        .start_container(StartContainerRequest {
            container_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    delete(&mut c, "x").await;
}

#[tokio::test]
async fn exits_are_published_as_events() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let mut events = c.events(EventsRequest {}).await.unwrap().into_inner();
    let (_, status) = run(
        &mut c,
        create_req("ev", &spec(&rootfs, &["sh", "-c", "exit 9"])),
    )
    .await;
    let event = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.process, pref("ev", ""));
    assert_eq!(event.kind, Some(event::Kind::Exit(status)));
    delete(&mut c, "ev").await;
}

#[tokio::test]
async fn seccomp_profiles_are_enforced() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    let profile = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["no_such_syscall"], "action": "SCMP_ACT_KILL"}
        ]
    });
    let script = "grep Seccomp: /proc/self/status; mkdir /tmp/blocked || echo refused; \
                  touch /tmp/allowed && echo touched";
    // Installed right before exec (no_new_privs) and, without it, before
    // the process drops its privileges.
    for (id, nnp) in [("nnp", true), ("privileged", false)] {
        let mut s = spec(&rootfs, &["sh", "-c", script]);
        s["process"]["noNewPrivileges"] = json!(nnp);
        s["linux"]["seccomp"] = profile.clone();
        let (out, status) = run(&mut c, create_req(id, &s)).await;
        assert_eq!(status.exit_code, 0, "{id}: {}", out.stderr());
        let stdout = out.stdout();
        assert!(stdout.contains("Seccomp:\t2"), "{id}: {stdout}");
        assert!(stdout.contains("refused\ntouched"), "{id}: {stdout}");
        assert!(
            out.stderr().contains("Permission denied"),
            "{id}: {}",
            out.stderr()
        );
        delete(&mut c, id).await;
    }
    // Notification needs a listener the agent does not have.
    let mut s = spec(&rootfs, &["true"]);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]
    });
    let err = c
        .create_container(create_req("notify", &s))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{}", err.message());
}
