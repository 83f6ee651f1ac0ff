//! Checks `guest-kernel-config/build.sh --config-only`: the shipped fragments
//! must produce a config in which every requested symbol survived, and a
//! requested symbol that cannot be set must make the script fail and be
//! named in its output.
//!
//! These tests need the build dependencies of the kernel config (Debian's
//! `linux-source-6.1`, flex, bison, make, gcc, ...); `build.sh` installs them
//! with apt-get when missing. If the script cannot run, the tests fail: they
//! never skip.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

fn fragment_dir() -> PathBuf {
    repo_root().join("guest-kernel-config")
}

fn build_sh() -> PathBuf {
    fragment_dir().join("build.sh")
}

/// Runs `build.sh --config-only ARGS...` and returns its output. Panics
/// (failing the test) if the script cannot be started at all.
fn run_config_only(args: &[&std::ffi::OsStr]) -> Output {
    let script = build_sh();
    assert!(script.is_file(), "{} is missing", script.display());
    Command::new(&script)
        .arg("--config-only")
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()))
}

fn describe(out: &Output) -> String {
    format!(
        "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn unsatisfiable_symbol_fails_and_is_named() {
    // DRM_I915 depends on PCI (and DRM, ...), which the guest config keeps
    // off, so Kconfig silently drops it: build.sh must notice.
    let mut extra = tempfile::Builder::new()
        .prefix("carapace-extra-")
        .suffix(".config")
        .tempfile()
        .expect("create temporary fragment");
    writeln!(extra, "# test: a driver whose dependencies are off").unwrap();
    writeln!(extra, "CONFIG_DRM_I915=y").unwrap();
    extra.flush().unwrap();

    let out = run_config_only(&["--extra-fragment".as_ref(), extra.path().as_os_str()]);
    let all = describe(&out);
    assert!(
        !out.status.success(),
        "build.sh accepted an unsatisfiable symbol:\n{all}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "build.sh should fail with exit code 1 (not crash):\n{all}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("CONFIG_DRM_I915"))
        .unwrap_or_else(|| panic!("build.sh did not name CONFIG_DRM_I915:\n{all}"));
    assert!(
        line.contains("requested y") && line.contains("got n"),
        "the line for CONFIG_DRM_I915 should give the requested and the actual value: {line:?}\n{all}"
    );
    // Only the unsatisfiable symbol is reported: the shipped fragments are fine.
    let reported: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(": requested "))
        .collect();
    assert_eq!(reported.len(), 1, "unexpected failures reported:\n{all}");
}

#[test]
fn shipped_fragments_pass_the_config_check() {
    let out_dir = tempfile::tempdir().expect("create temporary output dir");
    let out = run_config_only(&["--out".as_ref(), out_dir.path().as_os_str()]);
    let all = describe(&out);
    assert!(
        out.status.success(),
        "build.sh --config-only failed on the shipped fragments:\n{all}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("config check passed"),
        "build.sh did not report its config check:\n{all}"
    );

    // The symbols the rest of Carapace relies on, as they ended up in the config.
    let config = fs::read_to_string(out_dir.path().join("config"))
        .unwrap_or_else(|e| panic!("build.sh --out did not write config: {e}\n{all}"));
    for want in [
        "CONFIG_64BIT=y",
        "CONFIG_PVH=y",
        "CONFIG_BLK_DEV_INITRD=y",
        "CONFIG_SERIAL_8250_CONSOLE=y",
        "CONFIG_KVM_GUEST=y",
        "CONFIG_VIRTIO_MMIO=y",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
        "CONFIG_VIRTIO_VSOCKETS=y",
        "CONFIG_VIRTIO_BLK=y",
        "CONFIG_VIRTIO_NET=y",
        "CONFIG_VIRTIO_FS=y",
        "CONFIG_OVERLAY_FS=y",
        "CONFIG_MEMCG=y",
        "CONFIG_CPUSETS=y",
        "CONFIG_CFS_BANDWIDTH=y",
        "CONFIG_CGROUP_PIDS=y",
        "CONFIG_BLK_CGROUP=y",
        "CONFIG_CGROUP_HUGETLB=y",
        "CONFIG_USER_NS=y",
        "CONFIG_TIME_NS=y",
        "CONFIG_SECCOMP_FILTER=y",
        "CONFIG_IPV6=y",
        "# CONFIG_MODULES is not set",
    ] {
        assert!(
            config.lines().any(|l| l == want),
            "final config lacks `{want}`"
        );
    }
}

#[test]
fn every_fragment_starts_with_a_purpose_comment() {
    let mut fragments: Vec<PathBuf> = fs::read_dir(fragment_dir())
        .expect("read guest-kernel-config/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "config"))
        .collect();
    fragments.sort();
    assert!(
        !fragments.is_empty(),
        "no *.config fragments in guest-kernel-config/"
    );
    for f in fragments {
        let text = fs::read_to_string(&f).expect("read fragment");
        let first = text.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("# ") && first.len() > 10 && !first.contains("CONFIG_"),
            "{} must start with a comment line saying its purpose, found {first:?}",
            f.display()
        );
    }
}
