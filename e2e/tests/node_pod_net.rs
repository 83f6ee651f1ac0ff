//! Pod networking through the daemon with the builtin driver: inside the nested test node
//! (real kvm-amd `/dev/kvm`, see `carapace_e2e::node`), `carapace serve` with `vm.driver =
//! "builtin"` and a real CNI configuration (Debian's bridge + host-local + loopback plugins,
//! copied into the node with their libraries) runs a pod as kubelet would. The runtime
//! creates the pod's network namespace, runs the plugins, puts `tap0` next to the CNI `eth0`
//! with tc mirred redirections both ways (iproute2's `ip` and `tc`, also copied in), starts
//! `carapace-vmm` in that namespace with the tap as its virtio-net backend, and the agent
//! gives the guest's `eth0` the pod's address, MAC and routes.
//!
//! The node then checks the plumbing (namespace, tap, filters, the host-local reservation),
//! that traffic crosses the VM both ways (the node pings the pod and reads from a server in
//! it; the pod pings its gateway; 1 MiB each way over TCP, md5 compared; the VMM's net
//! device counts the frames). The daemon is then restarted under the running pod: the
//! node still pings the pod and reads from its server, and the new daemon's ExecSync reaches
//! its container. Last, the new daemon's StopPodSandbox + RemovePodSandbox leave nothing:
//! no namespace, veth, reservation, VMM, virtiofsd or VM directory. `carapace check` on the
//! node shows that `vm.driver = "auto"` picks the builtin driver there (hardware KVM).
//! Run with `cargo nextest run -p carapace-e2e --test node_pod_net`.

use std::path::{Path, PathBuf};

use carapace_e2e::node::{NodeBinaries, NodeImage, NodeKernel};

/// The pod network's range; host-local gives the bridge's gateway its first address.
const SUBNET: &str = "10.89.0.0/24";
const GATEWAY: &str = "10.89.0.1";

/// Modules the path needs beyond kvm and tun, in load order (each after what it depends on):
/// overlayfs for the root filesystems, the bridge, the veth pair, the ingress qdisc, the u32
/// classifier and the mirred action of `runtime/src/network/tap.rs`.
const MODULES: [(&str, &str); 8] = [
    ("overlay", "fs/overlayfs/overlay.ko"),
    ("llc", "net/llc/llc.ko"),
    ("stp", "net/802/stp.ko"),
    ("bridge", "net/bridge/bridge.ko"),
    ("veth", "drivers/net/veth.ko"),
    ("sch_ingress", "net/sched/sch_ingress.ko"),
    ("cls_u32", "net/sched/cls_u32.ko"),
    ("act_mirred", "net/sched/act_mirred.ko"),
];

/// Host programs the path runs: the CNI plugins (run by the daemon from `cni_bin_dirs`) and
/// iproute2 (the daemon's tap setup; busybox's `ip` and `tc` lack `-j`, `tuntap` and mirred).
const HOST_PROGRAMS: [&str; 5] = [
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
    "/usr/sbin/ip",
    "/usr/sbin/tc",
];

/// The container: a TCP server on 8080 (one `pong-from-the-pod` line per connection).
const SERVER: &str = "while true; do echo pong-from-the-pod | nc -l -p 8080; done";

