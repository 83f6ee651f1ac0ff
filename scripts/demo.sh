#!/usr/bin/env bash
# The main job: set the machine up, start the carapace daemon on private
# directories, and run a demo pod through its CRI socket as kubelet would
# (pod sandbox = its own VM; a busybox container inside), showing the
# container's log.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
prefix=${CARAPACE_PREFIX:-/usr/local}
demo=${CARAPACE_DEMO_DIR:-/var/tmp/carapace-demo}
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

mkdir -p "$demo/net.d"
# The demo pod's network: Debian's CNI plugins, a bridge of its own on the
# host (carapace0, 10.88.42.0/24, no masquerading: the host reaches the pod,
# nothing else changes).
cat >"$demo/net.d/10-carapace-demo.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "carapace-demo", "plugins": [
  {"type": "bridge", "bridge": "carapace0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.42.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback"}]}
JSON
cat >"$demo/config.toml" <<TOML
socket = "$demo/carapace.sock"
state_dir = "$demo/state"
image_dir = "$demo/images"
containers_dir = "$demo/containers"
run_dir = "$demo/run"
[network]
cni_conf_dir = "$demo/net.d"
netns_dir = "$demo/netns"
[vm]
kernel = "$prefix/share/carapace/vmlinux"
initrd = "$prefix/share/carapace/initramfs.cpio"
TOML

log "demo image (cargo xtask busybox-image) imported into the daemon's store"
(cd "$root" && cargo xtask busybox-image --out "$demo/image" >/dev/null)
"$prefix/bin/carapace" import --config "$demo/config.toml" "$demo/image/busybox.tar"

log "carapace serve (log: $demo/daemon.log)"
"$prefix/bin/carapace" serve --config "$demo/config.toml" 2>"$demo/daemon.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
for _ in $(seq 200); do
  [ -S "$demo/carapace.sock" ] && break
  kill -0 $daemon 2>/dev/null || { cat "$demo/daemon.log" >&2; exit 1; }
  sleep 0.05
done

log "a demo pod through CRI"
"$prefix/bin/carapace" demo --socket "$demo/carapace.sock"
