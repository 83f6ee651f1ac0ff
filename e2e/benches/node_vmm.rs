//! Our VMM against QEMU, side by side.
//!
//! 1. In the nested test node (same guest kernel and agent initramfs, same node KVM, same
//!    guest command line: the runtime's `BASE_CMDLINE`, or `NODE_BENCH_CMDLINE`; 1 vCPU,
//!    256 MiB of guest RAM): boot-to-agent-ready (spawn of the monitor to the agent's first
//!    Health answer over hybrid vsock, connecting only after the agent's readiness
//!    announcement as the runtime does; QEMU's vsock backend, vhost-device-vsock, is started
//!    before the clock), spawn to the guest's first instructions (the node KVM's first VM
//!    exit), the guest's own part (that exit to the agent's readiness announcement), and the
//!    monitor's resident memory excluding guest RAM (VmRSS less the resident part of its
//!    largest mapping, guest RAM: QEMU's memfd, which its vhost-user vsock backend needs; our
//!    private memory). Also the node's KVM counters per boot (exits, nested page faults,
//!    instruction emulations, port and MMIO exits, huge pages mapped), read while the VM
//!    still runs. Medians of `NODE_BENCH_RUNS` (default 5) boots per monitor, in two series
//!    (`NODE_BENCH_SERIES`: `same`, `fresh` or `both`, the default):
//!    - **same node**: all boots in one node, alternating between the monitors, and which
//!      goes first alternates too (QEMU in odd runs);
//!    - **fresh nodes**: every boot in a node of its own. The node's CPU is emulated (TCG),
//!      and a VM leaves state behind that slows every later VM in the same node, whichever
//!      the monitor: writes to memory that held a previous guest's code take the emulator's
//!      slow path (docs/vmm.md, "Fresh nodes"). In fresh nodes no boot inherits that, but
//!      each monitor's own code also runs for the first time in the node, which the emulator
//!      must translate first: a cost that grows with the monitor's size.
//! 2. On this host's own KVM: `carapace-vmm` process spawn to the first guest instruction's
//!    output (a payload whose first act is a byte to COM1), median of 20.
//!
//! `cargo bench -p carapace-e2e --bench node_vmm`

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use carapace_e2e::node::{NodeBinaries, NodeImage};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs boots `$FIRST..=$LAST` of `$ONLY` (`ours`, `qemu`, or both, alternating).
const NODE_SCRIPT: &str = r#"
# QEMU's machine, memory, kernel and initrd (no argument has a space: expanded unquoted).
QEMU_MACHINE="-M microvm,memory-backend=mem,acpi=off,x-option-roms=off,rtc=off -accel kvm -cpu host
    -nodefaults -no-user-config -display none -no-reboot -smp 1 -m 256M
    -object memory-backend-memfd,id=mem,size=256M,share=on
    -kernel /guest/vmlinux -initrd /guest/initramfs.cpio"
# The node's KVM counters (summed over live VMs: only the one just booted), read by node_probe
# after the agent answered and before it stops the monitor; node_probe also watches the exit
# counter for the new VM's first exit.
mount -t debugfs none /sys/kernel/debug
export NODE_PROBE_BEFORE_STOP='for c in exits pf_taken insn_emulation io_exits mmio_exits pages_2m; do echo "@@kvm_$c $(cat /sys/kernel/debug/kvm/$c)"; done'

