//! Containers in the real guest: a busybox container run through the agent
//! API under QEMU, and the cgroup v2 behaviour that only the guest kernel
//! can show (limits, OOM kills, updates, cleanup).
//!
//! The guest has no virtio-fs share yet in this tier, so the test ships the
//! busybox root filesystem in the initramfs: it appends a second newc
//! archive (the kernel unpacks concatenated archives) holding `/rootfs`
//! to the image `cargo xtask guest-image` built, and boots that.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use carapace_agent_api::v1::agent_client::AgentClient;
use carapace_agent_api::v1::*;
use carapace_e2e::TestVm;
use tonic::transport::Channel;

type Grpc = AgentClient<Channel>;

const ROOTFS: &str = "/rootfs";
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "sleep", "ls", "dd", "seq", "true", "grep", "wc", "hostname",
];

/// Appends one newc entry to `out`.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 1, 0, data.len(), 0, 0, 0, 0, 0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The busybox root filesystem as a newc archive rooted at /rootfs.
fn rootfs_archive() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("Debian's busybox-static: /bin/busybox");
    let mut out = Vec::new();
    let mut ino = 0x10000;
    let mut next = || {
        ino += 1;
        ino
    };
    for dir in ["", "/bin", "/etc", "/proc", "/sys", "/dev", "/tmp"] {
        cpio_entry(&mut out, next(), &format!("rootfs{dir}"), 0o040755, &[]);
    }
    cpio_entry(&mut out, next(), "rootfs/bin/busybox", 0o100755, &busybox);
    for applet in APPLETS {
        let name = format!("rootfs/bin/{applet}");
        cpio_entry(&mut out, next(), &name, 0o120777, b"busybox");
    }
    cpio_entry(
        &mut out,
        next(),
        "rootfs/etc/passwd",
        0o100644,
        b"root:x:0:0:root:/root:/bin/sh\n",
    );
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    while !out.len().is_multiple_of(512) {
        out.push(0);
    }
    out
}

/// A guest directory with the built kernel and the initramfs plus the
/// rootfs archive; exported as CARAPACE_GUEST_DIR for the fixture.
fn guest_with_rootfs() {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let built = carapace_e2e::GuestArtifacts::locate();
        // Under the target directory, rewritten by every run (atomically,
        // so that concurrent runs of this binary do not see half a file).
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
        let dir = target.join("e2e-guest-with-rootfs");
        std::fs::create_dir_all(&dir).unwrap();
        let unique = format!(".{}", std::process::id());
        let link_tmp = dir.join(format!("vmlinux{unique}"));
        let _ = std::fs::remove_file(&link_tmp);
        std::os::unix::fs::symlink(&built.kernel, &link_tmp).unwrap();
        std::fs::rename(&link_tmp, dir.join("vmlinux")).unwrap();
        let mut image = std::fs::read(&built.initrd).unwrap();
        while !image.len().is_multiple_of(4) {
            image.push(0);
        }
        image.extend(rootfs_archive());
        let image_tmp = dir.join(format!("initramfs.cpio{unique}"));
        std::fs::write(&image_tmp, image).unwrap();
        std::fs::rename(&image_tmp, dir.join("initramfs.cpio")).unwrap();
        // Every test of this binary uses the same directory.
        std::env::set_var("CARAPACE_GUEST_DIR", &dir);
        dir
    });
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_list(items: &[&str]) -> String {
    let items: Vec<String> = items.iter().map(|s| json_str(s)).collect();
    format!("[{}]", items.join(","))
}

/// An OCI process object.
fn process_json(args: &[&str]) -> String {
    format!(
        r#"{{"user":{{"uid":0,"gid":0}},"args":{},"env":["PATH=/bin"],"cwd":"/"}}"#,
        json_list(args)
    )
}

