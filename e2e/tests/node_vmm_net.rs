//! Node test (c): our virtio-net device on a tap, inside the nested test node (see
//! `carapace_e2e::node`). The node creates a persistent tap (as the runtime does in the pod's
//! netns), `carapace-vmm` attaches to it, and a busybox guest talks to the node both ways:
//! ping in each direction, a file from the node to the guest and one from the guest to the
//! node over TCP (checksums compared), and a TCP connection the node opens to the guest.
//! The guest takes mergeable receive buffers, so the node's large TSO frames reach it spread
//! over several of them.
//! Run with `cargo nextest run -p carapace-e2e --test node_vmm_net`.

use carapace_e2e::node::{busybox_guest_initramfs, NodeImage};

const GUEST_MAC: &str = "02:ca:fe:00:00:02";

/// The guest: configures eth0, pings the node, downloads and uploads a file, then waits for
/// the node's connection and resets the VM.
///
/// busybox `nc` exits as soon as the socket reaches EOF, even with input left to send, and
/// half-closes on EOF of its input; so the side of a transfer that only receives reads its
/// input from a fifo it holds open itself (`<>`), never sees EOF there, and never cuts the
/// sender short.
const NET_GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
echo "@@guest_ifaces $(ls /sys/class/net | tr '\n' ' ')"
echo "@@guest_mac $(cat /sys/class/net/eth0/address)"
echo "@@guest_mtu $(cat /sys/class/net/eth0/mtu)"
echo "@@guest_features $(cat /sys/class/net/eth0/device/features)"
ip link set lo up
ip addr add 10.0.2.2/24 dev eth0
ip link set eth0 up
if ping -c 3 -W 10 10.0.2.1 >/dev/null 2>&1; then echo "@@guest_ping ok"; else echo "@@guest_ping failed"; fi
mkfifo /tmp/hold
nc 10.0.2.1 5000 <>/tmp/hold >/tmp/down
echo "@@guest_down $(md5sum </tmp/down | cut -d' ' -f1) $(wc -c </tmp/down)"
dd if=/dev/urandom of=/tmp/up bs=64k count=32 2>/dev/null
echo "@@guest_up $(md5sum </tmp/up | cut -d' ' -f1) $(wc -c </tmp/up)"
nc 10.0.2.1 5001 </tmp/up >/dev/null
echo "@@guest_listening"
nc -l -p 6000 <>/tmp/hold >/tmp/msg
echo "@@guest_msg $(cat /tmp/msg)"
reboot -f
"#;

#[test]
fn node_vmm_net_guest_and_node_talk_over_a_tap() {
    let guest = busybox_guest_initramfs(NET_GUEST_INIT);
    let script = format!(
        r#"
echo "@@tun_dev $(ls /dev/net/tun 2>&1)"
tunctl -t tap0 >/dev/null && echo "@@tap_created yes"
ip addr add 10.0.2.1/24 dev tap0
ip link set tap0 up
dd if=/dev/urandom of=/tmp/down bs=64k count=32 2>/dev/null
echo "@@node_down $(md5sum </tmp/down | cut -d' ' -f1) $(wc -c </tmp/down)"
nc -l -p 5000 </tmp/down >/dev/null &
mkfifo /tmp/hold
nc -l -p 5001 <>/tmp/hold >/tmp/up &
UP=$!
mkdir -p /run/vm
cat > /tmp/vm.json <<EOF
{{"vcpus": 1, "mem_size_mib": 256,
 "kernel": "/guest/vmlinux", "initrd": "/guest/net-guest.cpio",
 "cmdline": "console=ttyS0 reboot=k panic=1 pci=off quiet",
 "serial": {{"file": "/run/vm/console.log"}},
 "net": [{{"tap": "tap0", "mac": "{GUEST_MAC}", "mtu": 1400}}],
 "api_socket": "/run/vm/api.sock"}}
EOF
timeout 400 carapace-vmm --config /tmp/vm.json &
VMM=$!
i=0
while ! grep -q '@@guest_listening' /run/vm/console.log 2>/dev/null && [ $i -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
kill $UP 2>/dev/null; wait $UP
echo "@@node_up $(md5sum </tmp/up | cut -d' ' -f1) $(wc -c </tmp/up)"
if ping -c 3 -W 10 10.0.2.2 >/dev/null 2>&1; then echo "@@node_ping ok"; else echo "@@node_ping failed"; fi
node_probe api /run/vm/api.sock '{{"action":"metrics"}}'
echo hello-from-the-node | nc 10.0.2.2 6000 >/dev/null
wait $VMM
echo "@@vmm_exit $?"
sed 's/^/guest| /' /run/vm/console.log
echo "@@tap_after_exit $(ls /sys/class/net | grep -c tap0)"
"#
    );
    let out = NodeImage::new(&script)
        .bytes("guest/net-guest.cpio", &guest, 0o644)
        .run();
    out.check(
        out.get("tun_dev") == "/dev/net/tun",
        "tun.ko gives /dev/net/tun",
    );
    out.check(out.get("tap_created") == "yes", "the node made a tap");
    out.check(
        out.get("guest_ifaces")
            .split_whitespace()
            .any(|i| i == "eth0"),
        "the guest has eth0",
    );
    out.check(
        out.get("guest_mac") == GUEST_MAC,
        "the guest has the configured MAC",
    );
    out.check(
        out.get("guest_mtu") == "1400",
        "the guest has the configured MTU",
    );
    out.check(out.get("guest_ping") == "ok", "the guest pings the node");
    out.check(out.get("node_ping") == "ok", "the node pings the guest");
    out.check_transfer(
        "node_down",
        "guest_down",
        2 << 20,
        "2 MiB from the node to the guest",
    );
    out.check_transfer(
        "guest_up",
        "node_up",
        2 << 20,
        "2 MiB from the guest to the node",
    );
    out.check(
        out.get("guest_msg") == "hello-from-the-node",
        "the node connected to the guest",
    );
    let net = out.vmm_device("api", 1);
    out.check(net["activated"] == true, "the net device is activated");
    let c = &net["counters"];
    eprintln!("net device counters after the transfers: {c}");
    for (key, at_least) in [
        // With TSO a frame carries up to 64 KiB, so 2 MiB can be as few as 32 frames.
        ("rx_packets", 32),
        ("tx_packets", 32),
        ("rx_bytes", 2 << 20),
        ("tx_bytes", 2 << 20),
    ] {
        let v = c[key].as_u64().unwrap_or(0);
        out.check(v >= at_least, &format!("{key} = {v} (at least {at_least})"));
    }
    // Linux's driver takes mergeable receive buffers when offered (feature bit 15), and
    // the node's TSO frames then span several of them.
    out.check(
        out.get("guest_features").chars().nth(15) == Some('1'),
        &format!(
            "the guest negotiated mergeable receive buffers: {}",
            out.get("guest_features")
        ),
    );
    let merged = c["rx_merged"].as_u64().unwrap_or(0);
    out.check(
        merged > 0,
        &format!("rx_merged = {merged} (frames over several buffers)"),
    );
    for key in ["invalid_descriptors", "tap_errors", "interrupt_errors"] {
        out.check(c[key] == 0, &format!("{key} is 0: {c}"));
    }
    out.check(
        out.get("vmm_exit") == "0",
        "the guest's reset ends the VMM with 0",
    );
    out.check(
        out.get("tap_after_exit") == "1",
        "the persistent tap outlives the VMM",
    );
}
