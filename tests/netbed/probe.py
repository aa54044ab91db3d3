#!/usr/bin/env python3
"""HTTP probe run inside the app's namespace (standard library only). Prints one result line.

    probe.py wait PORT PATH EXPECT DEADLINE_S   retry GET until the body contains EXPECT;
                                                 prints "ok <seconds> <attempts>" or "timeout <last>"
    probe.py sha PORT PATH TIMEOUT_S             one GET; prints "ok <length> <sha256hex> <seconds>"
    probe.py session PORT                        one keep-alive connection; a GET /hello per stdin
                                                 line; prints "ok <seconds>" or "err <what>" each
    probe.py closes PORT TIMEOUT_S               connect, send a GET, wait for the peer to close;
                                                 prints "closed <seconds> <bytes received>"
"""
import hashlib
import socket
import sys
import time


def request(sock, path):
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: hub\r\n\r\n".encode())
    f = sock.makefile("rb")
    status = f.readline()
    if not status:
        raise EOFError("connection closed before a response")
    length = 0
    while True:
        h = f.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    digest = hashlib.sha256()
    got = 0
    body_head = b""
    while got < length:
        chunk = f.read(min(1 << 20, length - got))
        if not chunk:
            raise EOFError(f"body cut after {got} of {length} bytes")
        digest.update(chunk)
        if len(body_head) < 4096:
            body_head += chunk[: 4096 - len(body_head)]
        got += len(chunk)
    return status.decode("latin-1").strip(), got, digest.hexdigest(), body_head


def connect(port, timeout):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def main():
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "wait":
        path, expect, deadline = sys.argv[3], sys.argv[4].encode(), float(sys.argv[5])
        start = time.monotonic()
        attempts = 0
        last = ""
        while time.monotonic() - start < deadline:
            attempts += 1
            try:
                with connect(port, 15) as s:
                    _, _, _, body = request(s, path)
                    if expect in body:
                        print(f"ok {time.monotonic() - start:.3f} {attempts}", flush=True)
                        return
                    last = body[:200]
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                last = repr(e)
            time.sleep(0.1)
        print(f"timeout {last}", flush=True)
    elif mode == "sha":
        path, timeout = sys.argv[3], float(sys.argv[4])
        start = time.monotonic()
        with connect(port, timeout) as s:
            status, n, hexdigest, _ = request(s, path)
        print(f"ok {n} {hexdigest} {time.monotonic() - start:.3f} {status}", flush=True)
    elif mode == "session":
        s = connect(port, 60)
        for _ in sys.stdin:
            start = time.monotonic()
            try:
                _, _, _, body = request(s, "/hello")
                ok = b"hello from the hub" in body
                print(f"{'ok' if ok else 'err'} {time.monotonic() - start:.3f}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"err {e!r}", flush=True)
    elif mode == "closes":
        timeout = float(sys.argv[3])
        give_up = time.monotonic() + timeout
        while True:  # the forwarder may not listen yet
            try:
                s = connect(port, timeout)
                break
            except ConnectionRefusedError:
                if time.monotonic() > give_up:
                    print("never-listened", flush=True)
                    return
                time.sleep(0.1)
        start = time.monotonic()
        with s:
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: hub\r\n\r\n")
            got = 0
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += len(chunk)
            except ConnectionResetError:
                pass
            except socket.timeout:
                print(f"still-open {time.monotonic() - start:.3f} {got}", flush=True)
                return
        print(f"closed {time.monotonic() - start:.3f} {got}", flush=True)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
