"""The Python binding against a real relay and hub: pair, connect, HTTP through the stream,
typed errors (wrong hub key, revoked app, bad arguments, use after close)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

import keyway
from conftest import HTTP_BODY, Net, binary, run

GET = b"GET / HTTP/1.0\r\nHost: hub\r\n\r\n"


async def http_get(stream: keyway.Stream) -> bytes:
    await stream.write(GET)
    return await stream.read_to_end()


def test_identity_files_and_bytes(tmp_path: Path) -> None:
    identity = keyway.Identity.generate()
    path = tmp_path / "app.key"
    identity.save(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert keyway.Identity.load(str(path)).public_key() == identity.public_key()
    assert keyway.Identity.from_bytes(identity.to_bytes()).public_key() == identity.public_key()
    assert identity.public_key().startswith("kw") and len(identity.public_key()) == 54
    # The CLI reads the same key file.
    out = run("keyway", "keygen", "--out", str(tmp_path / "other.key"), cwd=tmp_path)
    assert keyway.Identity.load(str(tmp_path / "other.key")).public_key() in out
    os.chmod(path, 0o644)
    with pytest.raises(keyway.KeywayError.Io) as e:
        keyway.Identity.load(str(path))
    assert "chmod 600" in e.value.detail


def test_bad_arguments_are_typed(net: Net) -> None:
    identity = keyway.Identity.generate()
    with pytest.raises(keyway.KeywayError.BadArgument):
        keyway.Client(identity, relay=net.relay, relay_key="kwnotakey")
    with pytest.raises(keyway.KeywayError.BadArgument):
        keyway.Client(identity, relay="not an address", relay_key=net.relay_key)
    with pytest.raises(keyway.KeywayError.BadArgument):
        keyway.Identity.from_bytes(b"\x00" * 7)
    client = net.client(identity)

    async def go() -> None:
        with pytest.raises(keyway.KeywayError.BadArgument):
            await client.connect("Not A Name", hub_key=net.hub_key)
        with pytest.raises(keyway.KeywayError.BadArgument):
            await client.connect("home", hub_key="kw" + "a" * 10)
        with pytest.raises(keyway.KeywayError.BadArgument):
            await keyway.pair("keyway://pair?nonsense", identity)
        with pytest.raises(keyway.KeywayError.BadArgument):
            await client.connect("home")  # no key given, no storage

    asyncio.run(go())


def test_pair_then_http_through_the_stream(net: Net, tmp_path: Path) -> None:
    storage = keyway.file_storage(str(tmp_path / "app.key"))
    identity = keyway.Identity.from_storage(storage)
    assert (tmp_path / "app.key").is_file()  # the file storage wrote the new key, 0600

    async def go() -> None:
        paired = await keyway.pair(net.pairing_code("py-pair"), identity, storage)
        assert (paired.hub, paired.hub_key, paired.relay_key) == ("home", net.hub_key, net.relay_key)
        # The CLI's known-hubs file now has it, and the storage gives the key back.
        assert "home" in (tmp_path / "app.key.hubs.toml").read_text()
        client = keyway.Client.from_pairing(identity, paired, storage=storage)
        async with await client.connect("home") as stream:
            reply = await http_get(stream)
        assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(HTTP_BODY), reply
        # Use after close is a typed error, never a crash.
        with pytest.raises(keyway.KeywayError.StreamClosed):
            await stream.read(10)
        with pytest.raises(keyway.KeywayError.StreamClosed):
            await stream.write(b"x")
        await stream.close()  # twice is fine
        # Backgrounded and back: close() drops everything, the next connect dials again.
        await client.close()
        again = await client.connect("home")
        assert (await http_get(again)).endswith(HTTP_BODY)
        await again.close()
        await client.close()

    asyncio.run(go())


def test_concurrent_streams_and_forward(net: Net) -> None:
    identity = net.app("py-concurrent")
    client = net.client(identity)

    async def one() -> bytes:
        stream = await client.connect("home", hub_key=net.hub_key)
        try:
            return await http_get(stream)
        finally:
            await stream.close()

    async def go() -> None:
        replies = await asyncio.gather(*(one() for _ in range(8)))
        assert all(r.endswith(HTTP_BODY) for r in replies)
        async with await client.forward("home", "127.0.0.1:0", hub_key=net.hub_key) as fwd:
            host, port = fwd.local_addr.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(GET)
            await writer.drain()
            reply = await reader.read()
            writer.close()
            assert reply.endswith(HTTP_BODY), reply
        await client.close()

    asyncio.run(go())


def test_wrong_hub_key_is_a_typed_refusal(net: Net) -> None:
    identity = net.app("py-wrong-key")
    client = net.client(identity)
    other = keyway.Identity.generate().public_key()

    async def go() -> None:
        with pytest.raises(keyway.KeywayError.Refused) as e:
            await client.connect("home", hub_key=other)
        assert e.value.reason == keyway.Refusal.HUB_KEY_MISMATCH
        assert e.value.detail
        with pytest.raises(keyway.KeywayError.Refused) as e:
            await client.connect("nohub", hub_key=net.hub_key)
        assert e.value.reason == keyway.Refusal.UNKNOWN_HUB
        await client.close()

    asyncio.run(go())


def test_revoked_app_gets_a_typed_error(net: Net) -> None:
    identity = net.app("py-revoked")
    client = net.client(identity)

    async def go() -> None:
        stream = await client.connect("home", hub_key=net.hub_key)
        net.revoke("py-revoked")
        # The live stream is cut with the typed reason (the relay hears of the revocation from
        # the hub and ends the channel), and later attempts are refused.
        with pytest.raises(keyway.KeywayError.Revoked) as cut:
            for _ in range(600):  # bounded: 30 s
                await stream.write(b"x")
                await asyncio.sleep(0.05)
        assert "revoked" in cut.value.detail
        with pytest.raises(keyway.KeywayError.Refused) as refused:
            await client.connect("home", hub_key=net.hub_key)
        assert refused.value.reason == keyway.Refusal.APP_NOT_AUTHORIZED
        assert "does not authorize app key" in refused.value.detail
        await client.close()

    asyncio.run(go())


def test_binaries_are_there() -> None:
    # Fails (never skips) with CI=true if the workspace's binaries were not built.
    for name in ("keyway-relay", "keyway-hub", "keyway"):
        assert Path(binary(name)).is_file()


def test_the_readme_snippet_runs_as_written(net: Net, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(snippet, "README.md (python snippet)", "exec"), namespace)
    key_file = tmp_path / "app.key"
    net.app("py-readme").save(str(key_file))
    reply = asyncio.run(namespace["fetch"](str(key_file), net.relay, net.relay_key, net.hub_key))
    assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(HTTP_BODY), reply