/// The node's script after its PATH line. busybox `nc` quits when the socket reaches EOF
/// and half-closes on EOF of its input, so the receiving side of a transfer reads its input
/// from a fifo it holds open itself (see `node_vmm_net.rs`).
const SCRIPT: &str = r#"
for m in MODULES; do insmod /lib/modules/$m.ko || echo "@@error insmod $m"; done
ip link set lo up
mkdir -p /run/c/net.d /run/c/podlogs
cat > /run/c/net.d/10-podnet.conflist <<CONF
{"cniVersion": "1.0.0", "name": "podnet",
 "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "/run/c/ipam",
            "ranges": [[{"subnet": "SUBNET"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"}]}
CONF
cat > /run/c/config.toml <<CONFIG
socket = "/run/c/carapace.sock"
state_dir = "/run/c/state"
image_dir = "/run/c/images"
containers_dir = "/run/c/containers"
run_dir = "/run/c/vms"
[network]
cni_conf_dir = "/run/c/net.d"
cni_bin_dirs = ["/usr/lib/cni"]
netns_dir = "/run/c/netns"
required = true
[vm]
driver = "builtin"
kernel = "/guest/vmlinux"
initrd = "/guest/initramfs.cpio"
CONFIG
# What the default driver choice makes of this node's hardware KVM.
carapace check --kernel /guest/vmlinux --initrd /guest/initramfs.cpio >/run/c/check.out 2>&1
echo "@@check $?"
sed 's/^/check| /' /run/c/check.out
echo "@@check-driver $(sed -n 's/^driver: *//p' /run/c/check.out)"
carapace import --config /run/c/config.toml /busybox >/run/c/import.log 2>&1
echo "@@import $?"
sed 's/^/import| /' /run/c/import.log
carapace serve --config /run/c/config.toml 2>/run/c/daemon.log &
D=$!
S=/run/c/carapace.sock
i=0; while [ ! -S $S ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
grep -q "VM driver: builtin" /run/c/daemon.log && echo "@@driver builtin"

node_probe pod-run $S /run/c/podlogs web 'SERVER' >/run/c/pod.out
cat /run/c/pod.out
POD=$(sed -n 's/^@@pod-id //p' /run/c/pod.out)
CTR=$(sed -n 's/^@@ctr-id //p' /run/c/pod.out)
IP=$(sed -n 's/^@@pod-ip //p' /run/c/pod.out)
NS=/run/c/netns/$POD
X() { node_probe exec $S $CTR "$1"; }
N() { nsenter --net=$NS "$@"; }
# busybox's sh and nsenter prefer their own applets to PATH: iproute2 by its full path.
IPR=/usr/sbin/ip
TC=/usr/sbin/tc
mac() { sed -n 's/.*link\/ether \([0-9a-f:]*\).*/\1/p'; }

# The plumbing the runtime made for the pod.
[ -n "$POD" ] && [ -e "$NS" ] && echo "@@netns yes"
echo "@@ipam-reserved $(ls /run/c/ipam/podnet 2>/dev/null | grep -cxF "$IP")"
echo "@@ns-links $(N $IPR -o link | cut -d: -f2 | cut -d@ -f1 | tr -d ' ' | sort | tr '\n' ' ')"
N $TC filter show dev eth0 ingress | grep -q 'Redirect to device tap0' && echo "@@redirect-eth0 yes"
N $TC filter show dev tap0 ingress | grep -q 'Redirect to device eth0' && echo "@@redirect-tap0 yes"
N $IPR -o link show dev tap0 | grep -q 'LOWER_UP' && echo "@@tap-carrier yes"
echo "@@ns-mac $(N $IPR -o link show dev eth0 | mac)"
echo "@@host-veths $($IPR -o link show master cni0 | wc -l)"

# What the agent made of it in the guest.
echo "@@guest-addr $(X 'ip -o -4 addr show dev eth0' | awk '{print $4}')"
echo "@@guest-mac $(X 'ip -o link show dev eth0' | mac)"
echo "@@guest-route $(X 'ip route show default' | head -1)"

# Traffic across the VM.
if ping -c 3 -W 10 $IP >/dev/null 2>&1; then echo "@@node-ping ok"; else echo "@@node-ping failed"; fi
R=""; i=0
while [ -z "$R" ] && [ $i -lt 30 ]; do R=$(nc -w 5 $IP 8080 </dev/null); [ -n "$R" ] || sleep 1; i=$((i + 1)); done
echo "@@node-tcp $R"
X 'ping -c 3 -W 10 GATEWAY >/dev/null && echo ok' | sed 's/^/@@pod-ping /'
dd if=/dev/urandom of=/tmp/down bs=64k count=16 2>/dev/null
echo "@@down-sent $(md5sum </tmp/down | cut -d' ' -f1) $(wc -c </tmp/down)"
nc -l -p 9000 </tmp/down >/dev/null &
echo "@@down-received $(X 'mkdir -p /tmp && mkfifo /tmp/hold && nc GATEWAY 9000 <>/tmp/hold >/tmp/down; echo $(md5sum </tmp/down | cut -d" " -f1) $(wc -c </tmp/down)')"
mkfifo /tmp/hold
nc -l -p 9001 <>/tmp/hold >/tmp/up &
UP=$!
echo "@@up-sent $(X 'dd if=/dev/urandom of=/tmp/up bs=64k count=16 2>/dev/null; echo $(md5sum </tmp/up | cut -d" " -f1) $(wc -c </tmp/up); nc GATEWAY 9001 </tmp/up')"
i=0; while kill -0 $UP 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
kill $UP 2>/dev/null
echo "@@up-received $(md5sum </tmp/up | cut -d' ' -f1) $(wc -c </tmp/up)"
node_probe api /run/c/vms/$(echo $POD | cut -c1-16)/api.sock '{"action":"metrics"}'
grep -q "pod sandbox gets a warm VM" /run/c/daemon.log && echo "@@warm-taken yes"
echo "@@warm-vms $(ls /run/c/state/warm | wc -l)"

# A daemon restart under the running pod: its VM, namespace and tap stay, the pod stays
# reachable, the new daemon reaches its container, and the removal below is the new daemon's.
kill $D; wait $D
echo "@@restart-daemon-exit $?"
carapace serve --config /run/c/config.toml 2>>/run/c/daemon.log &
D=$!
i=0; while [ ! -S $S ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ping -c 3 -W 10 $IP >/dev/null 2>&1; then echo "@@restart-node-ping ok"; else echo "@@restart-node-ping failed"; fi
R=""; i=0
while [ -z "$R" ] && [ $i -lt 30 ]; do R=$(nc -w 5 $IP 8080 </dev/null); [ -n "$R" ] || sleep 1; i=$((i + 1)); done
echo "@@restart-node-tcp $R"
echo "@@restart-exec $(X 'echo alive-$((6 * 7))')"

# The pod ends as kubelet ends it; nothing may be left.
node_probe pod-rm $S $POD
# The pod is gone; the warm VM waiting for the next one goes with the daemon.
kill $D; wait $D
echo "@@daemon-exit $?"
echo "@@left-netns $(ls /run/c/netns | wc -l)"
echo "@@left-mounts $(grep -c ' /run/c/' /proc/mounts)"
echo "@@left-ipam $(ls /run/c/ipam/podnet | grep -c '^[0-9]')"
echo "@@left-veths $($IPR -o link show master cni0 | wc -l)"
echo "@@left-links $(ls /sys/class/net | sort | tr '\n' ' ')"
echo "@@left-net-namespaces $(for p in /proc/[0-9]*; do readlink $p/ns/net; done 2>/dev/null | sort -u | wc -l)"
echo "@@left-vmm $(ps | grep -c '[c]arapace-vmm')"
echo "@@left-virtiofsd $(ps | grep -c '[v]irtiofsd')"
echo "@@left-cni $(ps | grep -c '[/]usr/lib/cni/')"
echo "@@left-vm-dirs $(ls /run/c/vms | wc -l)"
echo "@@left-records $(ls /run/c/state/sandboxes /run/c/state/containers /run/c/state/warm | grep -vc -e '^$' -e ':$')"
sed 's/^/daemon| /' /run/c/daemon.log | tail -60
for c in /run/c/vms/*/console.log; do [ -f "$c" ] && sed 's/^/guest| /' "$c" | tail -30; done
true
"#;

#[test]
fn node_pod_network_through_cni_with_the_builtin_driver() {
    let layout = carapace_e2e::busybox_image();
    let virtiofsd = carapace::vm::find_in_path("virtiofsd").expect("virtiofsd (setup installs it)");
    // For the daemon (it finds programs through PATH): iproute2 before busybox's applets in
    // /bin (the tap setup needs `ip -j`, `ip tuntap` and tc mirred, which busybox lacks),
    // and virtiofsd, which host_program() puts at its host path.
    let path = format!(
        "export PATH=\"/usr/sbin:/usr/bin:/sbin:/bin:{}\"\n",
        virtiofsd.parent().unwrap().display()
    );
    let modules: Vec<&str> = MODULES.iter().map(|(name, _)| *name).collect();
    let script = SCRIPT
        .replace("MODULES", &modules.join(" "))
        .replace("SUBNET", SUBNET)
        .replace("GATEWAY", GATEWAY)
        .replace("'SERVER'", &format!("'{SERVER}'"));
    let kernel = NodeKernel::locate();
    let mut image = NodeImage::new(&(path + &script))
        .file("bin/carapace", &NodeBinaries::daemon(), 0o755)
        .host_program(&virtiofsd);
    for (name, rel) in MODULES {
        image = image.file(
            &format!("lib/modules/{name}.ko"),
            &kernel.module(rel),
            0o644,
        );
    }
    for program in HOST_PROGRAMS {
        let program = Path::new(program);
        assert!(
            program.is_file(),
            "{} is missing (Debian's containernetworking-plugins and iproute2; scripts/setup.sh installs them)",
            program.display()
        );
        image = image.host_program(program);
    }
    for file in files_under(&layout) {
        let rel = file.strip_prefix(&layout).unwrap().display().to_string();
        image = image.file(&format!("busybox/{rel}"), &file, 0o644);
    }
    let out = image.run();
    // Shown with --no-capture (and by nextest on failure).
    for line in out.console.lines().filter(|l| l.contains("@@")) {
        println!("{line}");
    }
    println!("node ran {:.1?}", out.elapsed);
    out.check(out.try_get("error").is_none(), "every module loads");
    out.check(out.get("check") == "0", "carapace check passes on the node");
    let auto = out.get("check-driver");
    out.check(
        auto.starts_with("builtin ") && auto.contains("(auto: host has hardware KVM"),
        &format!("vm.driver = \"auto\" picks the builtin driver on the node: {auto:?}"),
    );
    out.check(out.get("import") == "0", "the busybox layout imports");
    out.check(
        out.try_get("driver") == Some("builtin"),
        "the daemon uses the builtin driver",
    );
    out.check(out.try_get("pod-run").is_none(), "the pod runs through CRI");

    // The plumbing.
    let ip = out.get("pod-ip");
    out.check(
        ip.starts_with("10.89.0.") && ip != GATEWAY,
        &format!("the pod got an address from host-local in {SUBNET}: {ip:?}"),
    );
    out.check(out.try_get("netns") == Some("yes"), "the pod has its netns");
    out.check(
        out.get("ipam-reserved") == "1",
        "host-local reserved the pod's address",
    );
    out.check(
        out.get("ns-links") == "eth0 lo tap0 ",
        "the pod netns holds lo, the CNI eth0 and tap0",
    );
    out.check(
        out.try_get("redirect-eth0") == Some("yes") && out.try_get("redirect-tap0") == Some("yes"),
        "tc mirred redirects eth0 <-> tap0",
    );
    out.check(
        out.try_get("tap-carrier") == Some("yes"),
        "carapace-vmm holds tap0 (carrier up)",
    );
    out.check(
        out.get("host-veths") == "1",
        "the pod's veth is on the bridge",
    );

    // The guest side.
    out.check(
        out.get("guest-addr") == format!("{ip}/24"),
        "the guest's eth0 carries the pod IP",
    );
    let ns_mac = out.get("ns-mac");
    out.check(
        ns_mac.len() == 17 && out.get("guest-mac") == ns_mac,
        "the guest's eth0 has the CNI eth0's MAC",
    );
    out.check(
        out.get("guest-route")
            .starts_with(&format!("default via {GATEWAY} ")),
        "the guest's default route goes through the bridge",
    );

    // Traffic.
    out.check(out.get("node-ping") == "ok", "the node pings the pod");
    out.check(
        out.get("node-tcp") == "pong-from-the-pod",
        "the node reads from the pod's TCP server",
    );
    out.check(
        out.try_get("pod-ping") == Some("ok"),
        "the pod pings its gateway",
    );
    out.check_transfer(
        "down-sent",
        "down-received",
        1 << 20,
        "1 MiB from the node to the pod",
    );
    out.check_transfer(
        "up-sent",
        "up-received",
        1 << 20,
        "1 MiB from the pod to the node",
    );
    let net = out.vmm_device("api", 1);
    let c = &net["counters"];
    println!("pod VM's net device counters: {c}");
    for key in ["rx_bytes", "tx_bytes"] {
        let v = c[key].as_u64().unwrap_or(0);
        out.check(
            v >= 1 << 20,
            &format!("the VMM's net device moved {key} = {v} (at least 1 MiB)"),
        );
    }
    for key in ["invalid_descriptors", "tap_errors", "interrupt_errors"] {
        out.check(c[key] == 0, &format!("{key} is 0: {c}"));
    }

    // The pod got the warm VM booted for it (vm.warm_pool defaults to 1),
    // so the MAC, address and traffic checks above are of a VM that booted
    // before its network existed.
    out.check(
        out.try_get("warm-taken") == Some("yes"),
        "the pod got a warm VM",
    );
    out.check(
        out.get("warm-vms") == "1",
        "a replacement warm VM while the daemon runs",
    );

    // Across a daemon restart.
    out.check(
        out.get("restart-daemon-exit") == "0",
        "the first daemon stops cleanly on SIGTERM with the pod running",
    );
    out.check(
        out.get("restart-node-ping") == "ok",
        "after the restart, the node still pings the pod",
    );
    out.check(
        out.get("restart-node-tcp") == "pong-from-the-pod",
        "after the restart, the node still reads from the pod's TCP server",
    );
    out.check(
        out.get("restart-exec") == "alive-42",
        "the new daemon's ExecSync reaches the pod's container",
    );

    // Teardown by the new daemon (then stopped: its warm VM too).
    out.check(
        out.get("pod-stop") == "ok" && out.get("pod-remove") == "ok",
        "the new daemon's StopPodSandbox and RemovePodSandbox succeed",
    );
    for (key, what) in [
        ("left-netns", "no pod netns file"),
        ("left-mounts", "no mount under the daemon's directories"),
        ("left-ipam", "no host-local reservation"),
        ("left-veths", "no veth on the bridge"),
        ("left-vmm", "no carapace-vmm"),
        ("left-virtiofsd", "no virtiofsd"),
        ("left-cni", "no CNI plugin process"),
        ("left-vm-dirs", "no VM run directory"),
        ("left-records", "no pod or container record"),
    ] {
        out.check(out.get(key) == "0", &format!("{what} left"));
    }
    out.check(
        out.get("left-links") == "cni0 lo ",
        "only the bridge and lo are left on the node",
    );
    out.check(
        out.get("left-net-namespaces") == "1",
        "every process is back in the node's own network namespace",
    );
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