# The node has two emulated CPUs: let the previous monitor's teardown (its guest RAM freed, the KVM VM
# destroyed) finish before the next clock starts, so neither side boots beside it.
settle() { sync; sleep 2; }
wait_for() { w=0; while [ ! -e "$1" ] && [ $w -lt 300 ]; do sleep 0.1; w=$((w + 1)); done; }
ours() {
    mkdir -p /run/o$i
    cat > /tmp/o$i.json <<EOF
{"vcpus": 1, "mem_size_mib": 256, "kernel": "/guest/vmlinux", "initrd": "/guest/initramfs.cpio",
 "cmdline": "$CMDLINE", "serial": {"file": "/run/o$i/console.log"},
 "vsock": {"guest_cid": 3, "uds_path": "/run/o$i/vsock.sock"}}
EOF
    settle
    node_probe boot /run/o$i/vsock.sock $TIMEOUT_MS carapace-vmm --config /tmp/o$i.json | sed "s/^@@/@@ours.$i./"
}
qemu() {
    mkdir -p /run/q$i
    /usr/local/bin/vhost-device-vsock --vm guest-cid=3,socket=/run/q$i/vhost.sock,uds-path=/run/q$i/vsock.sock >/run/q$i/backend.log 2>&1 &
    B=$!
    wait_for /run/q$i/vhost.sock
    [ -e /run/q$i/vhost.sock ] || { echo "vhost-device-vsock did not start:"; cat /run/q$i/backend.log; }
    settle
    node_probe boot /run/q$i/vsock.sock $TIMEOUT_MS /usr/bin/qemu-system-x86_64 $QEMU_MACHINE \
        -chardev file,id=console,path=/run/q$i/console.log -serial chardev:console \
        -chardev socket,id=vsock,path=/run/q$i/vhost.sock -device vhost-user-vsock-device,chardev=vsock \
        -append "$CMDLINE" | sed "s/^@@/@@qemu.$i./"
    [ -s /run/q$i/console.log ] && tail -5 /run/q$i/console.log | sed 's/^/qemu-guest| /'
    kill $B 2>/dev/null; wait $B 2>/dev/null
}
# Fresh nodes: one start of the monitor before the measured boot, so that its code is not
# running for the first time (the emulator would translate it first; QEMU has far more of it),
# while no guest code runs, or almost none, whose pages the measured boot would inherit:
# QEMU is started paused (-S, the guest never runs) and quits at once; ours boots a payload
# that resets after two instructions.
warm() {
    case $1 in
        ours)
            mkdir -p /run/warm
            cat > /tmp/warm.json <<EOF
{"vcpus": 1, "mem_size_mib": 256, "kernel": "/guest/warm.elf", "initrd": "/guest/initramfs.cpio", "serial": "none",
 "vsock": {"guest_cid": 3, "uds_path": "/run/warm/vsock.sock"}}
EOF
            carapace-vmm --config /tmp/warm.json || echo "@@warm-failed ours" ;;
        qemu)
            echo quit | /usr/bin/qemu-system-x86_64 -S -monitor stdio $QEMU_MACHINE \
                -append "$CMDLINE" >/dev/null || echo "@@warm-failed qemu" ;;
    esac
}
[ "$WARM" = 1 ] && warm $ONLY
# With both, which monitor goes first alternates (QEMU in odd runs): the first boot in a node
# is faster than any later one, and that must not favour one side.
for i in $(seq $FIRST $LAST); do
    case $ONLY in
        ours) ours ;;
        qemu) qemu ;;
        *) if [ $((i % 2)) -eq 1 ]; then qemu; ours; else ours; qemu; fi ;;
    esac
done
"#;

