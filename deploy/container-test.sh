#!/usr/bin/env bash
# Builds the relay image (deploy/Containerfile) from the workspace's built binaries with podman
# and no registry, starts it, and checks what an operator relies on: the image's own
# HEALTHCHECK (`keyway-relay health` inside), `/healthz` from the host, and a real hub (the
# host's keyway-hub) registering through the container's published UDP port. Prints the image
# size. Needs root, podman and runc (`.ci/run` installs them).
#
#   deploy/container-test.sh [BIN_DIR]      # default: target/debug
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bins=${1:-${CARGO_TARGET_DIR:-$repo/target}/debug}
for b in keyway keyway-hub keyway-relay; do
    [ -x "$bins/$b" ] || { echo "error: $bins/$b is missing (cargo build --bins)" >&2; exit 1; }
done

image=localhost/keyway-ci:$$
name=keyway-ci-relay-$$
dir=$(mktemp -d)
hub_pid=
cleanup() {
    [ -n "$hub_pid" ] && kill "$hub_pid" 2>/dev/null
    podman rm -f -t 2 "$name" >/dev/null 2>&1 || true
    podman rmi -f "$image" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
fail() {
    echo "container test: FAILED: $*" >&2
    podman logs "$name" 2>&1 | tail -20 >&2 || true
    [ -f "$dir/hub.log" ] && tail -20 "$dir/hub.log" >&2
    exit 1
}
free_port() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_INET, getattr(socket, sys.argv[1])); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"; }

# Debian's podman: crun refuses hybrid cgroup layouts (runc does not), and its default
# open-files and process limits fail here ("setrlimit: Operation not permitted"): ask for the
# hard open-files limit, and 4 096 processes (the relay runs one thread per core).
podman=(podman --runtime runc)
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
nproc=4096

deploy/container-rootfs.sh "$bins" target/container
"${podman[@]}" build -q --format docker -f deploy/Containerfile -t "$image" . >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "container test: image $image is $((size / 1024 / 1024)) MiB ($size bytes)"

# The state volume: the relay's key made here (so the host knows it) and the hub admitted.
mkdir -p "$dir/state"
relay_key=$("$bins/keyway" keygen --out "$dir/state/keyway-relay.key")
hub_key=$("$bins/keyway" keygen --out "$dir/hub.key")
echo "ci-hub $hub_key" >"$dir/state/authorized_hubs"
chown -R 10001:10001 "$dir/state"
: >"$dir/authorized_apps"

quic_port=$(free_port SOCK_DGRAM)
metrics_port=$(free_port SOCK_STREAM)
# No health timer (it needs systemd, absent in CI): `podman healthcheck run` below runs it.
"${podman[@]}" run -d --name "$name" --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" \
    --health-interval disable \
    -p "127.0.0.1:$quic_port:4433/udp" -p "127.0.0.1:$metrics_port:9464/tcp" \
    -v "$dir/state:/var/lib/keyway:Z" "$image" >/dev/null || fail "podman run"

healthy=
for _ in $(seq 100); do
    if "$bins/keyway-relay" health --metrics-listen "127.0.0.1:$metrics_port" --timeout 2s >/dev/null 2>&1; then
        healthy=1
        break
    fi
    sleep 0.2
done
[ -n "$healthy" ] || fail "/healthz never answered 200 on 127.0.0.1:$metrics_port"
"$bins/keyway-relay" health --metrics-listen "127.0.0.1:$metrics_port"
# The image's HEALTHCHECK, run inside the container.
"${podman[@]}" healthcheck run "$name" || fail "the image's HEALTHCHECK failed"
echo "container test: HEALTHCHECK (keyway-relay health in the container) passed"

hub_metrics=$(free_port SOCK_STREAM)
RUST_LOG=info "$bins/keyway-hub" run --relay "127.0.0.1:$quic_port" --relay-key "$relay_key" --name ci-hub \
    --key "$dir/hub.key" --apps "$dir/authorized_apps" --forward 127.0.0.1:9 \
    --metrics-listen "127.0.0.1:$hub_metrics" >"$dir/hub.log" 2>&1 &
hub_pid=$!
registered=
for _ in $(seq 150); do
    # The relay's own count, through the container's published metrics port.
    if python3 - "$metrics_port" <<'PY' 2>/dev/null; then
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=2).read().decode()
sys.exit(0 if "keyway_relay_hubs_connected 1" in text else 1)
PY
        registered=1
        break
    fi
    sleep 0.2
done
[ -n "$registered" ] || fail "the hub never registered through the container"
# And the hub's side: its /healthz is 200 only while a tunnel is registered.
"$bins/keyway-relay" health --metrics-listen "127.0.0.1:$hub_metrics" >/dev/null || fail "the hub's /healthz is not 200"
echo "container test: hub ci-hub registered through the container (relay and hub agree): passed"