/// An OCI spec for a busybox container; `resources` is a JSON object.
fn spec_json(args: &[&str], resources: &str) -> String {
    format!(
        r#"{{"ociVersion":"1.0.2",
  "process":{process},
  "root":{{"path":"{ROOTFS}"}},
  "hostname":"busybox",
  "mounts":[
    {{"destination":"/proc","type":"proc","source":"proc"}},
    {{"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","mode=755"]}},
    {{"destination":"/sys","type":"sysfs","source":"sysfs","options":["nosuid","noexec","nodev","ro"]}},
    {{"destination":"/sys/fs/cgroup","type":"cgroup","source":"cgroup","options":["nosuid","noexec","nodev","ro"]}}
  ],
  "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}},{{"type":"cgroup"}}],
            "resources":{resources}}}}}"#,
        process = process_json(args)
    )
}

async fn create(grpc: &mut Grpc, id: &str, spec: String) {
    grpc.create_container(CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create {id}: {}", e.message()));
}

async fn start(grpc: &mut Grpc, id: &str) {
    grpc.start_container(StartContainerRequest {
        container_id: id.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("start {id}: {}", e.message()));
}

fn pref(id: &str, exec: &str) -> Option<ProcessRef> {
    Some(ProcessRef {
        container_id: id.into(),
        exec_id: exec.into(),
    })
}

async fn stdout(grpc: &mut Grpc, id: &str, exec: &str) -> String {
    let mut stream = grpc
        .read_output(ReadOutputRequest {
            process: pref(id, exec),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        out.extend(chunk.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn wait(grpc: &mut Grpc, id: &str, exec: &str) -> ExitStatus {
    grpc.wait_process(WaitProcessRequest {
        process: pref(id, exec),
    })
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
}

async fn exec(grpc: &mut Grpc, id: &str, exec_id: &str, args: &[&str]) -> (String, ExitStatus) {
    grpc.exec_process(ExecProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        oci_process_json: process_json(args),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("exec {exec_id}: {}", e.message()));
    let status = wait(grpc, id, exec_id).await;
    (stdout(grpc, id, exec_id).await, status)
}

async fn delete(grpc: &mut Grpc, id: &str) {
    grpc.delete_container(DeleteContainerRequest {
        container_id: id.into(),
        force: true,
    })
    .await
    .unwrap_or_else(|e| panic!("delete {id}: {}", e.message()));
}

/// The next event of container `id`'s own process that `want` accepts.
async fn next_event(
    events: &mut tonic::Streaming<Event>,
    id: &str,
    want: impl Fn(&event::Kind) -> bool,
) -> event::Kind {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .expect("an event within 30 s")
            .unwrap()
            .expect("the event stream stays open");
        if event.process == pref(id, "") {
            if let Some(kind) = event.kind.filter(|k| want(k)) {
                return kind;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_container_runs_execs_and_reports_stats() {
    guest_with_rootfs();
    let mut vm = TestVm::boot().await;
    let grpc = vm.agent().grpc();

    // Pod-wide setup: hostname, DNS file, a sysctl; a share that does not
    // exist is an error naming its tag.
    let sandbox = grpc
        .setup_sandbox(SetupSandboxRequest {
            hostname: "pod-1".into(),
            resolv_conf: "nameserver 10.96.0.10\nsearch default.svc\n".into(),
            sysctls: [("net.ipv4.ip_forward".to_owned(), "1".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        sandbox.resolv_conf_path,
        "/run/carapace/sandbox/resolv.conf"
    );
    let err = grpc
        .setup_sandbox(SetupSandboxRequest {
            shared_filesystems: vec![SharedFilesystem {
                tag: "no-such-tag".into(),
                mount_point: "/run/carapace/shared".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("no-such-tag"), "{}", err.message());
    let dns = format!(
        r#"{{"ociVersion":"1.0.2","process":{},"root":{{"path":"{ROOTFS}"}},
  "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
            {{"destination":"/etc/resolv.conf","type":"bind","source":"{}","options":["rbind","ro"]}}],
  "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}}]}}}}"#,
        process_json(&[
            "sh",
            "-c",
            "cat /etc/resolv.conf /proc/sys/net/ipv4/ip_forward"
        ]),
        sandbox.resolv_conf_path
    );
    create(grpc, "dns", dns).await;
    start(grpc, "dns").await;
    assert_eq!(wait(grpc, "dns", "").await.exit_code, 0);
    assert_eq!(
        stdout(grpc, "dns", "").await,
        "nameserver 10.96.0.10\nsearch default.svc\n1\n"
    );
    delete(grpc, "dns").await;

    // Output and exit code.
    let script = "echo hello from $(hostname); exit 3";
    create(grpc, "hello", spec_json(&["sh", "-c", script], "{}")).await;
    start(grpc, "hello").await;
    let status = wait(grpc, "hello", "").await;
    assert_eq!(stdout(grpc, "hello", "").await, "hello from busybox\n");
    assert_eq!((status.exit_code, status.reason.as_str()), (3, "Error"));
    delete(grpc, "hello").await;

    // A long-running container: exec into it, then its stats.
    let busy = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo warm; sleep 1000";
    create(grpc, "srv", spec_json(&["sh", "-c", busy], "{}")).await;
    start(grpc, "srv").await;
    let (out, status) = exec(
        grpc,
        "srv",
        "e1",
        &["sh", "-c", "echo in $(hostname); exit 4"],
    )
    .await;
    assert_eq!(out, "in busybox\n");
    assert_eq!(status.exit_code, 4);
    // Let the loop burn some CPU first.
    let mut reader = grpc.clone();
    let mut output = reader
        .read_output(ReadOutputRequest {
            process: pref("srv", ""),
        })
        .await
        .unwrap()
        .into_inner();
    let first = output.message().await.unwrap().unwrap();
    assert_eq!(first.data, b"warm\n");
    let stats = grpc
        .container_stats(ContainerStatsRequest {
            container_id: "srv".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cpu = stats.cpu.unwrap();
    let memory = stats.memory.unwrap();
    let pids = stats.pids.unwrap();
    assert!(cpu.usage_usec > 0, "{cpu:?}");
    assert!(memory.usage_bytes > 0, "{memory:?}");
    // busybox sh execs its last command: sleep is the only process.
    assert!(pids.current >= 1, "{pids:?}");
    assert!(stats.timestamp_unix_nanos > 0);
    delete(grpc, "srv").await;
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_limits_oom_update_and_cleanup_in_the_guest() {
    guest_with_rootfs();
    let mut vm = TestVm::boot().await;
    let grpc = vm.agent().grpc();

    // Limits are in effect in the container's own cgroup.
    let limits = r#"{"memory":{"limit":33554432},"pids":{"limit":8},
                     "cpu":{"shares":512,"quota":50000,"period":100000}}"#;
    // The inner shell forks sleeps until the pids limit stops it.
    let show = "cd /sys/fs/cgroup; cat memory.max pids.max cpu.max cpu.weight; \
                sh -c 'for i in $(seq 12); do sleep 60 & done' 2>/dev/null; \
                cat pids.events; echo forked; exec sleep 1000";
    create(grpc, "lim", spec_json(&["sh", "-c", show], limits)).await;
    start(grpc, "lim").await;
    let mut reader = grpc.clone();
    let mut output = reader
        .read_output(ReadOutputRequest {
            process: pref("lim", ""),
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while !text.contains("forked") {
        let chunk = output
            .message()
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("output ended: {text}"));
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    assert!(
        text.starts_with("33554432\n8\n50000 100000\n20\n"),
        "{text}"
    );
    let refused_forks: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("max "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pids.events in {text}"));
    assert!(refused_forks > 0, "the pids limit refused no fork: {text}");
    let stats = grpc
        .container_stats(ContainerStatsRequest {
            container_id: "lim".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let pids = stats.pids.unwrap();
    assert!(pids.current <= 8 && pids.current > 1, "{pids:?}");
    assert_eq!(pids.limit, 8);

    // Update in place.
    grpc.update_container_resources(UpdateContainerResourcesRequest {
        container_id: "lim".into(),
        oci_resources_json: r#"{"memory":{"limit":67108864},"pids":{"limit":100}}"#.into(),
    })
    .await
    .unwrap();
    let (out, _) = exec(
        grpc,
        "lim",
        "show",
        &[
            "cat",
            "/sys/fs/cgroup/memory.max",
            "/sys/fs/cgroup/pids.max",
        ],
    )
    .await;
    assert_eq!(out, "67108864\n100\n");
    let err = grpc
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: "lim".into(),
            oci_resources_json: r#"{"memory":{"limit":"lots"}}"#.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    delete(grpc, "lim").await;

    // A child of a running container OOM-killed: an Oom event, and the
    // container lives on.
    let mut events = grpc.events(EventsRequest {}).await.unwrap().into_inner();
    let small = r#"{"memory":{"limit":16777216}}"#;
    let child_hog = "dd if=/dev/zero of=/dev/null bs=64M count=1; echo survived; exec sleep 1000";
    create(grpc, "oomchild", spec_json(&["sh", "-c", child_hog], small)).await;
    start(grpc, "oomchild").await;
    let mut output = grpc
        .clone()
        .read_output(ReadOutputRequest {
            process: pref("oomchild", ""),
        })
        .await
        .unwrap()
        .into_inner();
    // stderr has the shell's "Killed"; stdout the proof it went on.
    let mut text = String::new();
    while !text.contains("survived") {
        let chunk = output.message().await.unwrap().expect("output");
        if chunk.stream == OutputStream::Stdout as i32 {
            text.push_str(&String::from_utf8_lossy(&chunk.data));
        }
    }
    let oom = next_event(&mut events, "oomchild", |k| {
        matches!(k, event::Kind::Oom(_))
    })
    .await;
    assert_eq!(oom, event::Kind::Oom(OomEvent { oom_kills: 1 }));
    let stats = grpc
        .container_stats(ContainerStatsRequest {
            container_id: "oomchild".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.memory.unwrap().oom_kills, 1);
    delete(grpc, "oomchild").await;

    // The container's own process over its memory limit: OOM-killed and
    // reported so, in its status and its exit event.
    let hog = ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"];
    create(grpc, "hog", spec_json(&hog, small)).await;
    start(grpc, "hog").await;
    let status = wait(grpc, "hog", "").await;
    assert_eq!(
        (status.exit_code, status.signal, status.reason.as_str()),
        (137, 9, "OOMKilled")
    );
    let exit = next_event(&mut events, "hog", |k| matches!(k, event::Kind::Exit(_))).await;
    assert_eq!(exit, event::Kind::Exit(status));
    delete(grpc, "hog").await;

    // A container whose process cannot start: the error names the cause,
    // and its cgroup is gone (checked by the listing below).
    let err = grpc
        .create_container(CreateContainerRequest {
            container_id: "broken".into(),
            oci_spec_json: spec_json(&["no-such-binary"], small),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("\"no-such-binary\" not found"),
        "{}",
        err.message()
    );

    // No cgroups left behind: a container that sees the whole tree.
    let list = format!(
        r#"{{"ociVersion":"1.0.2","process":{},"root":{{"path":"{ROOTFS}"}},
  "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
            {{"destination":"/sys","type":"sysfs","source":"sysfs","options":["ro"]}},
            {{"destination":"/sys/fs/cgroup","type":"cgroup","source":"cgroup","options":["ro"]}}],
  "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}}]}}}}"#,
        process_json(&["sh", "-c", "ls /sys/fs/cgroup/pod 2>&1"])
    );
    create(grpc, "lister", list).await;
    start(grpc, "lister").await;
    let status = wait(grpc, "lister", "").await;
    let listing = stdout(grpc, "lister", "").await;
    assert_eq!(status.exit_code, 0, "{listing}");
    let mut entries: Vec<&str> = listing
        .lines()
        .filter(|l| !l.starts_with("cgroup.") && !l.contains('.'))
        .collect();
    entries.sort();
    assert_eq!(entries, ["lister"], "{listing}");
    delete(grpc, "lister").await;
    vm.shutdown().await;
}
