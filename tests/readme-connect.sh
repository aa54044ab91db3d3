#!/usr/bin/env bash
# Runs README.md's "Connect a hub and an app" commands exactly as written (issue 15): the
# Quick start's relay (`keyway-relay run`, port 4433), a local web service on 127.0.0.1:8123,
# then the README's block with the binaries on the PATH, and checks that a request to the
# forwarded port reaches the service. Uses the workspace's built binaries (dev profile).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bins="${CARGO_TARGET_DIR:-$repo/target}/debug"
for b in keyway keyway-hub keyway-relay; do
    [ -x "$bins/$b" ] || { echo "error: $bins/$b is missing (cargo build --bins)" >&2; exit 1; }
done
export PATH="$bins:$PATH" RUST_LOG=warn
dir=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
# The README's block; its last command (the foreground forwarder) runs in the background here.
awk '/^## Connect a hub and an app/ { section = 1 } section && /^```sh/ { inside = 1; next }
     inside && /^```/ { exit } inside' README.md >"$dir/block.sh"
grep -q "keyway forward" "$dir/block.sh" || { echo "error: no command block found in README.md" >&2; exit 1; }
sed -i 's/--listen 127.0.0.1:8124$/--listen 127.0.0.1:8124 \& FORWARD_PID=$!/' "$dir/block.sh"
cd "$dir"
echo "hello through keyway" >index.html
keyway-relay run >relay.log 2>&1 &
pids+=($!)
python3 -m http.server 8123 --bind 127.0.0.1 >http.log 2>&1 &
pids+=($!)
# The relay writes its key on start; the block reads it.
for _ in $(seq 100); do [ -s keyway-relay.key ] && break; sleep 0.1; done
(
    set -e
    # shellcheck disable=SC1091
    source ./block.sh
    python3 - <<'PY'
import time, urllib.request
deadline = time.monotonic() + 30
while True:
    try:
        body = urllib.request.urlopen("http://127.0.0.1:8124/index.html", timeout=2).read()
        assert body == b"hello through keyway\n", body
        print("README 'Connect a hub and an app': 1 passed, 0 failed")
        break
    except Exception as e:
        if time.monotonic() > deadline:
            raise SystemExit(f"README commands: the forwarded port never answered: {e}")
        time.sleep(0.2)
PY
    kill "$FORWARD_PID" %1 2>/dev/null || true
)
