// graphile-worker side of the peers benchmark (bench/peers.py), through its public API:
//   node graphile.mjs migrate  CONN
//   node graphile.mjs drain    CONN CONCURRENCY EXPECTED BATCH   (BATCH > 1: localQueue of that size)
//   node graphile.mjs latency  CONN N
// Prints one JSON line. Tasks are no-ops; every job id is counted, to catch double runs.
import { run, runMigrations, Logger } from "graphile-worker";
import pg from "pg";

const [mode, connectionString, ...args] = process.argv.slice(2);
const logger = new Logger(() => () => {});

async function drain(concurrency, expected, batch) {
  const seen = new Set();
  let twice = 0;
  let finish;
  const finished = new Promise((r) => (finish = r));
  const preset = {
    worker: batch > 1 ? { localQueue: { size: batch }, completeJobBatchDelay: 0 } : {},
  };
  const t0 = performance.now();
  const runner = await run({
    connectionString, concurrency, noHandleSignals: true, pollInterval: 1000, logger, preset,
    taskList: {
      noop: async (_payload, helpers) => {
        if (seen.has(helpers.job.id)) twice++;
        seen.add(helpers.job.id);
        if (seen.size === expected) finish();
      },
    },
  });
  await finished;
  const elapsed = (performance.now() - t0) / 1000;
  await runner.stop();
  const client = new pg.Client({ connectionString });
  await client.connect();
  const left = (await client.query("SELECT count(*)::int AS n FROM graphile_worker._private_jobs")).rows[0].n;
  await client.end();
  return { per_s: expected / elapsed, processed: seen.size, twice, left };
}

async function latency(n) {
  const lat = [];
  let finish;
  const finished = new Promise((r) => (finish = r));
  const runner = await run({
    connectionString, concurrency: 1, noHandleSignals: true, pollInterval: 1000, logger,
    taskList: {
      lat: async (payload) => {
        lat.push(Date.now() / 1000 - payload.t0);
        if (lat.length === n) finish();
      },
    },
  });
  const client = new pg.Client({ connectionString });
  await client.connect();
  await new Promise((r) => setTimeout(r, 500)); // the worker is idle, listening
  for (let i = 0; i < n; i++) {
    await client.query("SELECT graphile_worker.add_job('lat', json_build_object('t0', $1::float8))", [Date.now() / 1000]);
    await new Promise((r) => setTimeout(r, 3));
  }
  await finished;
  await runner.stop();
  await client.end();
  lat.sort((a, b) => a - b);
  const pick = (q) => lat[Math.min(lat.length - 1, Math.floor(q * lat.length))] * 1000;
  return { p50_ms: pick(0.5), p95_ms: pick(0.95), p99_ms: pick(0.99), n: lat.length };
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