/// Boots `first..=last` of `only` (`ours`, `qemu` or `both`) in one node, with `warm` after
/// one warm-up start of that monitor (the script's `warm`); returns the node's results
/// (`<monitor>.<run>.<key>` → value) and console.
fn run_node(
    only: &str,
    first: usize,
    last: usize,
    warm: bool,
) -> (HashMap<String, String>, String) {
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    let timeout_ms = std::env::var("NODE_BENCH_TIMEOUT_MS").unwrap_or_else(|_| "300000".into());
    // The runtime's, unless NODE_BENCH_CMDLINE replaces it.
    let cmdline =
        std::env::var("NODE_BENCH_CMDLINE").unwrap_or_else(|_| carapace::vm::BASE_CMDLINE.into());
    assert!(
        cmdline
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"\\$`".contains(&b) || b == b' '),
        "NODE_BENCH_CMDLINE: printable ASCII without quotes, backslashes, $ or `"
    );
    let warm = u8::from(warm);
    let mut image = NodeImage::new(&format!(
        "ONLY={only}\nFIRST={first}\nLAST={last}\nWARM={warm}\nTIMEOUT_MS={timeout_ms}\nCMDLINE=\"{cmdline}\"\n{NODE_SCRIPT}"
    ))
    .host_program(qemu)
    .host_program(Path::new("/usr/local/bin/vhost-device-vsock"))
    .bytes("guest/warm.elf", &reset_payload(), 0o644);
    for rom in [
        "qboot.rom",
        "bios-microvm.bin",
        "pvh.bin",
        "linuxboot_dma.bin",
    ] {
        let path = Path::new("/usr/share/qemu").join(rom);
        image = image.file(&format!("usr/share/qemu/{rom}"), &path, 0o644);
    }
    let out = image.run();
    let results = out
        .results()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (results, out.console)
}

/// Prints the figures of `runs` boots per monitor.
fn report(title: &str, runs: usize, results: &HashMap<String, String>, console: &str) {
    let series = |who: &str, key: &str| -> Vec<f64> {
        (1..=runs)
            .map(|i| {
                results
                    .get(&format!("{who}.{i}.{key}"))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("{who} run {i}: no {key}\n{console}"))
            })
            .collect()
    };
    println!("== {title}");
    let mut row = Vec::new();
    for who in ["ours", "qemu"] {
        let boot = series(who, "boot_ms");
        let first_exit = series(who, "first_exit_ms");
        let ready = series(who, "ready_ms");
        let in_guest: Vec<f64> = ready.iter().zip(&first_exit).map(|(r, f)| r - f).collect();
        let total = series(who, "rss_kb");
        let guest = series(who, "rss_guest_kb");
        let rss: Vec<f64> = total.iter().zip(&guest).map(|(t, g)| t - g).collect();
        println!("{who}: boot_ms {boot:?}; first_exit_ms {first_exit:?}; first exit -> readiness ms {in_guest:?}; rss excl. guest RAM KiB {rss:?}; guest RAM touched KiB {guest:?}");
        row.push((
            median(boot),
            median(first_exit),
            median(in_guest),
            median(rss),
            median(guest),
        ));
    }
    let ((ob, of, oi, or, og), (qb, qf, qi, qr, qg)) = (row[0], row[1]);
    println!("node KVM counters per boot, median (our VMM | QEMU):");
    for counter in [
        "exits",
        "pf_taken",
        "insn_emulation",
        "io_exits",
        "mmio_exits",
        "pages_2m",
    ] {
        let key = format!("kvm_{counter}");
        println!(
            "  {counter}: {:.0} | {:.0}",
            median(series("ours", &key)),
            median(series("qemu", &key))
        );
    }
    println!("node, median of {runs} (our VMM | QEMU microvm -accel kvm | ratio QEMU/ours):");
    println!(
        "  boot to agent ready: {ob:.0} ms | {qb:.0} ms | {:.2}x",
        qb / ob
    );
    println!(
        "  spawn to the guest's first VM exit: {of:.0} ms | {qf:.0} ms | {:.2}x",
        qf / of
    );
    println!("  first VM exit to the agent's readiness: {oi:.0} ms | {qi:.0} ms");
    println!(
        "  monitor RSS excl. guest RAM: {:.1} MiB | {:.1} MiB | {:.2}x",
        or / 1024.0,
        qr / 1024.0,
        qr / or
    );
    println!(
        "  guest RAM resident: {:.1} MiB | {:.1} MiB",
        og / 1024.0,
        qg / 1024.0
    );
}

/// All boots in one node, the monitors alternating.
fn same_node(runs: usize) {
    let started = Instant::now();
    let (results, console) = run_node("both", 1, runs, false);
    report("same node", runs, &results, &console);
    println!("  wall time {:?}", started.elapsed());
}

