#!/usr/bin/env bash
# iperf3 through `keyway forward`: the shipped binaries, on loopback, as a user would run them.
#
#   loadtest/iperf3.sh                   # release builds; 10 s each way
#   SECONDS_EACH=20 loadtest/iperf3.sh
#
# iperf3 server <- keyway-hub <- relay <- keyway forward <- iperf3 client, up (client sends) and
# down (-R). Prints one JSON line per direction: Gbit/s (iperf3's receiver figure) and the
# relay's, the hub's and the forwarder's CPU-seconds per GiB (utime + stime from /proc over the
# run), then the same iperf3 run over plain loopback TCP beside it, as the same-run baseline.
# Loopback flatters GSO (a 64 KiB MTU): real links carry less. Needs iperf3 and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${SECONDS_EACH:-10}"
target="${CARGO_TARGET_DIR:-target}/release"
if [[ -z "${NO_BUILD:-}" ]]; then
    cargo build --release -p keyway-relay -p keyway-hub -p keyway-cli >&2
fi
bin="$target"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
uport() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

relay_port=$(uport); iperf_port=$(port); local_port=$(port)
hub_key=$("$bin/keyway" keygen --out "$work/hub.key" | grep -o 'kw[A-Za-z0-9]*' | head -1)
app_key=$("$bin/keyway" keygen --out "$work/app.key" | grep -o 'kw[A-Za-z0-9]*' | head -1)
echo "home $hub_key" > "$work/authorized_hubs"
echo "$app_key iperf3" > "$work/authorized_apps"
# The benchmark measures the data plane, not the per-key byte limit (25 MiB/s by default).
"$bin/keyway-relay" run --listen "127.0.0.1:$relay_port" --key "$work/relay.key" --hubs "$work/authorized_hubs" \
    --no-metrics --bytes-per-second-per-key 0 > "$work/relay.log" 2>&1 &
relay_pid=$!; pids+=("$relay_pid")
sleep 1
relay_key=$("$bin/keyway-relay" pubkey --key "$work/relay.key" | grep -o 'kw[A-Za-z0-9]*' | head -1)
iperf3 -s -p "$iperf_port" > /dev/null 2>&1 &
pids+=($!)
"$bin/keyway-hub" run --relay "127.0.0.1:$relay_port" --relay-key "$relay_key" --name home --key "$work/hub.key" \
    --apps "$work/authorized_apps" --forward "127.0.0.1:$iperf_port" > "$work/hub.log" 2>&1 &
hub_pid=$!; pids+=("$hub_pid")
sleep 2
"$bin/keyway" forward --relay "127.0.0.1:$relay_port" --relay-key "$relay_key" --hub home --hub-key "$hub_key" \
    --key "$work/app.key" --listen "127.0.0.1:$local_port" > "$work/forward.log" 2>&1 &
fwd_pid=$!; pids+=("$fwd_pid")
sleep 1

cpu() { python3 - "$@" <<'EOF'
import os, sys
tick = os.sysconf("SC_CLK_TCK")
print(" ".join(str(sum(int(x) for x in open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[11:13]) / tick) for p in sys.argv[1:]))
EOF
}
run() { # path direction port
    local flag=""; [[ "$2" == down ]] && flag="-R"
    local before after
    before=$(cpu "$relay_pid" "$hub_pid" "$fwd_pid")
    iperf3 -c 127.0.0.1 -p "$3" -t "$secs" $flag -J > "$work/iperf.json"
    after=$(cpu "$relay_pid" "$hub_pid" "$fwd_pid")
    python3 - "$1" "$2" "$before" "$after" "$work/iperf.json" <<'EOF'
import json, sys
path, direction, before, after, out = sys.argv[1:]
r = json.load(open(out))["end"]["sum_received"]
gib = r["bytes"] / 2**30
cpu = [a - b for a, b in zip(map(float, after.split()), map(float, before.split()))]
rec = {"scenario": "iperf3", "path": path, "direction": direction, "gbit_s": round(r["bits_per_second"] / 1e9, 3),
       "gib": round(gib, 3)}
if path == "keyway":
    for name, c in zip(["relay", "hub", "forward"], cpu):
        rec[f"{name}_cpu_s_per_gib"] = round(c / gib, 3) if gib else None
print(json.dumps(rec))
EOF
}
for d in up down; do
    run keyway "$d" "$local_port"
    run loopback_tcp "$d" "$iperf_port"
done
