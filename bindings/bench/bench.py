"""Throughput and set-up time through the Python binding vs the Rust client, same run.

Starts a real keyway-relay and keyway-hub (from KEYWAY_BIN_DIR, as the tests do) in front of a
local source service (sent ``s``, it sends BENCH_BYTES bytes and closes), then alternates
rounds of the Rust client (``bench_rust``, an example of keyway-ffi built in the same profile
as the Python library) and of the ``keyway`` package, and prints one JSON object: per side the
medians over the rounds of the cold first connect, the median warm set-up (a new stream on the
warm end-to-end connection) and the download throughput, then the binding's cost.

    bindings/bench/run.sh   (builds, installs, then runs this with KEYWAY_BIN_DIR set)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python" / "tests"))
from conftest import Net, bin_dir  # noqa: E402

import keyway  # noqa: E402

BYTES = int(os.environ.get("BENCH_BYTES", str(256 << 20)))
SETUPS = int(os.environ.get("BENCH_SETUPS", "200"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
READ = 1 << 20


def source_service() -> int:
    payload = memoryview(bytes(BYTES))
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            if conn.recv(1) == b"s":
                conn.sendall(payload)

    def accept() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1]


async def python_round(net: Net, key_file: str) -> dict:
    client = keyway.Client(keyway.Identity.load(key_file), relay=net.relay, relay_key=net.relay_key)
    started = time.perf_counter()
    stream = await client.connect("home", hub_key=net.hub_key)
    cold = time.perf_counter() - started
    await stream.close()
    warm = []
    for _ in range(SETUPS):
        started = time.perf_counter()
        stream = await client.connect("home", hub_key=net.hub_key)
        warm.append(time.perf_counter() - started)
        await stream.close()
    stream = await client.connect("home", hub_key=net.hub_key)
    await stream.write(b"s")
    got = 0
    started = time.perf_counter()
    while True:
        data = await stream.read(READ)
        if not data:
            break
        got += len(data)
    took = time.perf_counter() - started
    assert got == BYTES, f"the service sent {got} bytes, not {BYTES}"
    await stream.close()
    await client.close()
    return {
        "cold_connect_ms": cold * 1e3,
        "setup_ms_median": statistics.median(warm) * 1e3,
        "throughput_mib_s": BYTES / (1 << 20) / took,
    }


def rust_round(net: Net, key_file: str, exe: Path) -> dict:
    out = subprocess.run(
        [str(exe), net.relay, net.relay_key, "home", net.hub_key, key_file, str(BYTES), str(SETUPS)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return json.loads(out.stdout)


def medians(rounds: list) -> dict:
    keys = ("cold_connect_ms", "setup_ms_median", "throughput_mib_s")
    return {k: round(statistics.median(r[k] for r in rounds), 3) for k in keys}


def main() -> None:
    exe = Path(os.environ.get("BENCH_RUST", str(bin_dir() / "examples" / "bench_rust")))
    with tempfile.TemporaryDirectory() as root:
        net = Net(Path(root), service_port=source_service())
        try:
            key_file = str(Path(root) / "bench.key")
            net.app("py-bench").save(key_file)
            rust, python = [], []
            for _ in range(ROUNDS):
                rust.append(rust_round(net, key_file, exe))
                python.append(asyncio.run(python_round(net, key_file)))
        finally:
            net.close()
    r, p = medians(rust), medians(python)
    print(json.dumps({
        "bytes": BYTES, "setups": SETUPS, "rounds": ROUNDS, "rust": r, "python": p,
        "throughput_cost_pct": round(100 * (1 - p["throughput_mib_s"] / r["throughput_mib_s"]), 1),
        "setup_cost_ms": round(p["setup_ms_median"] - r["setup_ms_median"], 3),
        "cold_connect_cost_ms": round(p["cold_connect_ms"] - r["cold_connect_ms"], 3),
        "rounds_rust": rust, "rounds_python": python,
    }, indent=1))


if __name__ == "__main__":
    main()
