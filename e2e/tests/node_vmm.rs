//! Node tests: inside the nested test node (a TCG VM with a real kvm-amd `/dev/kvm`, see
//! `carapace_e2e::node`), our `carapace-vmm` boots our guest kernel and agent initramfs under
//! KVM. Slow in absolute terms (everything runs under TCG); each test is one node boot.
//! Run with `cargo nextest run -p carapace-e2e --test node_vmm`.

use carapace_e2e::node::{NodeImage, NodeOutput};

/// Writes the VM config for the agent guest to `$1` (run dir `$2`, extra cmdline `$3`).
const WRITE_CONFIG: &str = r#"
write_config() {
    mkdir -p "$2"
    cat > "$1" <<EOF
{"vcpus": 1, "mem_size_mib": 256,
 "kernel": "/guest/vmlinux", "initrd": "/guest/initramfs.cpio",
 "cmdline": "console=ttyS0 reboot=k panic=1 pci=off quiet $3",
 "serial": {"file": "$2/console.log"},
 "vsock": {"guest_cid": 3, "uds_path": "$2/vsock.sock"},
 "api_socket": "$2/api.sock"}
EOF
}
# Prints the guest console of run dir $1 with a prefix, so failures show it.
guest_console() { sed 's/^/guest| /' "$1/console.log" 2>/dev/null; }
# Waits up to $2 seconds for process $1 to end; prints @@<$3> <exit status or "alive">.
wait_exit() {
    i=0
    while kill -0 "$1" 2>/dev/null && [ $i -lt $(($2 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 "$1" 2>/dev/null; then echo "@@$3 alive"; kill -9 "$1"; else wait "$1"; echo "@@$3 $?"; fi
}
"#;

fn run(script: &str) -> NodeOutput {
    NodeImage::new(&format!("{WRITE_CONFIG}\n{script}")).run()
}

/// (a) The agent's Health answers through our virtio-vsock device, from the node side;
/// (e) an API shutdown stops the VM cleanly: exit status 0, no process, no socket left.
#[test]
fn node_vmm_agent_health_over_vsock_then_clean_shutdown() {
    let out = run(r#"
write_config /tmp/vm.json /run/vm
carapace-vmm --config /tmp/vm.json &
VMM=$!
node_probe health /run/vm/vsock.sock 300000 || guest_console /run/vm
node_probe api /run/vm/api.sock '{"action":"metrics"}'
node_probe api /run/vm/api.sock '{"action":"shutdown"}'
wait_exit $VMM 30 vmm_exit
echo "@@left_in_run_dir $(ls /run/vm | grep -v console.log | tr '\n' ' ')"
echo "@@vmm_processes $(pidof carapace-vmm | wc -w)"
"#);
    let health = out.get("health");
    out.check(
        health.starts_with("ok ") && health.contains("second_call=true"),
        &format!("agent health over our vsock: {health}"),
    );
    let metrics = out.get("api");
    out.check(
        metrics.contains("\"type\":19") && metrics.contains("\"activated\":true"),
        "metrics show an activated vsock device",
    );
    out.check(
        out.get("vmm_exit") == "0",
        "the VMM exits 0 after an API shutdown",
    );
    out.check(
        out.get("left_in_run_dir").trim().is_empty(),
        "no socket is left behind",
    );
    out.check(out.get("vmm_processes") == "0", "no VMM process is left");
}

/// (f) A wedged guest (its kernel panicked with `panic=0`, so it spins forever) is still
/// answered and stopped by the control API; pause and resume work on it too.
#[test]
fn node_vmm_wedged_guest_is_stopped_by_the_control_api() {
    let out = run(r#"
write_config /tmp/vm.json /run/vm "rdinit=/no/such/init panic=0"
carapace-vmm --config /tmp/vm.json &
VMM=$!
i=0
while ! grep -q 'Kernel panic' /run/vm/console.log 2>/dev/null && [ $i -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
grep -q 'Kernel panic' /run/vm/console.log && echo "@@guest_panicked yes" || guest_console /run/vm
node_probe api /run/vm/api.sock '{"action":"pause"}' | sed 's/@@api/@@pause/'
node_probe api /run/vm/api.sock '{"action":"status"}' | sed 's/@@api/@@status_paused/'
node_probe api /run/vm/api.sock '{"action":"resume"}' | sed 's/@@api/@@resume/'
node_probe api /run/vm/api.sock '{"action":"shutdown"}' | sed 's/@@api/@@shutdown/'
wait_exit $VMM 30 vmm_exit
echo "@@left_in_run_dir $(ls /run/vm | grep -v console.log | tr '\n' ' ')"
echo "@@vmm_processes $(pidof carapace-vmm | wc -w)"
"#);
    out.check(
        out.try_get("guest_panicked") == Some("yes"),
        "the guest panicked",
    );
    out.check(out.get("pause").contains("\"ok\":true"), "pause answered");
    out.check(
        out.get("status_paused").contains("\"state\":\"paused\""),
        "status says paused",
    );
    out.check(out.get("resume").contains("\"ok\":true"), "resume answered");
    out.check(
        out.get("shutdown").contains("\"ok\":true"),
        "shutdown answered",
    );
    out.check(out.get("vmm_exit") == "0", "the VMM exits 0");
    out.check(
        out.get("left_in_run_dir").trim().is_empty(),
        "no socket is left behind",
    );
    out.check(out.get("vmm_processes") == "0", "no VMM process is left");
}

/// The guest of the disk test: busybox as init; it reads the read-only disk, writes a
/// pattern to the read-write disk (read-modify-write of a sector, then fsync = flush), tries
/// to write the read-only disk, and resets the VM.
const DISK_GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t sysfs sys /sys
echo "@@guest_disks $(ls /sys/block | grep vd | tr '\n' ' ')"
echo "@@guest_ro_flag $(cat /sys/block/vdb/ro)"
echo "@@guest_ro_read $(head -c 25 /dev/vdb)"
printf 'written by the guest through virtio-blk' | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null
echo "@@guest_write_status $?"
if printf x | dd of=/dev/vdb conv=fsync 2>/dev/null; then echo "@@guest_ro_write allowed"; else echo "@@guest_ro_write refused"; fi
echo "@@guest_readback $(dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 39)"
reboot -f
"#;

/// (b) A virtio-blk disk written by the guest reads back on the node with the same bytes; a
/// read-only disk is readable and not writable; the guest's reset ends the VMM with 0.
#[test]
fn node_vmm_guest_writes_a_disk_the_node_reads_back() {
    let guest = carapace_e2e::node::busybox_guest_initramfs(DISK_GUEST_INIT);
    let out = NodeImage::new(
        r#"
dd if=/dev/zero of=/tmp/rw.img bs=1M count=8 2>/dev/null
dd if=/dev/zero of=/tmp/ro.img bs=1M count=1 2>/dev/null
printf 'read-only disk says hello' | dd of=/tmp/ro.img conv=notrunc 2>/dev/null
mkdir -p /run/vm
cat > /tmp/vm.json <<EOF
{"vcpus": 1, "mem_size_mib": 128,
 "kernel": "/guest/vmlinux", "initrd": "/guest/disk-guest.cpio",
 "cmdline": "console=ttyS0 reboot=k panic=1 pci=off quiet",
 "serial": {"file": "/run/vm/console.log"},
 "drives": [{"path": "/tmp/rw.img"}, {"path": "/tmp/ro.img", "read_only": true}],
 "api_socket": "/run/vm/api.sock"}
EOF
timeout 300 carapace-vmm --config /tmp/vm.json
echo "@@vmm_exit $?"
sed 's/^/guest| /' /run/vm/console.log
echo "@@node_read $(dd if=/tmp/rw.img bs=512 skip=8 count=1 2>/dev/null | head -c 39)"
echo "@@node_rest_zero $(dd if=/tmp/rw.img bs=512 skip=9 count=100 2>/dev/null | tr -d '\0' | wc -c)"
echo "@@ro_size $(wc -c < /tmp/ro.img)"
echo "@@left_in_run_dir $(ls /run/vm | grep -v console.log | tr '\n' ' ')"
"#,
    )
    .bytes("guest/disk-guest.cpio", &guest, 0o644)
    .run();
    const PATTERN: &str = "written by the guest through virtio-blk";
    out.check(
        out.get("vmm_exit") == "0",
        "the guest's reset ends the VMM with 0",
    );
    out.check(
        out.get("guest_disks").trim() == "vda vdb",
        "two disks in the guest",
    );
    out.check(
        out.get("guest_ro_flag") == "1",
        "vdb is read-only in the guest",
    );
    out.check(
        out.get("guest_ro_read") == "read-only disk says hello",
        "the read-only disk reads",
    );
    out.check(
        out.get("guest_write_status") == "0",
        "the guest's write + fsync succeeded",
    );
    out.check(
        out.get("guest_ro_write") == "refused",
        "the read-only disk refuses writes",
    );
    out.check(
        out.get("guest_readback") == PATTERN,
        "the guest reads its bytes back",
    );
    out.check(
        out.get("node_read") == PATTERN,
        "the node reads the guest's bytes",
    );
    out.check(
        out.get("node_rest_zero") == "0",
        "nothing else on the disk was touched",
    );
    out.check(
        out.get("ro_size") == "1048576",
        "the read-only image kept its size",
    );
    out.check(
        out.get("left_in_run_dir").trim().is_empty(),
        "no socket is left behind",
    );
}

/// The guest of the free page reporting test: busybox as init; it fills 64 MiB of tmpfs,
/// holds it for a while, deletes it, and idles.
const BALLOON_GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t sysfs sys /sys
mount -t tmpfs -o size=96m tmp /tmp
echo "@@guest_balloon $(cat /sys/bus/virtio/devices/*/device | tr '\n' ' ')"
sleep 3
dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>/dev/null
echo "@@guest_filled $?"
sleep 15
rm /tmp/fill
echo "@@guest_freed"
sleep 600
"#;

/// Free page reporting: memory the guest used and freed goes back to the node. The guest
/// fills 64 MiB of tmpfs and deletes it; its RAM's resident size in the VMM rises by that
/// much and falls back within seconds, and the balloon's counters say what was given back.
#[test]
fn node_vmm_free_page_reporting_gives_freed_guest_memory_back() {
    let guest = carapace_e2e::node::busybox_guest_initramfs(BALLOON_GUEST_INIT);
    let out = NodeImage::new(
        r#"
mkdir -p /run/vm
cat > /tmp/vm.json <<EOF
{"vcpus": 1, "mem_size_mib": 256,
 "kernel": "/guest/vmlinux", "initrd": "/guest/balloon-guest.cpio",
 "cmdline": "console=ttyS0 reboot=k panic=1 pci=off quiet",
 "serial": {"file": "/run/vm/console.log"},
 "api_socket": "/run/vm/api.sock", "free_page_reporting": true}
EOF
carapace-vmm --config /tmp/vm.json &
VMM=$!
# Resident KiB of the VMM's largest mapping: guest RAM.
guest_rss() {
    awk '/^Size:/ { size = $2 } /^Rss:/ { if (size > max) { max = size; rss = $2 } } END { print rss }' /proc/$VMM/smaps
}
# Waits up to $2 seconds for "@@$1" on the guest console.
wait_guest() {
    i=0
    while ! grep -q "@@$1" /run/vm/console.log 2>/dev/null && [ $i -lt $(($2 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
}
wait_guest guest_filled 300
echo "@@rss_filled $(guest_rss)"
wait_guest guest_freed 300
# The guest reports free pages about 2 s after they are freed; give it up to 60 s.
filled=$(guest_rss)
i=0
while [ $(guest_rss) -gt $((filled - 49152)) ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
echo "@@rss_freed $(guest_rss)"
node_probe api /run/vm/api.sock '{"action":"metrics"}'
node_probe api /run/vm/api.sock '{"action":"shutdown"}' | sed 's/@@api/@@shutdown/'
wait $VMM
echo "@@vmm_exit $?"
sed 's/^/guest| /' /run/vm/console.log
"#,
    )
    .bytes("guest/balloon-guest.cpio", &guest, 0o644)
    .run();
    out.check(
        out.get("guest_balloon")
            .split_whitespace()
            .any(|id| id == "0x0005"),
        "the guest sees a virtio balloon",
    );
    out.check(out.get("guest_filled") == "0", "the guest filled its tmpfs");
    let kib = |key: &str| out.get(key).trim().parse::<u64>().unwrap_or(0);
    let (filled, freed) = (kib("rss_filled"), kib("rss_freed"));
    out.check(
        filled >= 64 << 10,
        &format!("guest RAM resident with 64 MiB filled: {filled} KiB"),
    );
    out.check(
        freed + (48 << 10) <= filled,
        &format!(
            "guest RAM resident fell by 48 MiB or more after the guest freed 64 MiB: \
             {filled} -> {freed} KiB"
        ),
    );
    let metrics: serde_json::Value = serde_json::from_str(out.get("api")).unwrap_or_default();
    let balloon = metrics["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["type"] == 5))
        .cloned()
        .unwrap_or_default();
    out.check(
        balloon["activated"] == true,
        &format!("the balloon is active: {balloon}"),
    );
    let counters = &balloon["counters"];
    println!(
        "guest RAM resident: {filled} KiB filled, {freed} KiB after the free; balloon: {counters}"
    );
    out.check(
        counters["discarded_bytes"].as_u64().unwrap_or(0) >= 48 << 20
            && counters["invalid_descriptors"] == 0
            && counters["discard_errors"] == 0
            && counters["unexpected_buffers"] == 0,
        &format!("the balloon gave back what the guest freed, and nothing went wrong: {counters}"),
    );
    out.check(
        out.get("shutdown").contains("\"ok\":true") && out.get("vmm_exit") == "0",
        "the VMM shuts down cleanly",
    );
}
