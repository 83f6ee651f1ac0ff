//! virtio-fs end to end: the qemu driver's virtiofsd shares a host directory
//! with the real guest, the agent mounts it (SetupSandbox), and what the
//! host puts there is what the guest and its containers see: files written
//! before boot, mounts made after the VM started (as the daemon does for
//! root filesystems and volumes), and a container's root filesystem.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carapace::image::import::import_layout;
use carapace::image::{rootfs, ImageStore};
use carapace_agent_api::v1::agent_client::AgentClient;
use carapace_agent_api::v1::*;
use carapace_agent_api::SHARED_FS_MOUNT_POINT;
use carapace_e2e::{TestVm, VmOptions};
use nix::mount::{MntFlags, MsFlags};
use tonic::transport::Channel;

type Grpc = AgentClient<Channel>;

/// The name `cargo xtask busybox-image` gives its image.
const BUSYBOX: &str = "docker.io/library/busybox:latest";

/// A host mount undone when the test ends, pass or fail.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

fn bind_mount(source: &Path, target: &Path) -> Unmount {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap_or_else(|e| {
        panic!(
            "bind-mounting {} on {}: {e}",
            source.display(),
            target.display()
        )
    });
    Unmount(target.to_owned())
}

async fn mount_share(grpc: &mut Grpc) {
    grpc.setup_sandbox(SetupSandboxRequest {
        shared_filesystems: vec![SharedFilesystem {
            tag: carapace::vm::SHARED_FS_TAG.into(),
            mount_point: SHARED_FS_MOUNT_POINT.into(),
        }],
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("SetupSandbox: {}", e.message()));
}

/// An OCI spec: a busybox shell running `script` in the root filesystem
/// `root` (relative: under the share's mount point), with the whole share
/// bound at `/shared`.
fn spec_json(root: &str, script: &str) -> String {
    let script = script.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"{{"ociVersion":"1.0.2",
  "process":{{"user":{{"uid":0,"gid":0}},"args":["sh","-c","{script}"],"env":["PATH=/bin"],"cwd":"/"}},
  "root":{{"path":"{root}"}},
  "mounts":[
    {{"destination":"/proc","type":"proc","source":"proc"}},
    {{"destination":"/shared","type":"bind","source":"{SHARED_FS_MOUNT_POINT}","options":["rbind","rw"]}}
  ],
  "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}}]}}}}"#
    )
}

