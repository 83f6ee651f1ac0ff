//! Node test (d): virtio-fs through our vhost-user frontend. Inside the nested test node
//! (see `carapace_e2e::node`) virtiofsd shares a node directory, our `carapace-vmm` boots a
//! busybox guest with the fs device, the guest mounts the share, reads a node file, writes
//! new files and resets; the node then checks the bytes and that nothing is left running.
//! Run with `cargo nextest run -p carapace-e2e --test node_vmm_fs`.

use std::path::{Path, PathBuf};

use carapace_e2e::node::NodeImage;

/// The guest: busybox as init; mounts the `shared` tag, reads the node's file, writes a
/// small text file and 1 MiB of random bytes (with their checksum), unmounts, resets.
const FS_GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mkdir -p /mnt
if mount -t virtiofs shared /mnt; then echo "@@guest_mount ok"; else echo "@@guest_mount failed"; fi
echo "@@guest_fstype $(grep ' /mnt ' /proc/mounts | cut -d' ' -f3)"
echo "@@guest_read $(cat /mnt/hello.txt)"
echo "@@guest_sum $(md5sum /mnt/hello.txt | cut -d' ' -f1)"
printf 'written by the guest through virtio-fs' > /mnt/from-guest.txt
echo "@@guest_write $?"
dd if=/dev/urandom of=/tmp/big.bin bs=64k count=16 2>/dev/null
cp /tmp/big.bin /mnt/big.bin
echo "@@guest_big_copy $?"
echo "@@guest_big_sum $(md5sum /tmp/big.bin | cut -d' ' -f1)"
echo "@@guest_big_readback $(md5sum /mnt/big.bin | cut -d' ' -f1)"
sync
umount /mnt
echo "@@guest_umount $?"
reboot -f
"#;

/// virtiofsd as `scripts/setup.sh` installs it (a dynamic binary: the node gets its
/// libraries too).
fn virtiofsd() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .find(|p| p.is_file())
        })
        .expect("virtiofsd is not on PATH: scripts/setup.sh installs it")
}

/// (d) A guest mounts a node directory through virtiofsd and our vhost-user-fs frontend,
/// reads a node file with the right bytes, writes files the node reads back; the guest's
/// reset ends the VMM with 0, virtiofsd exits when the VMM goes, and no socket is left.
#[test]
fn node_vmm_guest_shares_a_directory_through_virtiofsd() {
    let guest = carapace_e2e::node::busybox_guest_initramfs(FS_GUEST_INIT);
    let virtiofsd = virtiofsd();
    let script = format!(
        r#"
# Waits up to $2 seconds for process $1 to end; prints @@<$3> <exit status or "alive">.
wait_exit() {{
    i=0
    while kill -0 "$1" 2>/dev/null && [ $i -lt $(($2 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 "$1" 2>/dev/null; then echo "@@$3 alive"; kill -9 "$1"; else wait "$1"; echo "@@$3 $?"; fi
}}
mkdir -p /tmp/share /run/vm
printf 'the node shares this file' > /tmp/share/hello.txt
echo "@@node_sum $(md5sum /tmp/share/hello.txt | cut -d' ' -f1)"
{virtiofsd} --socket-path /run/vm/virtiofsd.sock --shared-dir /tmp/share \
    --sandbox none --log-level warn &
FSD=$!
i=0
while [ ! -S /run/vm/virtiofsd.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
cat > /tmp/vm.json <<EOF
{{"vcpus": 1, "mem_size_mib": 128,
 "kernel": "/guest/vmlinux", "initrd": "/guest/fs-guest.cpio",
 "cmdline": "console=ttyS0 reboot=k panic=1 pci=off quiet",
 "serial": {{"file": "/run/vm/console.log"}},
 "fs": [{{"tag": "shared", "socket": "/run/vm/virtiofsd.sock",
          "num_request_queues": 1, "queue_size": 1024}}],
 "api_socket": "/run/vm/api.sock"}}
EOF
timeout 300 carapace-vmm --config /tmp/vm.json
echo "@@vmm_exit $?"
sed 's/^/guest| /' /run/vm/console.log
wait_exit $FSD 30 virtiofsd_exit
echo "@@node_new_file $(cat /tmp/share/from-guest.txt)"
echo "@@node_big_sum $(md5sum /tmp/share/big.bin | cut -d' ' -f1)"
echo "@@node_big_size $(wc -c < /tmp/share/big.bin)"
echo "@@sockets_left $(find /run/vm -type s | wc -l)"
# virtiofsd leaves its pid file next to the socket (whoever started it removes it).
echo "@@left_in_run_dir $(ls /run/vm | grep -v -e console.log -e virtiofsd.sock.pid | tr '\n' ' ')"
echo "@@processes $(pidof carapace-vmm virtiofsd | wc -w)"
"#,
        virtiofsd = virtiofsd.display()
    );
    let out = NodeImage::new(&script)
        .host_program(Path::new(&virtiofsd))
        .bytes("guest/fs-guest.cpio", &guest, 0o644)
        .run();

    out.check(out.get("guest_mount") == "ok", "the guest mounts the tag");
    out.check(
        out.get("guest_fstype") == "virtiofs",
        "the mount is a virtiofs mount",
    );
    out.check(
        out.get("guest_read") == "the node shares this file",
        "the guest reads the node's file",
    );
    out.check(
        out.get("guest_sum") == out.get("node_sum"),
        "same checksum on both sides",
    );
    out.check(out.get("guest_write") == "0", "the guest's write succeeded");
    out.check(out.get("guest_big_copy") == "0", "the 1 MiB copy succeeded");
    out.check(
        out.get("guest_big_readback") == out.get("guest_big_sum"),
        "the guest reads its 1 MiB back",
    );
    out.check(out.get("guest_umount") == "0", "the guest unmounts");
    out.check(
        out.get("vmm_exit") == "0",
        "the guest's reset ends the VMM with 0",
    );
    out.check(
        out.get("node_new_file") == "written by the guest through virtio-fs",
        "the node reads the guest's file",
    );
    out.check(
        out.get("node_big_sum") == out.get("guest_big_sum"),
        "the node has the guest's 1 MiB, byte for byte",
    );
    out.check(out.get("node_big_size") == "1048576", "1 MiB arrived");
    out.check(
        out.get("virtiofsd_exit") != "alive",
        "virtiofsd exits when the VMM goes",
    );
    out.check(out.get("sockets_left") == "0", "no socket is left behind");
    out.check(
        out.get("left_in_run_dir").trim().is_empty(),
        "nothing but the console log and virtiofsd's pid file is left",
    );
    out.check(
        out.get("processes") == "0",
        "no VMM or virtiofsd process is left",
    );
}
