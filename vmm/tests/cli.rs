//! The `carapace-vmm` binary: config errors, a payload run to completion, the control API,
//! SIGTERM, the seccomp filters of every thread, and the jail. Needs /dev/kvm (fails without
//! it).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use carapace_vmm::api::call;
use common::*;

fn vmm_cmd(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_carapace-vmm"));
    c.arg("--config").arg(config);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn write_config(dir: &Path, json: &str) -> std::path::PathBuf {
    let p = dir.join("vm.json");
    std::fs::write(&p, json).unwrap();
    p
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("carapace-vmm did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `path` exists and, for a socket, accepts connections (its file appears at
/// `bind`, a moment before `listen`).
fn wait_for(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = |p: &Path| match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() => std::os::unix::net::UnixStream::connect(p).is_ok(),
        Ok(_) => true,
        Err(_) => false,
    };
    while !ready(path) {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn invalid_config_names_the_field_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), HELLO);
    let uds = dir.path().join("v.sock");
    let json = config_json(
        dir.path(),
        &kernel,
        &format!(
            r#", "vsock": {{"guest_cid": 1, "uds_path": "{}"}}"#,
            uds.display()
        ),
    );
    let out = vmm_cmd(&write_config(dir.path(), &json)).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vsock.guest_cid"), "{err}");
    assert!(!uds.exists());
    assert!(!dir.path().join("console.log").exists());

    let json = config_json(dir.path(), &kernel, r#", "mem_size": 64"#);
    let out = vmm_cmd(&write_config(dir.path(), &json)).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `mem_size`"), "{err}");

    let out = vmm_cmd(&dir.path().join("missing.json")).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.json"));
}

#[test]
fn payload_runs_to_reset_and_exits_zero() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), HELLO);
    let cfg = write_config(dir.path(), &config_json(dir.path(), &kernel, ""));
    let start = Instant::now();
    let mut child = vmm_cmd(&cfg).spawn().unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    eprintln!(
        "process start to guest reset and exit: {:?}",
        start.elapsed()
    );
    assert!(status.success(), "{status:?}");
    assert_eq!(
        std::fs::read(dir.path().join("console.log")).unwrap(),
        b"Hello from the guest\n"
    );
}