/// Every boot in a node of its own, after a warm-up start of the same monitor; which
/// monitor's node comes first alternates.
fn fresh_nodes(runs: usize) {
    let started = Instant::now();
    let mut results = HashMap::new();
    let mut console = String::new();
    for i in 1..=runs {
        let order = if i % 2 == 1 {
            ["qemu", "ours"]
        } else {
            ["ours", "qemu"]
        };
        for who in order {
            let (r, c) = run_node(who, i, i, true);
            if let Some(who) = r.get("warm-failed") {
                panic!("warming up {who} failed\n{c}");
            }
            results.extend(r);
            console.push_str(&c);
        }
    }
    report("fresh nodes", runs, &results, &console);
    println!("  wall time {:?}", started.elapsed());
}

/// A minimal ELF whose code writes '!' to COM1 and resets through the i8042.
fn first_output_payload() -> Vec<u8> {
    // mov dx, 0x3f8 ; mov al, '!' ; out dx, al ; mov al, 0xfe ; out 0x64, al ; hlt
    payload(&[
        0x66, 0xba, 0xf8, 0x03, 0xb0, 0x21, 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
    ])
}

/// A minimal ELF whose code resets through the i8042 at once.
fn reset_payload() -> Vec<u8> {
    // mov al, 0xfe ; out 0x64, al ; hlt
    payload(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4])
}

/// A minimal x86_64 ELF that runs `code` at 1 MiB.
fn payload(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // entry
    f.extend_from_slice(&64u64.to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // offset
    f.extend_from_slice(&LOAD.to_le_bytes()); // vaddr
    f.extend_from_slice(&LOAD.to_le_bytes()); // paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    f.resize(0x1000, 0);
    f.extend_from_slice(code);
    f
}

fn host_bench(runs: usize) {
    let vmm = NodeBinaries::build().vmm;
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("payload.elf");
    std::fs::write(&kernel, first_output_payload()).expect("writing the payload");
    let mut first = Vec::new();
    let mut total = Vec::new();
    for i in 0..runs {
        let console = dir.path().join(format!("console{i}.log"));
        let config = dir.path().join(format!("vm{i}.json"));
        std::fs::write(
            &config,
            format!(
                r#"{{"vcpus": 1, "mem_size_mib": 128, "kernel": "{}", "serial": {{"file": "{}"}}}}"#,
                kernel.display(),
                console.display()
            ),
        )
        .expect("writing the config");
        let start = Instant::now();
        let mut child = Command::new(&vmm)
            .arg("--config")
            .arg(&config)
            .spawn()
            .expect("spawning carapace-vmm");
        let mut seen = None;
        let status = loop {
            if seen.is_none() && std::fs::metadata(&console).is_ok_and(|m| m.len() > 0) {
                seen = Some(start.elapsed());
            }
            if let Some(s) = child.try_wait().expect("waiting") {
                break s;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!("carapace-vmm did not finish");
            }
            std::hint::spin_loop();
        };
        assert!(status.success(), "carapace-vmm failed: {status}");
        let end = start.elapsed();
        let seen = seen.unwrap_or(end);
        first.push(seen.as_secs_f64() * 1000.0);
        total.push(end.as_secs_f64() * 1000.0);
    }
    println!(
        "host: carapace-vmm spawn -> first guest output {:.2} ms, -> process exit {:.2} ms (median of {runs})",
        median(first),
        median(total)
    );
}

fn main() {
    let runs = std::env::var("NODE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // NODE_BENCH_ONLY=1: only the side-by-side in the node.
    if std::env::var_os("NODE_BENCH_ONLY").is_none() {
        host_bench(20);
    }
    let series = std::env::var("NODE_BENCH_SERIES").unwrap_or_else(|_| "both".into());
    if series == "same" || series == "both" {
        same_node(runs);
    }
    if series == "fresh" || series == "both" {
        fresh_nodes(runs);
    }
}
