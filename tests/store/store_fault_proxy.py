"""A tiny fault-injecting HTTP/1.1 proxy for S3 tests (127.0.0.1 only).

Sits between the code under test and moto's server.  Each request is parsed
(headers + Content-Length or chunked body), then either forwarded upstream on
a fresh ``Connection: close`` connection, or answered by an injected fault:

* ``status``: reply with an S3-style XML error (e.g. 503 SlowDown, 500, 403);
* ``drop``: reset the client connection after reading the request headers;
* ``delay``: sleep before forwarding (to trip client timeouts).

Faults are queued with :meth:`FaultProxy.inject` and consumed by the next
matching requests.  Threads are bounded and daemonic; :meth:`stop` ends them.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

_MAX_CONNS = 64
_IO_TIMEOUT = 30.0


@dataclass
class Fault:
    kind: str                     # "status" | "drop" | "delay"
    count: int = 1                # how many matching requests it applies to
    status: int = 503
    code: str = "SlowDown"
    seconds: float = 0.0
    methods: tuple[str, ...] = ()  # empty: any method
    path_contains: str = ""
    until: float = 0.0            # > 0: a time window (time.monotonic()) instead of a count: an outage
    duration: float = 0.0         # > 0: an outage of this length that starts at the first matching request


@dataclass
class Seen:
    method: str
    path: str
    fault: str = ""               # "" when forwarded untouched


class _Conn:
    """Buffered reader over a socket for HTTP framing."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_until(self, marker: bytes) -> bytes | None:
        while marker not in self.buf:
            if not self._fill():
                return None
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("short read")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _parse_headers(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = raw.decode("latin-1").split("\r\n")
    start = lines[0]
    headers = []
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
    return start, headers


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _read_body(conn: _Conn, headers: list[tuple[str, str]]) -> bytes:
    te = (_get(headers, "transfer-encoding") or "").lower()
    if "chunked" in te:
        out = b""
        while True:
            line = conn.read_until(b"\r\n")
            if line is None:
                raise ConnectionError("eof in chunked body")
            out += line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers until blank line
                    t = conn.read_until(b"\r\n")
                    if t is None:
                        raise ConnectionError("eof in trailers")
                    out += t
                    if t == b"\r\n":
                        return out
            out += conn.read_exact(size + 2)
    n = int(_get(headers, "content-length") or 0)
    return conn.read_exact(n) if n else b""


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(64)
        self._lsock.settimeout(0.2)
        self.port = self._lsock.getsockname()[1]
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(_MAX_CONNS)
        self._threads: list[threading.Thread] = []
        self.seen: list[Seen] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=5)
        self._lsock.close()
        for t in list(self._threads):
            t.join(timeout=5)

    # ------------------------------------------------------------ faults
    def inject(self, kind: str, count: int = 1, **kw: object) -> None:
        with self._lock:
            self._faults.append(Fault(kind=kind, count=count, **kw))  # type: ignore[arg-type]

    def outage(self, seconds: float, kind: str = "status", armed: bool = False, **kw: object) -> None:
        """Every matching request fails for the next `seconds` (503 SlowDown by default, or drop); armed: the
        window starts at the first matching request (for traffic whose start time the test does not know)."""
        with self._lock:
            timing = {"duration": seconds} if armed else {"until": time.monotonic() + seconds}
            self._faults.append(Fault(kind=kind, count=1, **timing, **kw))  # type: ignore[arg-type]

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.seen.clear()

    def pending(self) -> int:
        with self._lock:
            return sum(f.count for f in self._faults if not f.until and not f.duration)

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            now = time.monotonic()
            self._faults = [f for f in self._faults if not f.until or f.until > now]
            for f in self._faults:
                if (not f.methods or method in f.methods) and f.path_contains in path:
                    if f.duration and not f.until:
                        f.until = now + f.duration
                    if f.until:
                        return f
                    f.count -= 1
                    if f.count <= 0:
                        self._faults.remove(f)
                    return f
        return None

    # ----------------------------------------------------------- serving
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._lsock.accept()
            except (socket.timeout, OSError):
                continue
            if not self._slots.acquire(timeout=5):
                client.close()
                continue
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(_IO_TIMEOUT)
        conn = _Conn(client)
        try:
            while not self._stop.is_set():
                raw = conn.read_until(b"\r\n\r\n")
                if raw is None:
                    return
                start, headers = _parse_headers(raw)
                method, path = start.split(" ")[:2]
                fault = self._take(method, path)
                with self._lock:
                    self.seen.append(Seen(method, path, fault.kind if fault else ""))
                if fault is not None and fault.kind == "drop":
                    # RST instead of FIN: looks like a dropped connection.
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                expect = (_get(headers, "expect") or "").lower() == "100-continue"
                if expect:
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(conn, headers)
                if fault is not None and fault.kind == "status":
                    msg = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{fault.code}</Code>"
                           f"<Message>injected</Message></Error>").encode()
                    client.sendall(
                        f"HTTP/1.1 {fault.status} Injected\r\nContent-Type: application/xml\r\n"
                        f"Content-Length: {len(msg)}\r\n\r\n".encode() + (b"" if method == "HEAD" else msg))
                    continue
                if fault is not None and fault.kind == "delay":
                    time.sleep(fault.seconds)
                fwd = [(k, v) for k, v in headers
                       if k.lower() not in ("connection", "expect", "keep-alive", "proxy-connection")]
                fwd.append(("Connection", "close"))
                req = (start + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fwd) + "\r\n").encode("latin-1")
                resp = self._forward(req + body)
                # Upstream always says close; tell the client the same so it
                # never reads past this response on a reused connection.
                client.sendall(resp)
                return
        except (OSError, ConnectionError, ValueError):
            return
        finally:
            try:
                client.close()
            finally:
                self._slots.release()

    def _forward(self, request: bytes) -> bytes:
        with socket.create_connection(self.upstream, timeout=_IO_TIMEOUT) as up:
            up.sendall(request)
            chunks = []
            while True:
                c = up.recv(65536)
                if not c:
                    break
                chunks.append(c)
        resp = b"".join(chunks)
        head, sep, rest = resp.partition(b"\r\n\r\n")
        lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + sep + rest
