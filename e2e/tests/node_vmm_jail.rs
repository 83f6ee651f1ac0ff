//! Node test of the jail: inside the nested test node, `carapace-vmm` with `"jail"` boots our
//! guest kernel and agent as an unprivileged PID 1 of its own pid namespace, chrooted
//! (pivot_root) into the VM's directory, with every seccomp filter on; the agent answers
//! through the vsock socket in that directory, and SIGTERM to the supervisor stops it with
//! exit status 0 and nothing left. Run with
//! `cargo nextest run -p carapace-e2e --test node_vmm_jail`.

use carapace_e2e::node::NodeImage;

#[test]
fn node_vmm_jailed_agent_health_then_sigterm() {
    let out = NodeImage::new(
        r#"
mkdir -p /run/vm
cat > /tmp/vm.json <<EOF
{"vcpus": 1, "mem_size_mib": 256,
 "kernel": "/guest/vmlinux", "initrd": "/guest/initramfs.cpio",
 "cmdline": "console=ttyS0 reboot=k panic=1 pci=off quiet",
 "serial": {"file": "/run/vm/console.log"},
 "vsock": {"guest_cid": 3, "uds_path": "/run/vm/vsock.sock"},
 "api_socket": "/run/vm/api.sock",
 "jail": {"root": "/run/vm", "uid": 10000, "gid": 10000}}
EOF
carapace-vmm --config /tmp/vm.json &
SUPERVISOR=$!
node_probe health /run/vm/vsock.sock 300000 || sed 's/^/guest| /' /run/vm/console.log
node_probe api /run/vm/api.sock '{"action":"status"}'
JAILED=$(pidof carapace-vmm | tr ' ' '\n' | grep -v "^$SUPERVISOR\$" | head -n 1)
echo "@@jailed_uid $(grep '^Uid:' /proc/$JAILED/status | cut -f2-)"
echo "@@jailed_cap_eff $(grep '^CapEff:' /proc/$JAILED/status | cut -f2)"
echo "@@jailed_nspid $(grep '^NSpid:' /proc/$JAILED/status | cut -f3)"
echo "@@jailed_seccomp $(grep '^Seccomp:' /proc/$JAILED/status | cut -f2)"
echo "@@supervisor_uid $(grep '^Uid:' /proc/$SUPERVISOR/status | cut -f2-)"
kill -TERM $SUPERVISOR
i=0
while kill -0 $SUPERVISOR 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 $SUPERVISOR 2>/dev/null; then echo "@@vmm_exit alive"; else wait $SUPERVISOR; echo "@@vmm_exit $?"; fi
echo "@@left_in_run_dir $(ls /run/vm | grep -v console.log | tr '\n' ' ')"
echo "@@vmm_processes $(pidof carapace-vmm | wc -w)"
"#,
    )
    .run();
    let health = out.get("health");
    out.check(
        health.starts_with("ok ") && health.contains("second_call=true"),
        &format!("agent health through the jailed VMM's vsock: {health}"),
    );
    out.check(
        out.get("api").contains("\"state\":\"running\""),
        "the API answers from inside the jail",
    );
    let ids = "10000\t10000\t10000\t10000";
    out.check(out.get("jailed_uid") == ids, "the VMM runs as uid 10000");
    out.check(
        out.get("jailed_cap_eff") == "0000000000000000",
        "the VMM has no capabilities",
    );
    out.check(
        out.get("jailed_nspid") == "1",
        "the VMM is PID 1 of its namespace",
    );
    out.check(
        out.get("jailed_seccomp") == "2",
        "the VMM's main thread is filtered",
    );
    out.check(
        out.get("supervisor_uid") == ids,
        "the supervisor dropped to uid 10000 too",
    );
    out.check(out.get("vmm_exit") == "0", "SIGTERM stops it with 0");
    out.check(
        out.get("left_in_run_dir").trim().is_empty(),
        "no socket is left behind",
    );
    out.check(out.get("vmm_processes") == "0", "no VMM process is left");
}
