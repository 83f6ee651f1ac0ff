#!/usr/bin/env bash
# The main job: set the machine up, then boot a pod VM (our kernel, the agent
# as init) and show the agent's answer over vsock.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
prefix=${CARAPACE_PREFIX:-/usr/local}
exec "$prefix/bin/carapace" check --boot \
  --kernel "$prefix/share/carapace/vmlinux" \
  --initrd "$prefix/share/carapace/initramfs.cpio"