#[test]
fn control_api_and_sigterm() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), HALT_FOREVER);
    let api = dir.path().join("api.sock");
    let uds = dir.path().join("v.sock");
    let extra = format!(
        r#", "api_socket": "{}", "vsock": {{"guest_cid": 3, "uds_path": "{}"}}"#,
        api.display(),
        uds.display()
    );
    let cfg = write_config(dir.path(), &config_json(dir.path(), &kernel, &extra));
    let mut child = vmm_cmd(&cfg).spawn().unwrap();
    wait_for(&api);
    // The metrics below count the payload's one `out`: let it happen first.
    wait_for_console(dir.path(), b"H");

    let status = call(&api, r#"{"action": "status"}"#).unwrap();
    assert_eq!(status["state"], "running");
    assert_eq!(status["vcpus"], 1);
    assert_eq!(call(&api, r#"{"action": "pause"}"#).unwrap()["ok"], true);
    assert_eq!(
        call(&api, r#"{"action": "status"}"#).unwrap()["state"],
        "paused"
    );
    assert_eq!(call(&api, r#"{"action": "resume"}"#).unwrap()["ok"], true);
    assert_eq!(
        call(&api, r#"{"action": "status"}"#).unwrap()["state"],
        "running"
    );
    let metrics = call(&api, r#"{"action": "metrics"}"#).unwrap();
    assert_eq!(metrics["vcpus"][0]["io_out"], 1);
    assert_eq!(metrics["devices"][0]["type"], 19);
    assert_eq!(metrics["devices"][0]["counters"]["tx_packets"], 0);
    let bad = call(&api, r#"{"action": "reboot"}"#).unwrap();
    assert_eq!(bad["ok"], false);

    // SAFETY: sending SIGTERM to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(!api.exists(), "API socket left behind");
    assert!(!uds.exists(), "vsock socket left behind");
}

#[test]
fn api_shutdown_stops_the_vm() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), HALT_FOREVER);
    let api = dir.path().join("api.sock");
    let extra = format!(r#", "api_socket": "{}""#, api.display());
    let cfg = write_config(dir.path(), &config_json(dir.path(), &kernel, &extra));
    let mut child = vmm_cmd(&cfg).spawn().unwrap();
    wait_for(&api);
    assert_eq!(call(&api, r#"{"action": "shutdown"}"#).unwrap()["ok"], true);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success());
    assert!(!api.exists());
}

/// Waits until `dir/console.log` holds `want`.
fn wait_for_console(dir: &Path, want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read(dir.join("console.log")).unwrap_or_default() != want {
        assert!(Instant::now() < deadline, "the guest never wrote {want:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `Seccomp:` mode of every thread of `pid` (2 = filter).
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if name.starts_with("kvm-nx-lpage") {
            // KVM's huge-page recovery worker: a kernel task listed among our threads.
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        if let Some(mode) = status_field(&status, "Seccomp") {
            modes.push((name.trim().to_string(), mode));
        }
    }
    modes.sort();
    modes
}

/// The value of `field:` in a /proc status file.
fn status_field(status: &str, field: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

#[test]
fn every_thread_is_filtered_unless_seccomp_is_off() {
    require_kvm();
    for no_seccomp in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let kernel = write_kernel(dir.path(), HALT_FOREVER);
        let api = dir.path().join("api.sock");
        let extra = format!(r#", "api_socket": "{}""#, api.display());
        let cfg = write_config(dir.path(), &config_json(dir.path(), &kernel, &extra));
        let mut cmd = vmm_cmd(&cfg);
        if no_seccomp {
            cmd.arg("--no-seccomp");
        }
        let mut child = cmd.spawn().unwrap();
        wait_for(&api);
        // Once the API answers, the event loop runs (it installed its filter before serving);
        // once the guest wrote, the vCPU thread did too (it installs before KVM_RUN).
        assert_eq!(call(&api, r#"{"action": "status"}"#).unwrap()["ok"], true);
        wait_for_console(dir.path(), b"H");
        let modes = seccomp_modes(child.id());
        let want = if no_seccomp { "0" } else { "2" };
        let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["carapace-vmm", "signals", "vcpu0"], "{modes:?}");
        assert!(modes.iter().all(|(_, m)| m == want), "{modes:?}");
        assert_eq!(call(&api, r#"{"action": "shutdown"}"#).unwrap()["ok"], true);
        assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    }
}

/// The pid of `parent`'s only child.
fn only_child(parent: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|pid: &u32| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| status_field(&s, "PPid"))
                    .is_some_and(|p| p == parent.to_string())
            })
            .collect();
        match children.as_slice() {
            [one] => return *one,
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            other => panic!("expected one child of {parent}, found {other:?}"),
        }
    }
}

fn jail_json(root: &Path) -> String {
    format!(
        r#", "jail": {{"root": "{}", "uid": {JAIL_UID}, "gid": {JAIL_GID}}}"#,
        root.display()
    )
}

const JAIL_UID: u32 = 10_123;
const JAIL_GID: u32 = 10_456;

#[test]
fn jailed_payload_runs_to_reset_and_exits_zero() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), HELLO);
    let cfg = write_config(
        dir.path(),
        &config_json(dir.path(), &kernel, &jail_json(root.path())),
    );
    let mut child = vmm_cmd(&cfg).spawn().unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    assert_eq!(
        std::fs::read(dir.path().join("console.log")).unwrap(),
        b"Hello from the guest\n"
    );
}

#[test]
fn jailed_vmm_is_an_unprivileged_pid_1_in_its_root_and_stops_on_sigterm() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    // Kernel and console outside the jail: they are opened before entering it.
    let kernel = write_kernel(dir.path(), HALT_FOREVER);
    let api = root.path().join("api.sock");
    let uds = root.path().join("v.sock");
    let extra = format!(
        r#", "api_socket": "{}", "vsock": {{"guest_cid": 3, "uds_path": "{}"}}{}"#,
        api.display(),
        uds.display(),
        jail_json(root.path())
    );
    let cfg = write_config(dir.path(), &config_json(dir.path(), &kernel, &extra));
    let mut supervisor = vmm_cmd(&cfg).spawn().unwrap();
    wait_for(&api);
    // The API, bound by a relative path before pivot_root, is served from inside the jail.
    assert_eq!(
        call(&api, r#"{"action": "status"}"#).unwrap()["state"],
        "running"
    );
    wait_for_console(dir.path(), b"H");

    let vmm = only_child(supervisor.id());
    let ids = |pid: u32| {
        let s = proc_status(pid);
        (
            status_field(&s, "Uid").unwrap(),
            status_field(&s, "Gid").unwrap(),
            status_field(&s, "Groups").unwrap(),
            status_field(&s, "CapEff").unwrap(),
            status_field(&s, "CapPrm").unwrap(),
            status_field(&s, "CapBnd").unwrap(),
            status_field(&s, "NoNewPrivs").unwrap(),
            status_field(&s, "Seccomp").unwrap(),
        )
    };
    let uid = format!("{JAIL_UID}\t{JAIL_UID}\t{JAIL_UID}\t{JAIL_UID}");
    let gid = format!("{JAIL_GID}\t{JAIL_GID}\t{JAIL_GID}\t{JAIL_GID}");
    let zero = "0000000000000000".to_string();
    let want = (
        uid,
        gid,
        String::new(),
        zero.clone(),
        zero.clone(),
        zero,
        "1".to_string(),
        "2".to_string(),
    );
    assert_eq!(ids(vmm), want, "the jailed VMM");
    // The supervisor confines itself once the VMM is jailed, concurrently with the above.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ids(supervisor.id()) != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(ids(supervisor.id()), want, "the supervisor");
    // PID 1 of its own pid namespace, in its own mount namespace.
    let nspid = status_field(&proc_status(vmm), "NSpid").unwrap();
    assert_eq!(nspid, format!("{vmm}\t1"));
    for ns in ["mnt", "pid"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).unwrap();
        assert_ne!(ours, its, "{ns} namespace");
    }
    // Its root is the jail directory (the link reads "/" across mount namespaces, so compare
    // the directories themselves); the supervisor is chrooted there.
    use std::os::unix::fs::MetadataExt;
    let jail_dir = std::fs::metadata(root.path()).unwrap();
    let its_root = std::fs::metadata(format!("/proc/{vmm}/root/")).unwrap();
    assert_eq!(
        (its_root.dev(), its_root.ino()),
        (jail_dir.dev(), jail_dir.ino())
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/root", supervisor.id())).unwrap(),
        root.path()
    );
    // Nothing from the host is visible in there.
    assert!(std::fs::metadata(format!("/proc/{vmm}/root/proc/self")).is_err());

    let pid = supervisor.id() as i32;
    // SAFETY: sending SIGTERM to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = wait_exit(&mut supervisor, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        !Path::new(&format!("/proc/{vmm}")).exists(),
        "jailed VMM left behind"
    );
    let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
    assert!(left.is_empty(), "left in the jail: {left:?}");
}
