"""The installed wheel (no Rust toolchain around it) and the library's logs in Python's
``logging``: captured at the chosen level, and never holding the app's private key."""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import logging
import os
import re
import shutil
from pathlib import Path
from typing import List

import pytest

import keyway
from conftest import HTTP_BODY, REPO, Net

GET = b"GET / HTTP/1.0\r\nHost: hub\r\n\r\n"


def workspace_version() -> str:
    text = (REPO / "Cargo.toml").read_text()
    section = text.split("[workspace.package]", 1)[1]
    match = re.search(r'^version = "([^"]+)"', section, re.MULTILINE)
    assert match, "no version in [workspace.package]"
    return match.group(1)


def test_installed_from_the_wheel_without_rust() -> None:
    venv = os.environ.get("KEYWAY_WHEEL_VENV")
    if not venv:
        if os.environ.get("CI") == "true":
            pytest.fail("KEYWAY_WHEEL_VENV is not set: CI runs these tests against the installed wheel")
        pytest.skip("not run against an installed wheel (bindings/run-tests.sh does that)")
    # The package imported is the installed one, not the source tree next to the tests.
    assert Path(keyway.__file__).resolve().is_relative_to(Path(venv).resolve()), keyway.__file__
    for tool in ("cargo", "rustc", "maturin"):
        assert shutil.which(tool) is None, f"{tool} is on the PATH: {shutil.which(tool)}"
    assert keyway.__version__ == importlib.metadata.version("keyway") == workspace_version()


def private_key_forms(identity: keyway.Identity) -> List[str]:
    """Every text form the app's private key could take in a log line."""
    der = identity.to_bytes()
    # An Ed25519 PKCS#8 document ends its private part with the 32-byte seed at offset 16.
    seed = der[16:48]
    assert keyway.Identity.from_bytes(seed).public_key() == identity.public_key()
    b32 = base64.b32encode(seed).decode().rstrip("=")
    forms = [
        seed.hex(),
        base64.b64encode(seed).decode().rstrip("="),
        base64.urlsafe_b64encode(seed).decode().rstrip("="),
        b32,
        "kw" + b32.lower(),  # the seed in the text form public keys use
        ", ".join(str(b) for b in seed),  # Rust's Debug of the bytes
        der.hex(),
        base64.b64encode(der).decode().rstrip("="),
    ]
    return forms + [f.upper() for f in forms] + [f.lower() for f in forms]


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=keyway.TRACE)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured():
    logger = logging.getLogger("keyway")
    capture = Capture()
    logger.addHandler(capture)
    logger.setLevel(keyway.TRACE)
    try:
        yield capture
    finally:
        keyway.disable_logging()
        logger.removeHandler(capture)


def test_logs_at_trace_through_pairing_and_a_connect_hold_no_private_key(
    net: Net, tmp_path: Path, captured: Capture
) -> None:
    storage = keyway.file_storage(str(tmp_path / "app.key"))
    identity = keyway.Identity.from_storage(storage)
    keyway.enable_logging(keyway.TRACE)

    async def go() -> None:
        paired = await keyway.pair(net.pairing_code("py-logs"), identity, storage)
        client = keyway.Client.from_pairing(identity, paired, storage=storage)
        async with await client.connect("home") as stream:
            await stream.write(GET)
            assert (await stream.read_to_end()).endswith(HTTP_BODY)
        await client.close()

    asyncio.run(go())
    keyway.disable_logging()
    lines = [r.getMessage() for r in captured.records]
    targets = {r.keyway_target.split("::")[0] for r in captured.records}
    # The capture works: QUIC's own trace events and the client's debug steps are there.
    assert any(r.levelno == keyway.TRACE for r in captured.records), targets
    assert {"keyway_client", "quinn_proto"} <= targets, targets
    assert len(lines) > 100, len(lines)
    forms = private_key_forms(identity)
    leaks = [(form, line) for line in lines for form in forms if form in line]
    assert not leaks, leaks[:3]


def test_logs_below_the_level_are_not_sent(net: Net, captured: Capture) -> None:
    client = net.client(net.app("py-logs-level"))
    keyway.enable_logging(logging.WARNING)

    async def go() -> None:
        async with await client.connect("home", hub_key=net.hub_key) as stream:
            await stream.write(GET)
            assert (await stream.read_to_end()).endswith(HTTP_BODY)
        await client.close()

    asyncio.run(go())
    at_warning = [r.levelno for r in captured.records]
    keyway.enable_logging(logging.DEBUG)
    asyncio.run(go())
    keyway.disable_logging()
    at_debug = [r.levelno for r in captured.records[len(at_warning):]]
    # Nothing below WARNING while that was the level; the same connect at DEBUG says things,
    # none of them at TRACE.
    assert all(level >= logging.WARNING for level in at_warning), at_warning
    assert at_debug and min(at_debug) == logging.DEBUG, at_debug
    assert all(r.keyway_target for r in captured.records)
