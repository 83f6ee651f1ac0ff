//! Compiles the seccomp filters in `seccomp/x86_64.json` (seccompiler's JSON format) to BPF
//! at build time and embeds them as byte arrays, so the VMM never parses JSON at run time
//! (Firecracker does the same).

use std::fmt::Write as _;
use std::path::PathBuf;

/// The thread kinds the VMM installs filters for; every one must be in the JSON.
const KINDS: [&str; 5] = ["vcpu", "vmm", "signals", "watchdog", "supervisor"];

fn main() {
    let json = "seccomp/x86_64.json";
    println!("cargo:rerun-if-changed={json}");
    println!("cargo:rerun-if-changed=build.rs");
    let file = std::fs::File::open(json).unwrap_or_else(|e| panic!("cannot open {json}: {e}"));
    let filters = seccompiler::compile_from_json(file, seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("cannot compile {json}: {e}"));
    for name in filters.keys() {
        assert!(
            KINDS.contains(&name.as_str()),
            "{json}: unknown thread kind {name:?}"
        );
    }
    let mut out = String::from(
        "/// BPF programs compiled from seccomp/x86_64.json by build.rs: (thread kind, \
         8-byte little-endian `sock_filter`s).\npub(crate) const FILTERS: &[(&str, &[u8])] = &[\n",
    );
    for kind in KINDS {
        let prog = filters
            .get(kind)
            .unwrap_or_else(|| panic!("{json}: no filter for thread kind {kind:?}"));
        let mut bytes = Vec::with_capacity(prog.len() * 8);
        for insn in prog {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.push(insn.jt);
            bytes.push(insn.jf);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
        let _ = writeln!(out, "    ({kind:?}, &{bytes:?}),");
    }
    out.push_str("];\n");
    let dest =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("seccomp_filters.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
}
