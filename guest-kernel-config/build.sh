#!/usr/bin/env bash
# Build the Carapace guest kernel (vmlinux) from Debian's linux-source-6.1
# with the config fragments in this directory.
#
# Usage: build.sh [--config-only] [--extra-fragment FILE]... [--out DIR]
#
#   --config-only          stop after generating the config and checking it
#                          (temporary build dir, nothing is cached; with --out
#                          the resulting config is copied to DIR/config)
#   --extra-fragment FILE  merge FILE after the shipped fragments (repeatable;
#                          a later fragment overrides an earlier one)
#   --out DIR              also copy vmlinux and config into DIR
#
# Every symbol a fragment requests (`CONFIG_X=value` or `# CONFIG_X is not
# set`) is checked against the final .config; if any did not survive the
# script fails and prints one line per such symbol.
#
# The kernel is cached in
#   ${CARAPACE_CACHE_DIR:-$HOME/.cache/carapace}/kernel/<key>/{vmlinux,config,inputs}
# where <key> hashes the fragments, this script, the source package version
# and the compiler version. The last line on stdout is the absolute path of
# the cached vmlinux; everything else goes to stderr.
#
# Exit status: 0 success, 1 failure (including symbols that did not stick),
# 2 usage error.
set -euo pipefail

# stdout is reserved for the result; all progress goes to stderr.
exec 3>&1 1>&2

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT_PATH="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
DEPS=(flex bison libelf-dev libssl-dev bc cpio xz-utils make gcc)
CACHE_DIR="${CARAPACE_CACHE_DIR:-$HOME/.cache/carapace}"
KARCH=x86_64

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SCRIPT_PATH" >&2
}

