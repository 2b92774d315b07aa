"""A minimal, fast HTTP/1.1 sink for the webhook benchmark: answers 200 at once, keeps
connections alive, and records when each webhook-id arrived. GET /__stats returns them."""
import asyncio
import json
import sys
import time

arrivals: dict[str, list] = {}  # webhook-id -> [arrival times], enqueue time in the body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            now = time.time()
            lines = head.split(b"\r\n")
            method, path = lines[0].split(b" ")[:2]
            headers = {}
            for line in lines[1:]:
                if b":" in line:
                    k, v = line.split(b":", 1)
                    headers[k.strip().lower()] = v.strip()
            body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
            if path.startswith(b"/slow"):
                await asyncio.sleep(5)  # a slow endpoint: 5 s per request, without blocking the others
            if path == b"/__stats":
                out = json.dumps(arrivals).encode()
            else:
                msg = headers.get(b"webhook-id", b"").decode()
                try:
                    sent = json.loads(body).get("t0")
                except ValueError:
                    sent = None
                arrivals.setdefault(msg, []).append((now, sent))
                out = b'{"ok":true}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                         + str(len(out)).encode() + b"\r\n\r\n" + out)
            if path == b"/__reset":
                arrivals.clear()
    except (asyncio.IncompleteReadError, ConnectionResetError):
        pass
    finally:
        writer.close()


async def main(port: int):
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
