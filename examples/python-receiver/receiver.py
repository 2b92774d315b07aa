"""A webhook endpoint for queue_ext's dispatcher. Every delivery is signed per Standard
Webhooks (webhook-id, webhook-timestamp, webhook-signature); the standard's own library
checks the signature and the timestamp (a replay older than 5 minutes fails).

    WEBHOOK_SECRET=whsec_... PORT=8000 python3 receiver.py

Answers 204 when the signature verifies, 400 when the webhook headers are missing, 401 when
they do not verify. Prints one JSON line per accepted delivery."""
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError

webhook = Webhook(os.environ["WEBHOOK_SECRET"])
# Delivery is at-least-once: a retry carries the same webhook-id, so handle each id once.
# (In production keep this in your database, not in memory.)
seen: set[str] = set()
lock = threading.Lock()  # handlers run on threads: one line at a time on stdout


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if not all(self.headers.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature")):
            return self.reply(400, b"missing webhook headers\n")
        try:
            payload = webhook.verify(body, dict(self.headers))
        except (WebhookVerificationError, ValueError) as err:  # ValueError: malformed base64/UTF-8
            return self.reply(401, f"{err}\n".encode())
        msg_id = self.headers["webhook-id"]
        with lock:
            if msg_id not in seen:
                seen.add(msg_id)
                print(json.dumps({"webhook_id": msg_id, "path": self.path, "payload": payload,
                                  "authorization": self.headers.get("authorization")}), flush=True)
        self.reply(204, b"")

    def reply(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(json.dumps({"listening": server.server_address[1]}), flush=True)
    server.serve_forever()
