"""Fixtures: a real keyway-relay and keyway-hub (the workspace's built binaries) on loopback,
with a tiny HTTP service behind the hub.

The binaries come from ``KEYWAY_BIN_DIR`` (``bindings/run-tests.sh`` sets it to the cargo
target's ``debug/``). Without them the tests are skipped on a developer's machine, but with
``CI=true`` they fail: CI must never pass by skipping.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

import keyway

REPO = Path(__file__).resolve().parents[3]
#: Bounds every wait for a process to come up (never an assertion on time).
PATIENCE = 30.0
HTTP_BODY = b"hello from the hub's service\n"
#: The app keys in ``authorized_apps`` from the start, one per test that needs its own.
APP_LABELS = ("py-concurrent", "py-wrong-key", "py-revoked", "py-bench", "py-readme", "py-logs-level", "py-events", "py-network", "py-example")


def bin_dir() -> Path:
    explicit = os.environ.get("KEYWAY_BIN_DIR")
    if explicit:
        return Path(explicit)
    target = os.environ.get("CARGO_TARGET_DIR", str(REPO / "target"))
    return Path(target) / "debug"


def binary(name: str) -> str:
    path = bin_dir() / name
    if not path.is_file():
        message = f"{path} is missing: build it with cargo build --bins -p keyway-relay -p keyway-hub -p keyway-cli"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return str(path)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, ok=lambda status: status == 200) -> None:
    deadline = time.monotonic() + PATIENCE
    last: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if ok(r.status):
                    return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.05)
    raise AssertionError(f"{url} did not come up within {PATIENCE}s: {last}")


def run(name: str, *args: str, cwd: Path) -> str:
    out = subprocess.run([binary(name), *args], cwd=cwd, capture_output=True, text=True, timeout=PATIENCE)
    assert out.returncode == 0, f"{name} {' '.join(args)} failed: {out.stderr}"
    return out.stdout


class Service(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", str(len(HTTP_BODY)))
        self.end_headers()
        self.wfile.write(HTTP_BODY)

    def log_message(self, *args: object) -> None:
        pass


class Net:
    """A relay, a hub named ``home`` registered at it, and the HTTP service behind the hub (or
    the service on ``service_port``)."""

    def __init__(self, root: Path, service_port: Optional[int] = None) -> None:
        self.root = root
        self.procs: List[subprocess.Popen] = []
        relay_id = keyway.Identity.generate()
        relay_id.save(str(root / "relay.key"))
        self.hub_id = keyway.Identity.generate()
        self.hub_id.save(str(root / "hub.key"))
        self.relay_key = relay_id.public_key()
        self.hub_key = self.hub_id.public_key()
        (root / "authorized_hubs").write_text(f"home {self.hub_key}\n")
        # Apps authorized before the hub starts (a hub notices later edits only at its next
        # poll, and a test must not race that).
        self.apps = {label: keyway.Identity.generate() for label in APP_LABELS}
        (root / "authorized_apps").write_text(
            "".join(f"{app.public_key()} {label}\n" for label, app in self.apps.items())
        )
        self.relay = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Service)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        service_port = service_port or self.http.server_port
        self.relay_proc = self.start_relay()
        hub_metrics = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
        self.spawn("keyway-hub", "run", *self.relay_args(), "--name", "home", "--key", "hub.key",
                   "--apps", "authorized_apps", "--forward", f"127.0.0.1:{service_port}",
                   "--metrics-listen", hub_metrics)
        wait_http(f"http://{hub_metrics}/healthz")

    def start_relay(self) -> subprocess.Popen:
        """Starts the relay (again, after ``kill_relay``: same address, same key)."""
        metrics = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
        proc = self.spawn("keyway-relay", "run", "--listen", self.relay, "--key", "relay.key",
                          "--hubs", "authorized_hubs", "--metrics-listen", metrics)
        wait_http(f"http://{metrics}/metrics")
        self.relay_proc = proc
        self.relay_metrics = metrics
        return proc

    def wait_hub_registered(self) -> None:
        """Until the relay counts the hub as registered (bounded by PATIENCE)."""
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://{self.relay_metrics}/metrics", timeout=2) as r:
                if "keyway_relay_hubs_connected 1" in r.read().decode():
                    return
            time.sleep(0.05)
        raise AssertionError(f"the hub did not register at the relay within {PATIENCE}s")

    def kill_relay(self) -> None:
        """Kills the relay at once (SIGKILL: it says goodbye to nobody)."""
        self.relay_proc.kill()
        self.relay_proc.wait()

    def relay_args(self) -> List[str]:
        return ["--relay", self.relay, "--relay-key", self.relay_key]

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([binary(name), *args], cwd=self.root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
        self.procs.append(proc)
        return proc

    def pairing_code(self, label: str) -> str:
        out = run("keyway-hub", "pair", *self.relay_args(), "--name", "home", "--key", "hub.key",
                  "--apps", "authorized_apps", "--label", label, "--ttl", "1m", "--no-wait", "--no-qr",
                  cwd=self.root)
        return out.strip().splitlines()[-1]

    def app(self, label: str) -> keyway.Identity:
        """The identity authorized under ``label`` (one of ``APP_LABELS``)."""
        return self.apps[label]

    def revoke(self, label: str) -> None:
        run("keyway-hub", "apps", "revoke", "--apps", "authorized_apps", label, cwd=self.root)

    def client(self, identity: keyway.Identity) -> keyway.Client:
        return keyway.Client(identity, relay=self.relay, relay_key=self.relay_key)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.http.shutdown()


@pytest.fixture
def own_net(tmp_path: Path) -> Iterator[Net]:
    """A relay and hub of the test's own (for tests that kill the relay)."""
    n = Net(tmp_path)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("net")
    n = Net(root)
    try:
        yield n
    finally:
        n.close()
