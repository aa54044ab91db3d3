"""Events against a real relay and hub: the relay connection and the end-to-end connection up,
the relay killed and restarted (real binary, same address and key), both losses reported with
their reason before the new connections come up, the new end-to-end connection resumed; and
``network_changed`` and ``path_stats``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import keyway
from conftest import HTTP_BODY, PATIENCE, REPO, Net

GET = b"GET / HTTP/1.0\r\nHost: hub\r\n\r\n"
E = keyway.ClientEvent


async def http_get(client: keyway.Client, net: Net) -> bytes:
    async with await client.connect("home", hub_key=net.hub_key) as stream:
        await stream.write(GET)
        return await stream.read_to_end()


async def collect(events: keyway.Events, into: List[keyway.ClientEvent]) -> None:
    async for event in events:
        into.append(event)


async def wait_for(seen: List[keyway.ClientEvent], what, count: int = 1) -> None:
    """Until ``count`` events matching ``what`` were seen (bounded by PATIENCE)."""
    deadline = time.monotonic() + PATIENCE
    while sum(1 for e in seen if what(e)) < count:
        assert time.monotonic() < deadline, f"waited for {count} of {what}: {seen}"
        await asyncio.sleep(0.02)


def kinds(seen: List[keyway.ClientEvent]) -> List[str]:
    return [type(e).__name__.rsplit(".", 1)[-1] for e in seen]


def test_events_in_order_when_the_relay_is_killed_and_restarted(own_net: Net) -> None:
    net = own_net
    client = net.client(net.app("py-events"))

    async def go() -> List[keyway.ClientEvent]:
        seen: List[keyway.ClientEvent] = []
        reader = asyncio.create_task(collect(client.events(), seen))
        assert (await http_get(client, net)).endswith(HTTP_BODY)
        await wait_for(seen, lambda e: isinstance(e, E.HUB_CONNECTED))
        net.kill_relay()
        net.start_relay()
        # Once the hub is back, one connect: a connect refused while the hub was still away
        # would have spent the session ticket the next one resumes with.
        net.wait_hub_registered()
        reply = await http_get(client, net)
        assert reply.endswith(HTTP_BODY)
        await wait_for(seen, lambda e: isinstance(e, E.HUB_CONNECTED), 2)
        stats = client.path_stats()
        await client.close()
        await wait_for(seen, lambda e: isinstance(e, E.RELAY_DOWN), 2)
        reader.cancel()
        assert stats is not None and stats.channel_in > 0 and stats.channel_out > 0, stats
        return seen

    seen = asyncio.run(go())
    k = kinds(seen)
    assert k[:2] == ["RELAY_UP", "HUB_CONNECTED"], seen
    assert seen[1].hub == "home" and seen[1].hub_key == net.hub_key and not seen[1].resumed
    # Both losses, typed, before any new connection to the restarted relay.
    second_up = k.index("RELAY_UP", 1)
    lost = seen[2:second_up]
    assert sorted(kinds(lost)) == ["HUB_LOST", "RELAY_DOWN"], seen
    for event in lost:
        assert event.reason == keyway.LossReason.RELAY_LOST, event
        assert event.detail
    # Then up again, and the end-to-end connection resumed with the ticket kept from before.
    connected = [e for e in seen[second_up:] if isinstance(e, E.HUB_CONNECTED)]
    assert len(connected) == 1 and connected[0].resumed, seen
    # close(): both reported closed by the app.
    tail = [e for e in seen if isinstance(e, (E.HUB_LOST, E.RELAY_DOWN))][2:]
    assert sorted(kinds(tail)) == ["HUB_LOST", "RELAY_DOWN"], seen
    assert all(e.reason == keyway.LossReason.CLOSED for e in tail), tail


def test_network_changed_drops_and_the_next_connect_resumes(net: Net) -> None:
    client = net.client(net.app("py-network"))

    async def go() -> List[keyway.ClientEvent]:
        seen: List[keyway.ClientEvent] = []
        reader = asyncio.create_task(collect(client.events(), seen))
        assert (await http_get(client, net)).endswith(HTTP_BODY)
        await client.network_changed()
        await wait_for(seen, lambda e: isinstance(e, E.HUB_LOST))
        assert (await http_get(client, net)).endswith(HTTP_BODY)
        await wait_for(seen, lambda e: isinstance(e, E.HUB_CONNECTED), 2)
        await client.close()
        reader.cancel()
        return seen

    seen = asyncio.run(go())
    lost = [e for e in seen if isinstance(e, E.HUB_LOST)][0]
    assert lost.reason == keyway.LossReason.CLOSED, lost
    connected = [e for e in seen if isinstance(e, E.HUB_CONNECTED)]
    assert [c.resumed for c in connected] == [False, True], seen


def test_the_example_app_runs(net: Net, tmp_path: Path) -> None:
    key = tmp_path / "app.key"
    net.app("py-example").save(str(key))
    example = REPO / "bindings" / "python" / "examples" / "app.py"
    out = subprocess.run(
        [sys.executable, str(example), "--key", str(key), "--relay", net.relay, "--relay-key", net.relay_key,
         "--hub", "home", "--hub-key", net.hub_key],
        capture_output=True, text=True, timeout=PATIENCE * 2,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    events = [line for line in lines if line.startswith("event: ")]
    assert [line.split()[1] for line in events[:2]] == ["RELAY_UP", "HUB_CONNECTED"], out.stdout
    assert sum(1 for line in lines if line.startswith("reply: HTTP/1.0 200")) == 2, out.stdout
    assert "network changed" in lines, out.stdout
    assert any("HUB_CONNECTED" in line and "resumed=True" in line for line in events), out.stdout
