"""A misbehaving HTTP server on 127.0.0.1 for the fault-injection tests.

Raw sockets, one thread per connection, so that it can do what a polite server never does:
answer NUL bytes and invalid UTF-8, stream 50 MB, redirect to private addresses, accept and
never answer, reset the connection half way through a body, trickle one byte a second.
The first path segment picks the behaviour; the rest of the path is free, so each test
gives its queue a path of its own (/nul/q3?token=...) and counts only its own attempts.

  /ok               200 {"ok": true}
  /fail500          500
  /slow             200 after SLOW_DELAY seconds (requests in flight when a process dies)
  /nul              200, a body with raw 0x00 bytes
  /badutf8          200, a body that is not UTF-8
  /badheader        200, a header value that is not UTF-8 (obs-text bytes)
  /huge             200, HUGE_BYTES (50 MB) streamed with a Content-Length
  /redirect-private 302 to http://127.0.0.1:<port>/ok/<rest> (loopback, allowed by the
                    tests' allowlist); /redirect-private/metadata/... 302 to
                    http://169.254.169.254/latest/meta-data/
  /silent           reads the request, never answers (until the server closes)
  /reset            200 headers and part of the body, then RST (SO_LINGER 0 + close)
  /reset-early      reads the request, then RST before any byte of a response
  /trickle          the whole response, status line included, one byte per second
"""
import socket
import struct
import threading
import time
from dataclasses import dataclass

HUGE_BYTES = 50 * 1024 * 1024
SLOW_DELAY = 1.0
NUL_BODY = b'{"note": "nul follows"}\x00\x00 and \x00 more'
BAD_UTF8_BODY = b'caf\xe9 \xff\xfe \xc3\x28 \xed\xa0\x80 surrogate \xf0\x28\x8c\x28 end'
RESET_PREFIX = b'{"partial": "'


@dataclass
class Request:
    at: float            # when the request was fully read
    path: str            # without the query
    query: str
    method: str
    headers: dict        # lower-case names
    body: bytes

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")


class HostileServer:
    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.huge_sent: list[int] = []      # bytes of body each /huge answer got out
        self.closed = threading.Event()
        self.open_conns: set[socket.socket] = set()
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    # --- what the tests read

    def to(self, path: str) -> list[Request]:
        """Requests whose path (query excluded) is exactly `path`."""
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def attempts(self, path: str) -> int:
        return len(self.to(path))

    def webhook_ids(self, path: str) -> list[str | None]:
        return [r.webhook_id for r in self.to(path)]

    def close(self):
        self.closed.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self.lock:
            conns = list(self.open_conns)
        for c in conns:
            try:
                c.close()
            except OSError:
                pass

    # --- the server

    def _accept_loop(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.open_conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        buf = b""
        try:
            while not self.closed.is_set():  # keep-alive: one request after another
                req, buf = self._read_request(conn, buf)
                if req is None:
                    return
                with self.lock:
                    self.requests.append(req)
                if not self._answer(conn, req):
                    return
        except OSError:
            pass
        finally:
            with self.lock:
                self.open_conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _read_request(self, conn, buf):
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return None, b""
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body, buf = self._read_chunked(conn, buf)
        else:
            length = int(headers.get("content-length", "0") or 0)
            while len(buf) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return None, b""
                buf += chunk
            body, buf = buf[:length], buf[length:]
        path, _, query = target.partition("?")
        return Request(time.time(), path, query, method, headers, body), buf

    def _read_chunked(self, conn, buf):
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += conn.recv(65536)
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf += conn.recv(65536)
            body, buf = body + buf[:size], buf[size + 2:]
            if size == 0:
                return body, buf

    @staticmethod
    def _response(status: str, body: bytes, extra: str = "") -> bytes:
        return (f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n{extra}\r\n").encode() + body

    def _answer(self, conn: socket.socket, req: Request) -> bool:
        """Answers one request; False when the connection must not be reused."""
        parts = req.path.strip("/").split("/")
        kind, rest = parts[0], "/".join(parts[1:])
        if kind == "ok":
            conn.sendall(self._response("200 OK", b'{"ok": true}', "content-type: application/json\r\n"))
        elif kind == "fail500":
            conn.sendall(self._response("500 Internal Server Error", b'{"error": "boom"}'))
        elif kind == "slow":
            time.sleep(SLOW_DELAY)
            conn.sendall(self._response("200 OK", b'{"slow": true}'))
        elif kind == "nul":
            conn.sendall(self._response("200 OK", NUL_BODY, "content-type: application/json\r\n"))
        elif kind == "badutf8":
            conn.sendall(self._response("200 OK", BAD_UTF8_BODY, "content-type: text/plain; charset=utf-8\r\n"))
        elif kind == "badheader":
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-weird: caf\xe9 \xff\xfe\r\n"
                         b"x-fine: yes\r\n\r\n{}")
        elif kind == "huge":
            self._huge(conn)
            return False
        elif kind == "redirect-private":
            if parts[1:2] == ["metadata"]:
                location = "http://169.254.169.254/latest/meta-data/"
            else:
                location = f"http://127.0.0.1:{self.port}/ok/{rest}"
            conn.sendall(self._response("302 Found", b"", f"location: {location}\r\n"))
        elif kind == "silent":
            # Hold the connection open, answering nothing, until the client gives up or the
            # server closes.
            while not self.closed.is_set():
                try:
                    conn.settimeout(0.5)
                    if conn.recv(65536) == b"":
                        return False
                except socket.timeout:
                    continue
            return False
        elif kind == "reset":
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\ncontent-type: application/json\r\n\r\n"
                         + RESET_PREFIX)
            time.sleep(0.5)  # the client has read the status line and headers by now
            self._rst(conn)
            return False
        elif kind == "reset-early":
            self._rst(conn)
            return False
        elif kind == "trickle":
            for byte in self._response("200 OK", b'{"slowly": true}'):
                if self.closed.wait(1.0):
                    return False
                conn.sendall(bytes([byte]))
        else:
            conn.sendall(self._response("404 Not Found", b"no such behaviour"))
        return True

    def _huge(self, conn: socket.socket):
        sent = 0
        conn.sendall(f"HTTP/1.1 200 OK\r\ncontent-length: {HUGE_BYTES}\r\n"
                     "content-type: application/octet-stream\r\n\r\n".encode())
        block = (b"0123456789abcdef" * 4096)  # 64 kB
        try:
            while sent < HUGE_BYTES:
                n = min(len(block), HUGE_BYTES - sent)
                conn.sendall(block[:n])
                sent += n
        except OSError:
            pass
        finally:
            with self.lock:
                self.huge_sent.append(sent)

    @staticmethod
    def _rst(conn: socket.socket):
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


if __name__ == "__main__":
    s = HostileServer()
    print(s.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        s.close()
