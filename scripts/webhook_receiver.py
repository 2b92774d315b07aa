"""A small webhook receiver for the demo: verifies Standard Webhooks signatures and prints
each delivery. Run: python3 scripts/webhook_receiver.py PORT SECRET"""
import base64
import hashlib
import hmac
import http.server
import json
import sys
import time


def verify(secret: str, headers, body: bytes, tolerance_s: int = 300) -> bool:
    """How a receiver checks a queue_ext webhook (Standard Webhooks, v1 HMAC-SHA256)."""
    msg_id = headers["webhook-id"]
    timestamp = headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False  # too old or from the future: a replay
    key = base64.b64decode(secret[len("whsec_"):]) if secret.startswith("whsec_") else secret.encode()
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(f"v1,{expected}", s) for s in headers["webhook-signature"].split())


class Receiver(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    secret = ""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        ok = verify(self.secret, self.headers, body)
        event = json.loads(body)
        shown = f"{event['type']} for {event['job_id'][:13]}..." if "type" in event else json.dumps(event)
        print(f"  receiver: POST {self.path:<14} signature={'valid' if ok else 'INVALID'}  {shown}\n", end="", flush=True)
        reply = b'{"received": true}'
        self.send_response(200 if ok else 401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    Receiver.secret = sys.argv[2]
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()
