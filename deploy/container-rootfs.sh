#!/usr/bin/env bash
# Stages the root file system of the Keyway image (deploy/Containerfile) from binaries built on
# this machine, so that the image needs no base image and no registry: the binaries (stripped)
# plus exactly the shared libraries `ldd` lists for them, at the same paths, and the state
# directory /var/lib/keyway.
#
#   cargo build --release -p keyway-relay -p keyway-hub -p keyway-cli
#   deploy/container-rootfs.sh target/release          # stages target/container/
#   podman build --format docker -f deploy/Containerfile -t keyway .
#
# (--format docker keeps the HEALTHCHECK, which the OCI image format has no field for.)
# A binary missing from the directory is left out of the image; keyway-relay is required.
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir=${1:-target/release}
out=${2:-target/container}
[ -x "$bin_dir/keyway-relay" ] || { echo "no $bin_dir/keyway-relay: build it first" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out/rootfs/usr/local/bin" "$out/state"
chmod 0700 "$out/state"
for bin in keyway-relay keyway-hub keyway; do
    [ -x "$bin_dir/$bin" ] || continue
    strip -o "$out/rootfs/usr/local/bin/$bin" "$bin_dir/$bin"
    # ldd prints "name => /path (addr)" for libraries and "/path (addr)" for the loader;
    # linux-vdso has no file.
    ldd "$bin_dir/$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' |
        while read -r lib; do
            mkdir -p "$out/rootfs$(dirname "$lib")"
            cp -L "$lib" "$out/rootfs$lib"
        done
done
du -sh "$out/rootfs" | awk '{ print "staged " $2 ": " $1 }'
