"""An app-shaped program: connect to a hub, show what happens to the connections, and come back
after a (simulated) network change.

    python app.py --key app.key --relay 203.0.113.7:4433 --relay-key kw… --hub home --hub-key kw…

What a phone or desktop app does with Keyway, in order: route the library's logs into its own
(``keyway.enable_logging``), follow ``client.events()`` for a status line, fetch something
through an end-to-end stream, and when the OS says the network changed call
``client.network_changed()``: the connections over the old network go at once, and the next
``connect`` dials from the new one, resuming the end-to-end connection with the ticket the
client kept. ``bindings/python/tests/test_events.py`` runs it against a real relay and hub.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import keyway

GET = b"GET / HTTP/1.0\r\nHost: hub\r\n\r\n"


def describe(event: keyway.ClientEvent) -> str:
    """One line per event: its kind, then its fields."""
    fields = {name: getattr(event, name) for name in ("relay", "hub", "resumed", "reason", "detail", "count")
              if hasattr(event, name)}
    return " ".join([type(event).__name__.rsplit(".", 1)[-1]] + [f"{k}={v}" for k, v in fields.items()])


async def fetch(client: keyway.Client, hub: str, hub_key: str) -> bytes:
    async with await client.connect(hub, hub_key=hub_key) as stream:
        await stream.write(GET)
        return await stream.read_to_end()


async def show(events: keyway.Events) -> None:
    async for event in events:
        print(f"event: {describe(event)}", flush=True)


async def main(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(keyway_target)s: %(message)s")
    keyway.enable_logging(logging.INFO)
    identity = keyway.Identity.load(args.key)
    client = keyway.Client(identity, relay=args.relay, relay_key=args.relay_key)
    watcher = asyncio.create_task(show(client.events()))

    reply = await fetch(client, args.hub, args.hub_key)
    print(f"reply: {reply.splitlines()[0].decode()}", flush=True)

    # What the OS's connectivity callback would trigger (Android's NetworkCallback, iOS's
    # NWPathMonitor, a laptop's new Wi-Fi).
    print("network changed", flush=True)
    await client.network_changed()
    reply = await fetch(client, args.hub, args.hub_key)
    print(f"reply: {reply.splitlines()[0].decode()}", flush=True)
    print(f"path stats: {client.path_stats()}", flush=True)

    await client.close()
    await asyncio.sleep(0.2)  # the last events (closed by the app) reach the status line
    watcher.cancel()
    keyway.disable_logging()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--key", "--relay", "--relay-key", "--hub", "--hub-key"):
        parser.add_argument(name, required=True)
    sys.exit(asyncio.run(main(parser.parse_args())))
