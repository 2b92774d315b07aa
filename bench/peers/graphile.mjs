// graphile-worker's side of the benchmark (bench/bench.py runs it), through its public API only:
//   node graphile.mjs migrate CONN
//   node graphile.mjs drain   CONN CONCURRENCY EXPECTED BATCH
//       run() with CONCURRENCY over a queue bench.py pre-filled with EXPECTED no-op jobs;
//       BATCH > 1 turns on its batched claim (preset worker.localQueue.size = BATCH, with
//       completeJobBatchDelay 0: completions batched too). Timed from the first task start
//       until the jobs table is empty (every completion committed).
//   node graphile.mjs latency CONN N
//       an idle run() (concurrency 1, LISTEN); prints {"ready": true}, then bench.py enqueues N
//       jobs one at a time with payload {"t0": <epoch seconds>}; enqueue -> task start.
// Prints one JSON line (the last). Every job id is counted, to catch a job run twice.
import { run, runMigrations, Logger } from "graphile-worker";
import pg from "pg";

const [mode, connectionString, ...args] = process.argv.slice(2);
const logger = new Logger(() => () => {});
const now = () => (performance.timeOrigin + performance.now()) / 1000; // epoch seconds, sub-ms

async function jobsLeft() {
  const client = new pg.Client({ connectionString });
  await client.connect();
  try {
    return (await client.query("SELECT count(*)::int AS n FROM graphile_worker._private_jobs")).rows[0].n;
  } finally {
    await client.end();
  }
}

async function untilEmpty(timeoutMs) {
  const client = new pg.Client({ connectionString });
  await client.connect();
  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      const n = (await client.query("SELECT count(*)::int AS n FROM graphile_worker._private_jobs")).rows[0].n;
      if (n === 0 || Date.now() > deadline) return n;
      await new Promise((r) => setTimeout(r, 2));
    }
  } finally {
    await client.end();
  }
}

async function drain(concurrency, expected, batch) {
  const seen = new Set();
  let twice = 0;
  let t0 = null;
  let finish;
  const finished = new Promise((r) => (finish = r));
  const preset = {
    worker: batch > 1 ? { localQueue: { size: batch }, completeJobBatchDelay: 0 } : {},
  };
  const runner = await run({
    connectionString, concurrency, noHandleSignals: true, pollInterval: 1000, logger, preset,
    taskList: {
      noop: async (_payload, helpers) => {
        if (t0 === null) t0 = now();
        if (seen.has(helpers.job.id)) twice++;
        seen.add(helpers.job.id);
        if (seen.size === expected) finish();
      },
    },
  });
  const timeout = setTimeout(() => finish(), 600_000);
  await finished;
  clearTimeout(timeout);
  const left = await untilEmpty(60_000); // the last completions are committed
  const elapsed = now() - t0;
  await runner.stop();
  return { per_s: seen.size / elapsed, processed: seen.size, twice, left: left || (await jobsLeft()) };
}

async function latency(n) {
  const lat = [];
  const seen = new Set();
  let twice = 0;
  let finish;
  const finished = new Promise((r) => (finish = r));
  const runner = await run({
    connectionString, concurrency: 1, noHandleSignals: true, pollInterval: 2000, logger,
    taskList: {
      lat: async (payload, helpers) => {
        lat.push(now() - payload.t0);
        if (seen.has(helpers.job.id)) twice++;
        seen.add(helpers.job.id);
        if (seen.size === n) finish();
      },
    },
  });
  await new Promise((r) => setTimeout(r, 300)); // idle, listening
  console.log(JSON.stringify({ ready: true }));
  const timeout = setTimeout(() => finish(), 300_000);
  await finished;
  clearTimeout(timeout);
  await runner.stop();
  const left = await jobsLeft();
  return { latencies_s: lat, processed: seen.size, twice, left };
}

let out;
if (mode === "migrate") {
  await runMigrations({ connectionString, logger });
  out = { ok: true };
} else if (mode === "drain") {
  out = await drain(Number(args[0]), Number(args[1]), Number(args[2] ?? 1));
} else if (mode === "latency") {
  out = await latency(Number(args[0]));
} else {
  throw new Error(`unknown mode ${mode}`);
}
console.log(JSON.stringify(out));
process.exit(0);
