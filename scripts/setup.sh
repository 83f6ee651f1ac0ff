#!/usr/bin/env bash
# Sets up a Debian 12 machine for Carapace, idempotently:
#   - Debian packages (QEMU, build tools for the guest kernel, protoc, ...),
#   - cargo-installed tools (vhost-device-vsock, virtiofsd, cargo-nextest), cached by version,
#   - the guest kernel (cached on its config) and the guest image,
#   - the `carapace` binary and the guest artifacts under /usr/local.
# Needs root (apt, /usr/local). Honors CARAPACE_CACHE_DIR (default ~/.cache/carapace).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${CARAPACE_CACHE_DIR:-$HOME/.cache/carapace}
prefix=${CARAPACE_PREFIX:-/usr/local}
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh installs packages and needs root" >&2
  exit 1
fi

# --- Debian packages -----------------------------------------------------------
packages=(
  qemu-system-x86             # the qemu VM driver (TCG where there is no hardware KVM)
  containernetworking-plugins # CNI plugins (bridge, host-local, loopback, portmap) for pod networking tests
  protobuf-compiler           # tonic code generation for the agent API
  busybox-static              # test root filesystems and the demo image
  docker-registry skopeo      # a real local registry for the image tests
  pkg-config gcc make         # -sys crates
  g++                         # libfuzzer-sys (the fuzz targets' clippy check in scripts/test.sh)
  libcap-ng-dev libseccomp-dev  # virtiofsd's build (and its runtime libraries)
  flex bison libelf-dev libssl-dev bc cpio xz-utils   # guest kernel build
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# kubectl (e2e: kubectl exec/attach against the streaming server) has no
# Debian 12 package; these machines ship it with the Google Cloud SDK.
command -v kubectl >/dev/null ||
  log "warning: kubectl not found: the e2e test that drives the real kubectl will fail"
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- cargo-installed tools, cached per version -------------------------------------
cargo_tool() { # <crate> <version> <binary>
  local crate=$1 version=$2 bin=$3
  local dir="$cache/tools/$crate-$version"
  if [ ! -x "$dir/bin/$bin" ]; then
    log "cargo install $crate@$version"
    cargo install --quiet --locked --root "$dir.tmp" "$crate@$version"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  ln -sf "$dir/bin/$bin" "$prefix/bin/$bin"
}
mkdir -p "$cache/tools" "$prefix/bin"
cargo_tool vhost-device-vsock 0.3.0 vhost-device-vsock
cargo_tool virtiofsd 1.14.0 virtiofsd
command -v cargo-nextest >/dev/null || cargo_tool cargo-nextest 0.9.143 cargo-nextest

# --- guest kernel and image -------------------------------------------------------
cd "$root"
log "guest kernel and image (cargo xtask guest)"
cargo xtask guest
log "carapace and carapace-vmm (release build)"
cargo build --quiet --release --package carapace --package carapace-vmm
install -d "$prefix/share/carapace"
install -m 0644 target/guest/vmlinux target/guest/initramfs.cpio "$prefix/share/carapace/"
# The builtin driver looks for carapace-vmm next to carapace.
install -m 0755 target/release/carapace target/release/carapace-vmm "$prefix/bin/"
log "setup done: $prefix/bin/carapace and carapace-vmm, guest in $prefix/share/carapace"
