#!/usr/bin/env python3
"""The hub's local web service for the network test bed (standard library only).

    service.py PORT BLOB_FILE

HTTP/1.1 on 127.0.0.1:PORT with keep-alive:
  GET /hello    -> "hello from the hub"
  GET /blob     -> the bytes of BLOB_FILE
  GET /ws.html  -> a page that opens a WebSocket to the same origin, sends a message and writes
                   the echo into the DOM (#result)
  GET /wait     -> an empty answer once a page has reported its echo (at most 20 s), which holds
                   the page's load event until the DOM holds the result
  GET /ws       -> WebSocket (RFC 6455) echo of text frames
"""
import base64
import hashlib
import socket
import socketserver
import struct
import sys
import threading

DONE = threading.Condition()
DONE_COUNT = [0]
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

PAGE = b"""<!doctype html>
<html><head><title>keyway netbed</title></head>
<body><h1>hub page</h1><p id="result">pending</p>
<script>
const out = document.getElementById('result');
const msg = 'ping-through-keyway-' + location.port;
const ws = new WebSocket('ws://' + location.host + '/ws');
ws.onopen = () => ws.send(msg);
ws.onmessage = (e) => {
  if (e.data === 'echo:done') { ws.close(); return; }
  out.textContent = (e.data === 'echo:' + msg) ? 'WS-OK ' + e.data : 'WS-BAD ' + e.data;
  ws.send('done');
};
ws.onerror = () => { out.textContent = 'WS-ERROR'; };
</script>
<!-- Holds the load event (and so --dump-dom) until the page has written the echo into the DOM. -->
<img src="/wait" alt="">
</body></html>
"""


def recv_exact(f, n):
    data = f.read(n)
    if data is None or len(data) < n:
        raise EOFError
    return data


def ws_send(sock, opcode, payload):
    header = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        header += bytes([n])
    elif n < 65536:
        header += bytes([126]) + struct.pack(">H", n)
    else:
        header += bytes([127]) + struct.pack(">Q", n)
    sock.sendall(header + payload)


def websocket(handler, headers):
    key = headers.get("sec-websocket-key", "")
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    handler.request.sendall(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
        ).encode()
    )
    f = handler.rfile
    while True:
        b0, b1 = recv_exact(f, 2)
        opcode = b0 & 0x0F
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", recv_exact(f, 2))[0]
        elif n == 127:
            n = struct.unpack(">Q", recv_exact(f, 8))[0]
        mask = recv_exact(f, 4) if b1 & 0x80 else b"\0\0\0\0"
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(recv_exact(f, n)))
        if opcode == 1:
            ws_send(handler.request, 1, b"echo:" + data)
            if data == b"done":
                with DONE:
                    DONE_COUNT[0] += 1
                    DONE.notify_all()
        elif opcode == 9:
            ws_send(handler.request, 10, data)
        elif opcode == 8:
            ws_send(handler.request, 8, data[:2])
            return


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                line = self.rfile.readline(8192)
                if not line:
                    return
                parts = line.decode("latin-1").split()
                if len(parts) < 2:
                    return
                path = parts[1]
                headers = {}
                while True:
                    h = self.rfile.readline(8192).decode("latin-1")
                    if h in ("\r\n", "\n", ""):
                        break
                    k, _, v = h.partition(":")
                    headers[k.strip().lower()] = v.strip()
                if path == "/ws" and headers.get("upgrade", "").lower() == "websocket":
                    websocket(self, headers)
                    return
                if path == "/wait":
                    with DONE:
                        DONE.wait_for(lambda: DONE_COUNT[0] > 0, timeout=20)
                    body, ctype = b"", "image/gif"
                elif path == "/hello":
                    body, ctype = b"hello from the hub", "text/plain"
                elif path == "/blob":
                    with open(BLOB, "rb") as fh:
                        body, ctype = fh.read(), "application/octet-stream"
                elif path in ("/", "/ws.html"):
                    body, ctype = PAGE, "text/html"
                else:
                    body, ctype = b"not found", "text/plain"
                status = "404 Not Found" if body == b"not found" else "200 OK"
                self.request.sendall(
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                if headers.get("connection", "").lower() == "close":
                    return
        except (EOFError, ConnectionError, OSError):
            return


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    PORT = int(sys.argv[1])
    BLOB = sys.argv[2]
    with Server(("127.0.0.1", PORT), Handler) as srv:
        print("listening", flush=True)
        srv.serve_forever()
