//! A pod through the daemon with the builtin driver: inside the nested test node (real
//! kvm-amd `/dev/kvm`, see `carapace_e2e::node`), `carapace serve` with `vm.driver =
//! "builtin"` runs a pod sandbox as a `carapace-vmm` VM (its root filesystem over virtio-fs
//! from virtiofsd through the VMM's vhost-user frontend, the agent over its virtio-vsock),
//! and `carapace demo` drives it through CRI as kubelet would: RunPodSandbox, CreateContainer,
//! StartContainer, the container's CRI log, StopPodSandbox, RemovePodSandbox; then
//! `node_probe cri` a second pod with a long-running container and ExecSync into it; then a
//! third pod across a restart of the daemon (ExecSync and removal by the new daemon). Every
//! VMM runs in its jail (`vm.jail`, the default).
//! Run with `cargo nextest run -p carapace-e2e --test node_pod`.

use std::path::{Path, PathBuf};

use carapace_e2e::node::{NodeBinaries, NodeImage, NodeKernel};

const SCRIPT: &str = r#"
insmod /lib/modules/overlay.ko || echo "@@error overlay.ko"
ip link set lo up
mkdir -p /run/c
cat > /run/c/config.toml <<CONFIG
socket = "/run/c/carapace.sock"
state_dir = "/run/c/state"
image_dir = "/run/c/images"
containers_dir = "/run/c/containers"
run_dir = "/run/c/vms"
[network]
cni_conf_dir = "/run/c/net.d"
netns_dir = "/run/c/netns"
required = false
[vm]
driver = "builtin"
kernel = "/guest/vmlinux"
initrd = "/guest/initramfs.cpio"
CONFIG
carapace import --config /run/c/config.toml /busybox >/run/c/import.log 2>&1
echo "@@import $?"
sed 's/^/import| /' /run/c/import.log
carapace serve --config /run/c/config.toml 2>/run/c/daemon.log &
D=$!
i=0; while [ ! -S /run/c/carapace.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
carapace demo --socket /run/c/carapace.sock --timeout 240 >/run/c/demo.out 2>/run/c/demo.err
echo "@@demo $?"
sed 's/^/demo| /' /run/c/demo.out /run/c/demo.err
grep -q "^Hello from a container in its own Carapace pod VM" /run/c/demo.out && echo "@@hello yes"
mkdir -p /run/c/podlogs
node_probe cri /run/c/carapace.sock /run/c/podlogs
# The warm VM's VMM (the jail's supervisor and the VMM itself) runs as its jail's uid.
echo "@@vmm-uids $(for p in $(pidof carapace-vmm); do awk '/^Uid:/ { print $2, $3, $4, $5 }' /proc/$p/status; done | tr ' ' '\n' | sort -u | tr '\n' ' ')"
# A daemon restart in the middle of a running pod: the pod's (jailed) VM keeps running, and
# the new daemon still reaches its container and removes it.
node_probe pod-run /run/c/carapace.sock /run/c/podlogs survivor 'echo up; sleep 600' >/run/c/survivor.out
sed 's/^@@/@@survivor-/' /run/c/survivor.out
POD=$(sed -n 's/^@@pod-id //p' /run/c/survivor.out)
CTR=$(sed -n 's/^@@ctr-id //p' /run/c/survivor.out)
# Free page reporting (vm.free_page_reporting, the default): the jailed VMMs punch what their
# guests freed out of the guest memfd. Each guest frees its initramfs at boot.
discarded() {
    for s in /run/c/vms/*/api.sock; do node_probe api "$s" '{"action":"metrics"}'; done |
        grep -o '"discarded_bytes":[0-9]*' | cut -d: -f2 | tr '\n' ' '
}
i=0; while ! discarded | grep -q '[1-9]' && [ $i -lt 60 ]; do sleep 0.5; i=$((i + 1)); done
echo "@@balloon-discarded $(discarded)"
kill $D; wait $D
carapace serve --config /run/c/config.toml 2>>/run/c/daemon.log &
D=$!
i=0; while [ ! -S /run/c/carapace.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
node_probe exec /run/c/carapace.sock "$CTR" 'echo alive-$((6 * 7))' >/run/c/exec.out 2>&1
echo "@@restart-exec $? $(grep -c '^alive-42$' /run/c/exec.out)"
node_probe pod-rm /run/c/carapace.sock "$POD" | sed 's/^@@/@@survivor-/'
echo "@@left-mounts $(grep -c ' /run/c/' /proc/mounts)"
echo "@@left-records $(ls /run/c/state/sandboxes /run/c/state/containers | grep -vc -e '^$' -e ':$')"
echo "@@left-layers $(ls /run/c/containers | wc -l)"
grep -q "VM driver: builtin" /run/c/daemon.log && echo "@@driver builtin"
grep -q "pod sandbox gets a warm VM" /run/c/daemon.log && echo "@@warm-taken yes"
echo "@@warm-vms $(ls /run/c/state/warm | wc -l)"
# Pods are gone; the warm VM waiting for the next one goes with the daemon.
kill $D; wait $D
echo "@@daemon-exit $?"
echo "@@left-vmm $(ps | grep -c '[c]arapace-vmm')"
echo "@@left-virtiofsd $(ps | grep -c '[v]irtiofsd')"
echo "@@left-vm-dirs $(ls /run/c/vms | wc -l)"
echo "@@left-warm $(ls /run/c/state/warm | wc -l)"
sed 's/^/daemon| /' /run/c/daemon.log | tail -40
for c in /run/c/vms/*/console.log; do [ -f "$c" ] && sed 's/^/guest| /' "$c" | tail -30; done
true
"#;

#[test]
fn node_pod_through_cri_with_the_builtin_driver() {
    let layout = carapace_e2e::busybox_image();
    let virtiofsd = carapace::vm::find_in_path("virtiofsd").expect("virtiofsd (setup installs it)");
    // host_program() puts virtiofsd at its host path; the daemon finds it through PATH.
    let path = format!(
        "export PATH=\"$PATH:{}\"\n",
        virtiofsd.parent().unwrap().display()
    );
    let mut image = NodeImage::new(&(path + SCRIPT))
        .file("bin/carapace", &NodeBinaries::daemon(), 0o755)
        .file(
            "lib/modules/overlay.ko",
            &NodeKernel::locate().module("fs/overlayfs/overlay.ko"),
            0o644,
        )
        .host_program(&virtiofsd);
    for file in files_under(&layout) {
        let rel = file.strip_prefix(&layout).unwrap().display().to_string();
        image = image.file(&format!("busybox/{rel}"), &file, 0o644);
    }
    let out = image.run();
    // Shown with --no-capture (and by nextest on failure).
    for line in out
        .console
        .lines()
        .filter(|l| l.contains("demo| ") || l.contains("@@"))
    {
        println!("{line}");
    }
    out.check(out.get("import") == "0", "the busybox layout imports");
    out.check(
        out.try_get("driver") == Some("builtin"),
        "the daemon uses the builtin driver",
    );
    out.check(out.get("demo") == "0", "the demo pod runs through CRI");
    out.check(
        out.try_get("hello") == Some("yes"),
        "the container's log reaches CRI",
    );
    for step in [
        "run-pod",
        "container",
        "log",
        "exec",
        "stop-pod",
        "remove-pod",
    ] {
        out.check(
            out.try_get(&format!("cri-{step}")) == Some("ok"),
            &format!("CRI step {step} with the builtin driver"),
        );
    }
    out.check(
        out.get("left-mounts") == "0",
        "no mount left under the daemon's directories",
    );
    out.check(
        out.get("left-records") == "0",
        "no pod or container record left",
    );
    out.check(out.get("left-layers") == "0", "no writable layer left");
    out.check(
        out.try_get("warm-taken") == Some("yes"),
        "a pod got a warm VM (vm.warm_pool defaults to 1)",
    );
    out.check(
        out.get("warm-vms") == "1",
        "a replacement warm VM while the daemon runs",
    );
    out.check(
        out.try_get("survivor-pod-run").is_none() && out.try_get("survivor-ctr-id").is_some(),
        "a pod with a long-running container runs",
    );
    out.check(
        out.get("restart-exec") == "0 1",
        "after a daemon restart, ExecSync reaches the running pod's container",
    );
    for step in ["pod-stop", "pod-remove"] {
        out.check(
            out.try_get(&format!("survivor-{step}")) == Some("ok"),
            &format!("the restarted daemon's {step} of the running pod"),
        );
    }
    out.check(
        out.get("balloon-discarded")
            .split_whitespace()
            .any(|b| b.parse::<u64>().is_ok_and(|b| b >= 2 << 20)),
        "a pod VM's balloon gave freed guest memory back (a hole punched in its memfd, jailed)",
    );
    let base = u64::from(carapace::config::Config::default().vm.jail_id_base);
    let jail_ids = base..base + u64::from(carapace::config::JAIL_IDS);
    let uids: Vec<u64> = out
        .get("vmm-uids")
        .split_whitespace()
        .filter_map(|u| u.parse().ok())
        .collect();
    out.check(
        uids.len() == 1 && jail_ids.contains(&uids[0]),
        "the VMM runs jailed, as one uid of vm.jail_id_base's range (the default)",
    );
    out.check(
        out.get("left-vmm") == "0",
        "no carapace-vmm left after the pods are removed and the daemon stopped",
    );
    out.check(out.get("left-virtiofsd") == "0", "no virtiofsd left");
    out.check(out.get("left-vm-dirs") == "0", "no VM run directory left");
    out.check(out.get("left-warm") == "0", "no warm VM record left");
    out.check(
        out.get("daemon-exit") == "0",
        "the daemon stops cleanly on SIGTERM",
    );
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}