/// Creates and starts container `id`, waits for its exit and returns its
/// exit code and stdout; the container is deleted.
async fn run(grpc: &mut Grpc, id: &str, spec: String) -> (i32, String) {
    grpc.create_container(CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create {id}: {}", e.message()));
    grpc.start_container(StartContainerRequest {
        container_id: id.into(),
    })
    .await
    .unwrap_or_else(|e| panic!("start {id}: {}", e.message()));
    let process = Some(ProcessRef {
        container_id: id.into(),
        exec_id: String::new(),
    });
    let status = grpc
        .wait_process(WaitProcessRequest {
            process: process.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let mut stream = grpc
        .read_output(ReadOutputRequest { process })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        out.extend(chunk.data);
    }
    grpc.delete_container(DeleteContainerRequest {
        container_id: id.into(),
        force: true,
    })
    .await
    .unwrap_or_else(|e| panic!("delete {id}: {}", e.message()));
    (status.exit_code, String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_directory_reaches_the_guest_and_its_containers() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let ctr_dir = share.join("containers/c1");
    let late = share.join("volumes/late");
    for dir in [&ctr_dir, &late] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(share.join("hello.txt"), "written on the host before boot\n").unwrap();
    std::fs::write(share.join("in-place.txt"), "first version\n").unwrap();
    let store = Arc::new(ImageStore::open(tmp.path().join("images")).unwrap());
    import_layout(&store, &carapace_e2e::busybox_image(), None)
        .await
        .unwrap();

    let mut vm = TestVm::boot_with(VmOptions {
        shared_dir: Some(share.clone()),
        ..VmOptions::default()
    })
    .await;
    let fs = vm
        .handle()
        .fs
        .clone()
        .expect("virtiofsd runs for a shared dir");
    assert!(fs.is_running());
    let grpc = vm.agent().grpc();
    mount_share(grpc).await;
    // A repeated SetupSandbox leaves the mounted share alone.
    mount_share(grpc).await;

    // The container's root filesystem: the image's layer under an overlay,
    // mounted inside the share after virtiofsd started, exactly as the
    // daemon prepares one (and unmounted at the end, pass or fail).
    let rootfs_target = ctr_dir.join("rootfs");
    rootfs::prepare(
        &store,
        "c1",
        BUSYBOX,
        &tmp.path().join("state/c1"),
        &rootfs_target,
    )
    .unwrap();
    let _rootfs = Unmount(rootfs_target.clone());

    // (a) + (c): the container runs from the share and reads the file the
    // host wrote before boot; the volume directory is still empty. Its root
    // is a submount of the share: nodev, but set-id programs work.
    let (code, out) = run(
        grpc,
        "c1",
        spec_json(
            "containers/c1/rootfs",
            "awk '$5 == \"/\" { print $6 }' /proc/self/mountinfo; \
             echo running from the share; cat /shared/hello.txt /shared/in-place.txt; \
             ls -A /shared/volumes/late",
        ),
    )
    .await;
    let (root_options, out) = out.split_once('\n').unwrap_or_default();
    let root_options: Vec<&str> = root_options.split(',').collect();
    assert!(
        root_options.contains(&"nodev") && !root_options.contains(&"nosuid"),
        "the container's root is mounted {root_options:?}"
    );
    assert_eq!(
        (code, out),
        (
            0,
            "running from the share\nwritten on the host before boot\nfirst version\n"
        )
    );

    // Files the host changes after the guest read them (ConfigMap updates
    // swap in a new file, hostPath files change in place) are seen once the
    // guest's cached attributes expire (1 s with --cache=auto).
    let tmp_file = share.join(".hello.txt.new");
    std::fs::write(&tmp_file, "replaced on the host\n").unwrap();
    std::fs::rename(&tmp_file, share.join("hello.txt")).unwrap();
    std::fs::write(share.join("in-place.txt"), "second, longer version\n").unwrap();
    let changed_at = Instant::now();
    let script =
        "i=0; until grep -q replaced /shared/hello.txt && grep -q second /shared/in-place.txt \
                  || [ $i -ge 100 ]; do i=$((i+1)); sleep 0.1; done; \
                  cat /shared/hello.txt /shared/in-place.txt";
    let (code, out) = run(grpc, "c2", spec_json("containers/c1/rootfs", script)).await;
    eprintln!(
        "host-side changes were read in the guest {} ms after they were made",
        changed_at.elapsed().as_millis()
    );
    assert_eq!(
        (code, out.as_str()),
        (0, "replaced on the host\nsecond, longer version\n")
    );

    // (b): a directory bind-mounted under the share after the VM started
    // (the guest has already seen the empty directory underneath) appears
    // with its content within the entry timeout (1 s with --cache=auto),
    // as a mount of its own in the guest, and the guest's writes land in it.
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(
        volume.path().join("note.txt"),
        "bound after the VM started\n",
    )
    .unwrap();
    let _volume_mount = bind_mount(volume.path(), &late);
    let bound_at = Instant::now();
    let script = "i=0; while [ ! -e /shared/volumes/late/note.txt ] && [ $i -lt 100 ]; do \
                  i=$((i+1)); sleep 0.1; done; \
                  cat /shared/volumes/late/note.txt; \
                  grep -c ' /shared/volumes/late ' /proc/self/mountinfo; \
                  echo from the guest > /shared/volumes/late/reply.txt";
    let (code, out) = run(grpc, "c3", spec_json("containers/c1/rootfs", script)).await;
    eprintln!(
        "the late bind mount was read in the guest {} ms after it was made",
        bound_at.elapsed().as_millis()
    );
    assert_eq!((code, out.as_str()), (0, "bound after the VM started\n1\n"));
    assert_eq!(
        std::fs::read_to_string(volume.path().join("reply.txt")).unwrap(),
        "from the guest\n"
    );

    assert!(vm.handle().is_running());
    vm.shutdown().await;
    assert!(!fs.is_running(), "virtiofsd stops with the VM");
    rootfs::teardown(&store, "c1", &tmp.path().join("state/c1"), &rootfs_target)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_virtiofsd_died_is_not_running() {
    let share = tempfile::tempdir().unwrap();
    let vm = TestVm::boot_with(VmOptions {
        shared_dir: Some(share.path().to_owned()),
        ..VmOptions::default()
    })
    .await;
    let handle = vm.handle().clone();
    let fs = handle.fs.clone().expect("virtiofsd runs for a shared dir");
    let fs_socket = handle.fs_socket.clone().expect("virtiofsd's socket");
    assert!(handle.is_running() && fs_socket.exists());

    fs.kill_now();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs.is_running() {
        assert!(Instant::now() < deadline, "virtiofsd survived SIGKILL");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        handle.monitor.is_running(),
        "QEMU itself keeps running without its virtio-fs backend"
    );
    assert!(!handle.is_running());
    vm.shutdown().await;
    assert!(
        !handle.monitor.is_running() && !handle.backend.as_ref().is_some_and(|b| b.is_running())
    );
    assert!(!fs_socket.exists(), "stop() removes virtiofsd's socket");
}
