//! The `carapace-vmm` binary: config errors, a payload run to completion, the control API,
//! and SIGTERM. Needs /dev/kvm (fails without it).

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

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
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
