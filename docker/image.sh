#!/usr/bin/env bash
# Builds the bitnode image with no registry: a Debian bookworm rootfs made by debootstrap (from the mirror
# this machine's apt already uses) and imported as the base, then docker/Dockerfile on top of it with the
# release binary built here. Needs root, docker (a running engine) and debootstrap.
#   docker/image.sh [TAG]        (default bitnode:local; the base is kept as bitnode-base:bookworm)
# BITNODE_BIN picks the binary (default target/release/bitnode, built when missing); the test harness
# passes the test build's own binary, stripped of its line tables to keep the image small.
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-bitnode:local}"
base=bitnode-base:bookworm
if ! docker image inspect "$base" >/dev/null 2>&1; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || { echo "no Debian mirror found in this machine's apt sources" >&2; exit 1; }
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    echo "debootstrap bookworm from $mirror"
    debootstrap --variant=minbase --include=libvulkan1,mesa-vulkan-drivers,iproute2,iptables,procps \
        bookworm "$root" "$mirror" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import - "$base" >/dev/null
fi
bin="${BITNODE_BIN:-target/release/bitnode}"
if [ -z "${BITNODE_BIN:-}" ] && [ ! -x "$bin" ]; then cargo build --release -p bitnode --locked; fi
mkdir -p docker/prebuilt
if command -v objcopy >/dev/null; then
    objcopy --strip-debug "$bin" docker/prebuilt/bitnode
else
    cp "$bin" docker/prebuilt/bitnode
fi
docker build -q -f docker/Dockerfile --build-arg BASE="$base" --build-arg BUILDER="$base" -t "$tag" . >/dev/null
rm -f docker/prebuilt/bitnode
docker image prune -f --filter label=bitnode.stage=build >/dev/null
echo "$tag"
