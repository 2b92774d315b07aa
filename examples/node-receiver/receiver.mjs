// A webhook endpoint for queue_ext's dispatcher. Every delivery is signed per Standard
// Webhooks (webhook-id, webhook-timestamp, webhook-signature); the standard's own library
// checks the signature and the timestamp (a replay older than 5 minutes fails).
//
//   WEBHOOK_SECRET=whsec_... PORT=8000 node receiver.mjs
//
// Answers 204 when the signature verifies, 400 when the webhook headers are missing,
// 401 when they do not verify. Prints one JSON line per accepted delivery.
import http from "node:http";
import { Webhook, WebhookVerificationError } from "standardwebhooks";

const webhook = new Webhook(process.env.WEBHOOK_SECRET);
// Delivery is at-least-once: a retry carries the same webhook-id, so handle each id once.
// (In production keep this in your database, not in memory.)
const seen = new Set();

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const body = Buffer.concat(chunks).toString("utf8");
    if (!req.headers["webhook-id"] || !req.headers["webhook-signature"] || !req.headers["webhook-timestamp"]) {
      res.writeHead(400).end("missing webhook headers\n");
      return;
    }
    let payload;
    try {
      payload = webhook.verify(body, req.headers);
    } catch (err) {
      // Malformed headers can raise other errors than WebhookVerificationError: all are a 401.
      res.writeHead(401).end(`${err instanceof WebhookVerificationError ? err.message : "invalid signature"}\n`);
      return;
    }
    const id = req.headers["webhook-id"];
    if (!seen.has(id)) {
      seen.add(id);
      console.log(JSON.stringify({ webhook_id: id, path: req.url, payload,
                                   authorization: req.headers.authorization ?? null }));
    }
    res.writeHead(204).end();
  });
});

server.listen(Number(process.env.PORT ?? 8000), process.env.HOST ?? "127.0.0.1", () => {
  console.log(JSON.stringify({ listening: server.address().port }));
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
