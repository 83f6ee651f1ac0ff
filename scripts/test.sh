#!/usr/bin/env bash
# The whole test suite: setup (idempotent, cached), format, lints, unit, kvm
# and end-to-end tests.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

"$root/scripts/setup.sh"
log "cargo fmt --check"
cargo fmt --all --check
log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "fuzz targets (their own workspace, fuzz/): rustfmt and clippy, so they keep building"
cargo fmt --manifest-path fuzz/Cargo.toml --check
cargo clippy --manifest-path fuzz/Cargo.toml --bins --quiet -- -D warnings
log "build (the e2e tests drive the built binaries)"
cargo build --workspace --bins --quiet
log "static binaries for the nested test node (built here, not inside a timed test)"
# One build per binary, exactly as e2e/src/node.rs runs them, so its own
# builds find everything fresh (a joint build would unify features differently).
for what in "-p carapace-vmm --bin carapace-vmm" "-p carapace-e2e --example node_probe" \
  "-p carapace --bin carapace"; do
  # shellcheck disable=SC2086
  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --release --target x86_64-unknown-linux-gnu $what
done
log "busybox image (the virtio-fs test runs containers from it)"
cargo xtask busybox-image >/dev/null
log "tests (unit, kvm, e2e)"
cargo nextest run --workspace --no-fail-fast
