//! Shared fixtures for the agent's host-side container tests: the agent
//! binary on a unix socket, a busybox root filesystem, OCI specs.
#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use carapace_agent_api::v1::agent_client::AgentClient;
use carapace_agent_api::v1::*;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

pub type Client = AgentClient<Channel>;

/// The agent, run as an ordinary process (a child subreaper) on a socket.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent for tests that create containers (root only).
    pub fn start() -> Agent {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the container tests create namespaces and mounts: run them as root"
        );
        Self::spawn()
    }

    /// Starts the agent; needs no privileges until a container is created.
    pub fn spawn() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_carapace-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .env("CARAPACE_AGENT_LOG", "carapace_agent=debug")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The socket file appears at bind(), a moment before listen().
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "agent does not accept connections"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent { child, socket, dir }
    }

    pub async fn client(&self) -> Client {
        let socket = self.socket.clone();
        let channel = Endpoint::from_static("http://agent")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move { UnixStream::connect(socket).await.map(TokioIo::new) }
            }))
            .await
            .unwrap();
        AgentClient::new(channel)
    }

    /// The agent's mount table.
    pub fn mountinfo(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.child.id())).unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn assert_alive(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "the agent exited");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "sleep", "ls", "id", "true", "false", "stty", "readlink", "grep", "head",
    "kill", "hostname", "dd", "env", "pwd", "wc", "tr", "touch", "mkdir", "seq", "yes",
];

/// A root filesystem with Debian's static busybox and a few users.
pub fn busybox_rootfs(parent: &Path) -> PathBuf {
    let root = parent.join("rootfs");
    for d in [
        "bin", "etc", "proc", "sys", "dev", "tmp", "home/app", "data",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("Debian's busybox-static provides /bin/busybox");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1235:App:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\napp:x:1235:\nwheel:x:10:app\naudio:x:29:other\n",
    )
    .unwrap();
    root
}

/// The default capabilities of a container runtime (Docker's set).
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// An OCI spec as a runtime would derive it from a CRI request.
pub fn spec(rootfs: &Path, args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS,
                "permitted": DEFAULT_CAPS, "inheritable": [], "ambient": []
            },
            "noNewPrivileges": false
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware",
                            "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"]
        }
    })
}

pub fn pref(id: &str, exec: &str) -> Option<ProcessRef> {
    Some(ProcessRef {
        container_id: id.into(),
        exec_id: exec.into(),
    })
}

pub fn create_req(id: &str, spec: &Value) -> CreateContainerRequest {
    CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec.to_string(),
        ..Default::default()
    }
}

/// Collected output of a process.
#[derive(Debug, Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Reads a process's output until end of file.
pub async fn read_all(client: &mut Client, id: &str, exec: &str) -> Output {
    let mut stream = client
        .read_output(ReadOutputRequest {
            process: pref(id, exec),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Output::default();
    while let Some(chunk) = stream.message().await.unwrap() {
        if chunk.stream == OutputStream::Stderr as i32 {
            out.stderr.extend(chunk.data);
        } else {
            out.stdout.extend(chunk.data);
        }
    }
    out
}

pub async fn wait(client: &mut Client, id: &str, exec: &str) -> ExitStatus {
    client
        .wait_process(WaitProcessRequest {
            process: pref(id, exec),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
}

/// Creates and starts a container, collects its output and exit status.
pub async fn run(client: &mut Client, req: CreateContainerRequest) -> (Output, ExitStatus) {
    let id = req.container_id.clone();
    client.create_container(req).await.unwrap();
    let mut reader = client.clone();
    let rid = id.clone();
    let output = tokio::spawn(async move { read_all(&mut reader, &rid, "").await });
    client
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    let status = wait(client, &id, "").await;
    let output = output.await.unwrap();
    (output, status)
}

pub async fn delete(client: &mut Client, id: &str) {
    client
        .delete_container(DeleteContainerRequest {
            container_id: id.into(),
            force: true,
        })
        .await
        .unwrap();
}
