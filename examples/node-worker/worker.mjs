// A queue_ext worker in Node (pg).
//
//   DATABASE_URL=postgresql://app@localhost/app QUEUE=emails CONCURRENCY=4 node worker.mjs
//
// CONCURRENCY loops each hold a connection and run one job at a time. Idle loops sleep until
// `NOTIFY queue_ext_jobs, '<queue>'` (sent after an enqueue commits) or POLL_SECONDS pass:
// the poll catches retries whose backoff has ended, which nobody announces. A long job's
// lease is extended by a heartbeat every HEARTBEAT_SECONDS. A job that throws is failed with
// fail_job (queue_ext retries it after backoff, up to the queue's max_attempts).
//
// SIGTERM or SIGINT: claim nothing more, give running jobs SHUTDOWN_GRACE seconds to finish,
// then abort them and fail them with retry_in => 0 so another worker takes them at once. No
// job is left `running` behind the process. Prints one JSON line per finished attempt.
import os from "node:os";
import { setTimeout as sleep } from "node:timers/promises";
import pg from "pg";

const env = process.env;
const DSN = env.DATABASE_URL ?? "postgresql:///postgres";
const QUEUE = env.QUEUE ?? "default";
const CONCURRENCY = Number(env.CONCURRENCY ?? 4);
const POLL_MS = Number(env.POLL_SECONDS ?? 5) * 1000;
const HEARTBEAT_MS = Number(env.HEARTBEAT_SECONDS ?? 30) * 1000;
const GRACE_MS = Number(env.SHUTDOWN_GRACE ?? 10) * 1000;
const WORKER_ID = env.WORKER_ID ?? `node-${os.hostname()}-${process.pid}`;

let stopping = false;
const abandon = new AbortController(); // aborted when the grace period is over
const log = (fields) => console.log(JSON.stringify(fields));

// The work itself: replace with yours. This one waits payload.ms milliseconds and fails its
// first payload.fail_attempts attempts. Long work should honour `signal`.
async function handle(job, signal) {
  await sleep(job.payload.ms ?? 0, undefined, { signal });
  if (job.attempt <= (job.payload.fail_attempts ?? 0)) {
    throw new Error(`simulated failure on attempt ${job.attempt}`);
  }
  return { worker: WORKER_ID };
}

// Resolves on the next NOTIFY for our queue, after POLL_MS, or at shutdown.
const waiters = new Set();
function nextWake() {
  return new Promise((resolve) => {
    const done = () => { clearTimeout(timer); waiters.delete(done); resolve(); };
    const timer = setTimeout(done, POLL_MS);
    waiters.add(done);
  });
}
function wake() { for (const done of [...waiters]) done(); }

async function run(client, job) {
  const beat = setInterval(() => {
    client.query("SELECT queue_ext.heartbeat($1, $2)", [job.job_id, job.lease_token])
      .catch((err) => log({ event: "heartbeat_failed", job_id: job.job_id, error: err.message }));
  }, HEARTBEAT_MS);
  let result;
  try {
    result = await handle(job, abandon.signal);
  } catch (err) {
    clearInterval(beat);
    const retryIn = abandon.signal.aborted ? "0" : null;
    const error = abandon.signal.aborted ? "worker shut down before the job finished" : err.message;
    const { rows } = await client.query(
      "SELECT queue_ext.fail_job($1, $2, lease_token => $3, retry_in => $4) AS state",
      [job.job_id, error, job.lease_token, retryIn]);
    log({ event: "failed", job_id: job.job_id, attempt: job.attempt, state: rows[0].state, error });
    return;
  }
  clearInterval(beat);
  await client.query("SELECT queue_ext.complete_job($1, $2, lease_token => $3)",
                     [job.job_id, result, job.lease_token]);
  log({ event: "completed", job_id: job.job_id, attempt: job.attempt });
}

async function slot() {
  const client = new pg.Client({ connectionString: DSN });
  await client.connect();
  try {
    while (!stopping) {
      const woken = nextWake(); // armed before the claim, so a NOTIFY during it is not missed
      const { rows } = await client.query(
        "SELECT job_id, payload, attempt, lease_token FROM queue_ext.get_next_job($1, $2)", [QUEUE, WORKER_ID]);
      if (rows.length === 0) {
        await woken;
        continue;
      }
      try {
        await run(client, rows[0]);
      } catch (err) { // e.g. 55000 when the lease expired mid-job
        log({ event: "report_failed", job_id: rows[0].job_id, error: err.message });
      }
    }
  } finally {
    await client.end();
  }
}

const listener = new pg.Client({ connectionString: DSN });
await listener.connect();
listener.on("notification", (msg) => { if (msg.payload === QUEUE) wake(); });
await listener.query("LISTEN queue_ext_jobs");

const slots = Array.from({ length: CONCURRENCY }, () => slot());
log({ event: "started", worker: WORKER_ID, queue: QUEUE, concurrency: CONCURRENCY });

const shutdown = () => {
  if (stopping) return;
  stopping = true;
  wake();
  setTimeout(() => abandon.abort(), GRACE_MS).unref();
};
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);

await Promise.all(slots);
await listener.end();
log({ event: "stopped", worker: WORKER_ID });