config_only=0
out_dir=""
extra_fragments=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config-only) config_only=1; shift ;;
        --extra-fragment)
            [[ $# -ge 2 ]] || { log "error: --extra-fragment needs a FILE"; exit 2; }
            [[ -f "$2" && -r "$2" ]] || die "extra fragment not readable: $2"
            extra_fragments+=("$(cd "$(dirname "$2")" && pwd)/$(basename "$2")")
            shift 2 ;;
        --extra-fragment=*)
            f="${1#*=}"
            [[ -f "$f" && -r "$f" ]] || die "extra fragment not readable: $f"
            extra_fragments+=("$(cd "$(dirname "$f")" && pwd)/$(basename "$f")")
            shift ;;
        --out)
            [[ $# -ge 2 ]] || { log "error: --out needs a DIR"; exit 2; }
            out_dir="$2"; shift 2 ;;
        --out=*) out_dir="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage; log "error: unknown argument: $1"; exit 2 ;;
    esac
done

# Shipped fragments, in a stable order, then the extra ones in command-line order.
shopt -s nullglob
shipped_fragments=("$SCRIPT_DIR"/*.config)
shopt -u nullglob
[[ ${#shipped_fragments[@]} -gt 0 ]] || die "no *.config fragments in $SCRIPT_DIR"
all_fragments=("${shipped_fragments[@]}" "${extra_fragments[@]}")

# ---------------------------------------------------------------- packages --
pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

ensure_packages() {
    local missing=() p
    for p in "$SRC_PKG" "${DEPS[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing missing packages: ${missing[*]}"
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
        sudo=(sudo -n)
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
        "${sudo[@]}" apt-get update -q >&2
        "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
    for p in "${missing[@]}"; do
        pkg_installed "$p" || die "package still not installed: $p"
    done
}

ensure_packages
[[ -r "$SRC_TARBALL" ]] || die "$SRC_TARBALL missing although $SRC_PKG is installed"
SRC_VERSION="$(dpkg-query -W -f='${Version}' "$SRC_PKG")"
[[ -n "$SRC_VERSION" ]] || die "cannot determine the version of $SRC_PKG"

mkdir -p "$CACHE_DIR"
CACHE_DIR="$(cd "$CACHE_DIR" && pwd)"

# ------------------------------------------------------------------ source --
# Extracted once per package version. The extract goes to a temporary
# directory next to the final one and is renamed into place only when
# complete, so an interrupted extract is never used. A lock keeps concurrent
# invocations from extracting twice.
SRC_DIR="$CACHE_DIR/linux-source-$SRC_VERSION"
ensure_source() {
    [[ -f "$SRC_DIR/Makefile" ]] && return 0
    exec 4>"$CACHE_DIR/.linux-source-$SRC_VERSION.lock"
    flock 4
    # Holding the lock, any temporary extract left behind is from a process
    # that died: remove it.
    rm -rf "$CACHE_DIR/.linux-source-$SRC_VERSION.tmp."*
    if [[ ! -f "$SRC_DIR/Makefile" ]]; then
        local tmp
        tmp="$(mktemp -d "$CACHE_DIR/.linux-source-$SRC_VERSION.tmp.XXXXXX")"
        log "extracting $SRC_TARBALL ($SRC_PKG $SRC_VERSION) to $SRC_DIR"
        if ! tar -C "$tmp" -xf "$SRC_TARBALL"; then
            rm -rf "$tmp"
            die "extracting $SRC_TARBALL failed"
        fi
        [[ -f "$tmp/linux-source-6.1/Makefile" ]] || { rm -rf "$tmp"; die "unexpected layout of $SRC_TARBALL"; }
        # A stale, incomplete directory can only exist if someone made it by
        # hand; never reuse it.
        [[ -e "$SRC_DIR" ]] && rm -rf "$SRC_DIR"
        mv -T "$tmp/linux-source-6.1" "$SRC_DIR"
        rmdir "$tmp"
    fi
    flock -u 4
    exec 4>&-
}
ensure_source

# -------------------------------------------------------------- cache key --
sha() { sha256sum | cut -d' ' -f1; }
inputs_manifest() {
    local f
    printf 'carapace guest kernel\n'
    printf 'source %s %s\n' "$SRC_PKG" "$SRC_VERSION"
    printf 'arch %s\n' "$KARCH"
    printf 'gcc %s\n' "$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)"
    printf 'build.sh %s\n' "$(sha <"$SCRIPT_PATH")"
    for f in "${shipped_fragments[@]}"; do
        printf 'fragment %s %s\n' "$(basename "$f")" "$(sha <"$f")"
    done
    for f in "${extra_fragments[@]}"; do
        printf 'extra-fragment %s %s\n' "$(basename "$f")" "$(sha <"$f")"
    done
}
MANIFEST="$(inputs_manifest)"
KEY="$(printf '%s\n' "$MANIFEST" | sha | cut -c1-16)"
KERNEL_CACHE="$CACHE_DIR/kernel"
ENTRY="$KERNEL_CACHE/$KEY"

copy_out() { # copy_out FILE... into $out_dir atomically (tmp + rename)
    [[ -n "$out_dir" ]] || return 0
    mkdir -p "$out_dir"
    local f name
    for f in "$@"; do
        name="$(basename "$f")"
        cp -f "$f" "$out_dir/.$name.tmp.$$"
        mv -f "$out_dir/.$name.tmp.$$" "$out_dir/$name"
    done
    log "copied to $out_dir: $(for f in "$@"; do printf '%s ' "$(basename "$f")"; done)"
}

if [[ $config_only -eq 0 && -f "$ENTRY/vmlinux" && -f "$ENTRY/config" ]]; then
    log "cache hit: $ENTRY"
    copy_out "$ENTRY/vmlinux" "$ENTRY/config"
    echo "$ENTRY/vmlinux" >&3
    exit 0
fi

# ------------------------------------------------------------------ config --
cleanup_dirs=()
cleanup() { local d; for d in "${cleanup_dirs[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT

if [[ $config_only -eq 1 ]]; then
    BUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/carapace-kconfig.XXXXXX")"
else
    mkdir -p "$KERNEL_CACHE"
    # Serialise builds of the same key; a second caller waits and then hits the cache.
    exec 5>"$KERNEL_CACHE/.$KEY.lock"
    flock 5
    if [[ -f "$ENTRY/vmlinux" && -f "$ENTRY/config" ]]; then
        log "cache hit (built concurrently): $ENTRY"
        copy_out "$ENTRY/vmlinux" "$ENTRY/config"
        echo "$ENTRY/vmlinux" >&3
        exit 0
    fi
    # Leftovers of a build of this key that was killed (we hold its lock).
    rm -rf "$KERNEL_CACHE/.build-$KEY."* "$KERNEL_CACHE/.entry-$KEY."*
    BUILD_DIR="$(mktemp -d "$KERNEL_CACHE/.build-$KEY.XXXXXX")"
fi
cleanup_dirs+=("$BUILD_DIR")

MERGED="$BUILD_DIR/carapace-merged.fragment"
for f in "${all_fragments[@]}"; do
    printf '# ---- %s\n' "$f"
    cat "$f"
    printf '\n'
done >"$MERGED"

# requests: "SYMBOL<TAB>VALUE<TAB>FILE<TAB>KIND" for every symbol a fragment
# sets, with "n" standing for "# CONFIG_X is not set" and KIND shipped|extra.
parse_requests() { # parse_requests FILE KIND
    sed -n -E \
        -e 's/^[[:space:]]*(CONFIG_[A-Za-z0-9_]+)=(.*[^[:space:]])?[[:space:]]*$/\1\t\2/p' \
        -e 's/^[[:space:]]*#[[:space:]]*(CONFIG_[A-Za-z0-9_]+) is not set[[:space:]]*$/\1\tn/p' \
        "$1" | awk -v f="$1" -v k="$2" -F'\t' \
            '{ v = $2; if (v == "") v = "\"\""; print $1 "\t" v "\t" f "\t" k }'
}
REQUESTS="$BUILD_DIR/carapace-requests.tsv"
{
    for f in "${shipped_fragments[@]}"; do parse_requests "$f" shipped; done
    for f in "${extra_fragments[@]}"; do parse_requests "$f" extra; done
} >"$REQUESTS"

# Two shipped fragments must not disagree; an extra fragment may override.
conflicts="$(awk -F'\t' '
    $4 == "shipped" && ($1 in val) && val[$1] != $2 {
        printf "%s: %s in %s, %s in %s\n", $1, val[$1], src[$1], $2, $3 }
    $4 == "shipped" { val[$1] = $2; src[$1] = $3 }' "$REQUESTS")"
[[ -z "$conflicts" ]] || die "shipped fragments disagree:"$'\n'"$conflicts"

log "generating config: KCONFIG_ALLCONFIG=<${#all_fragments[@]} fragments> make allnoconfig (O=$BUILD_DIR)"
MAKE_ARGS=(-C "$SRC_DIR" O="$BUILD_DIR" ARCH="$KARCH"
           KBUILD_BUILD_USER=carapace KBUILD_BUILD_HOST=carapace)
KCONFIG_ALLCONFIG="$MERGED" make -s "${MAKE_ARGS[@]}" allnoconfig >&2

# ------------------------------------------------------------------- check --
# Symbols defined anywhere in the Kconfig tree, to tell a misspelt
# "is not set" apart from a real one.
KNOWN="$BUILD_DIR/carapace-known-symbols"
find "$SRC_DIR" -name 'Kconfig*' -type f -print0 \
    | xargs -0 sed -n -E 's/^[[:space:]]*(menu)?config[[:space:]]+([A-Za-z0-9_]+)[[:space:]]*$/CONFIG_\2/p' \
    | sort -u >"$KNOWN"

failures="$(awk -F'\t' '
    FILENAME == ARGV[1] { known[$1] = 1; next }
    FILENAME == ARGV[2] {
        if (match($0, /^CONFIG_[A-Za-z0-9_]+=/)) {
            actual[substr($0, 1, RLENGTH - 1)] = substr($0, RLENGTH + 1)
        } else if (match($0, /^# CONFIG_[A-Za-z0-9_]+ is not set$/)) {
            s = $0; sub(/^# /, "", s); sub(/ is not set$/, "", s); actual[s] = "n"
        }
        next
    }
    { want[$1] = $2; from[$1] = $3; if (!($1 in order)) { order[$1] = ++n; names[n] = $1 } }
    END {
        for (i = 1; i <= n; i++) {
            s = names[i]; w = want[s]; f = from[s]; sub(/.*\//, "", f)
            if (!(s in known)) {
                printf "%s: requested %s, but no such symbol exists in this kernel (%s)\n", s, w, f
                continue
            }
            a = (s in actual) ? actual[s] : "n"
            if (a != w) {
                shown = (s in actual) ? a : "n (not in .config: unmet dependencies)"
                printf "%s: requested %s, got %s (%s)\n", s, w, shown, f
            }
        }
    }' "$KNOWN" "$BUILD_DIR/.config" "$REQUESTS")"
nreq="$(cut -f1 "$REQUESTS" | sort -u | wc -l)"
if [[ -n "$failures" ]]; then
    log "error: $(printf '%s\n' "$failures" | wc -l) of $nreq requested symbols did not survive in the final .config:"
    printf '%s\n' "$failures" | sed 's/^/build.sh:   /' >&2
    exit 1
fi
log "config check passed: all $nreq requested symbols are in the final .config"

if [[ $config_only -eq 1 ]]; then
    if [[ -n "$out_dir" ]]; then
        cp "$BUILD_DIR/.config" "$BUILD_DIR/config"
        copy_out "$BUILD_DIR/config"
    fi
    exit 0
fi

# ------------------------------------------------------------------- build --
log "building vmlinux ($SRC_PKG $SRC_VERSION, key $KEY) with $(nproc) jobs"
start=$SECONDS
make "${MAKE_ARGS[@]}" -j"$(nproc)" vmlinux >&2
log "vmlinux built in $((SECONDS - start)) s"

STAGE="$(mktemp -d "$KERNEL_CACHE/.entry-$KEY.XXXXXX")"
cleanup_dirs+=("$STAGE")
cp "$BUILD_DIR/vmlinux" "$STAGE/vmlinux"
cp "$BUILD_DIR/.config" "$STAGE/config"
printf '%s\n' "$MANIFEST" >"$STAGE/inputs"
chmod 0755 "$STAGE"
[[ -e "$ENTRY" ]] && rm -rf "$ENTRY"   # incomplete leftovers cannot exist, but be sure
mv -T "$STAGE" "$ENTRY"
log "cached: $ENTRY ($(stat -c %s "$ENTRY/vmlinux") bytes)"

copy_out "$ENTRY/vmlinux" "$ENTRY/config"
echo "$ENTRY/vmlinux" >&3
