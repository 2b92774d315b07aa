"""A real HTTP server on 127.0.0.1 for the webhook tests: records every request and answers
as each path is told to (status, headers, delay), in order, then 200."""
import http.server
import json
import ssl
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field


@dataclass
class Request:
    at: float
    method: str
    path: str
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    body: bytes = b'{"ok": true}'


class Sink:
    def __init__(self, tls_context: ssl.SSLContext | None = None):
        self.requests: list[Request] = []
        self.scripts: dict[str, deque] = defaultdict(deque)
        self.defaults: dict[str, Reply] = {}
        # Requests being answered per path now, and the most there were at once.
        self.active: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_any(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0) or 0))
                with sink.lock:
                    sink.requests.append(Request(time.time(), self.command, self.path,
                                                 {k.lower(): v for k, v in self.headers.items()}, body))
                    script = sink.scripts[self.path]
                    reply = script.popleft() if script else sink.defaults.get(self.path, Reply())
                    sink.active[self.path] += 1
                    sink.peak[self.path] = max(sink.peak[self.path], sink.active[self.path])
                if reply.delay:
                    time.sleep(reply.delay)
                # Answered from here on: the client may send its next request as soon as it
                # reads the reply, before this thread could count this one as done.
                with sink.lock:
                    sink.active[self.path] -= 1
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 512

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        scheme = "https" if tls_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def script(self, path: str, *replies: Reply):
        with self.lock:
            self.scripts[path].extend(replies)

    def default(self, path: str, reply: Reply):
        self.defaults[path] = reply

    def to(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
