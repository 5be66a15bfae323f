#!/bin/sh
# Builds nodeward's container image offline with buildah, from the RPM `cargo xtask rpm` makes:
# the files the RPM installs (as the Containerfile's `rpm -i` installs them), exactly the shared
# libraries the binary loads (ldd), and a passwd/group naming root. Everything the image says
# about itself (labels, ports, entrypoint, command, user) is read from packaging/Containerfile,
# the production build on Anolis OS 23, so that the two describe the same image
# (tests/tests/image_containerfile.rs checks it).
#
#   packaging/image/build.sh RPM TAG [OCI_ARCHIVE]
#
# `cargo xtask image` runs it on the RPM of the release build. Storage is buildah's own; set
# CONTAINERS_STORAGE_CONF to keep it elsewhere (the tests do). Needs root (or a user namespace
# buildah can use), buildah, rpm2cpio and cpio (Debian's rpm and cpio packages) and ldd.
set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 RPM TAG [OCI_ARCHIVE]" >&2
    exit 64
fi
rpm=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
tag=$2
archive=${3:-}
root=$(cd "$(dirname "$0")/../.." && pwd)
containerfile=$root/packaging/Containerfile

stage=$(mktemp -d "${TMPDIR:-/tmp}/nodeward-image.XXXXXX")
ctr=
cleanup() {
    [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1
    rm -rf "$stage"
}
trap cleanup EXIT INT TERM

# The files the RPM installs, with its modes (cpio keeps them), as `rpm -i` lays them out.
(cd "$stage" && rpm2cpio "$rpm" | cpio --extract --make-directories --preserve-modification-time --quiet)
binary=$stage/usr/bin/nodeward

# Exactly the libraries the binary loads, and the dynamic loader, at the paths ldd resolves them
# to (the loader finds them there without an ld.so.cache).
ldd "$binary" | awk '/=> \// { print $3 } /^[[:space:]]*\// { print $1 }' | while read -r lib; do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
done

# Root, for tools that look the user up (the image runs as uid 0, as the DaemonSet says).
mkdir -p "$stage/etc"
echo "root:x:0:0:root:/root:/sbin/nologin" >"$stage/etc/passwd"
echo "root:x:0:" >"$stage/etc/group"
chmod 644 "$stage/etc/passwd" "$stage/etc/group"

# The Containerfile's instructions, one a line (continuations joined).
instructions=$(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$containerfile" | grep -v '^[[:space:]]*#')
value() { printf '%s\n' "$instructions" | sed -n "s/^$1[[:space:]]\{1,\}//p"; }

ctr=$(buildah from scratch)
buildah copy --quiet "$ctr" "$stage" / >/dev/null
set --
labels=$(value LABEL)
# LABEL key="value" ...: the shell splits and unquotes the pairs as Docker's parser does.
eval "set -- $labels"
for label in "$@"; do
    buildah config --label "$label" "$ctr"
done
for port in $(value EXPOSE); do
    # Docker's default protocol, which `podman build` writes out too: 50051 is 50051/tcp.
    case $port in */*) ;; *) port=$port/tcp ;; esac
    buildah config --port "$port" "$ctr"
done
user=$(value USER)
buildah config --user "${user:-}" "$ctr"
buildah config --entrypoint "$(value ENTRYPOINT)" "$ctr"
buildah config --cmd "$(value CMD)" "$ctr"
buildah commit --quiet "$ctr" "$tag" >/dev/null
if [ -n "$archive" ]; then
    mkdir -p "$(dirname "$archive")"
    rm -f "$archive"
    buildah push --quiet "$tag" "oci-archive:$archive:$tag"
fi
echo "$tag"
