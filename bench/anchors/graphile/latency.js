#!/usr/bin/env node
"use strict";
// Anchor latency benchmark for graphile-worker.
//
// A worker (run(), concurrency 1, LISTEN/NOTIFY as graphile-worker does by
// default) runs in this process. One job at a time we call WorkerUtils.addJob()
// and measure from just before that call to the moment the task function
// starts (process.hrtime.bigint()). We wait for each job to start (and for
// addJob to resolve) before idling --idle-ms and adding the next one.
//
// stdout: exactly one JSON line. Everything else goes to stderr.

process.env.NO_LOG_SUCCESS = "1";

const { EventEmitter } = require("events");
const { run, runMigrations, makeWorkerUtils } = require("graphile-worker");
const {
  log,
  fail,
  parseArgs,
  assertLocalConnection,
  makeQuietLogger,
  graphileWorkerVersion,
  dropWorkerSchema,
  sleep,
} = require("./common");

const USAGE = `usage: node latency.js --connection postgres://postgres@127.0.0.1:5432/DBNAME
         [--samples 200]
         [--warmup 20]           un-recorded jobs before measuring (default: 20)
         [--idle-ms 20]          idle time between jobs (default: 20)
         [--poll-interval MS]    worker poll interval (default: 100)
         [--timeout-seconds S]   give up (exit 1) after S seconds (default: 280)`;

const args = parseArgs(
  process.argv.slice(2),
  {
    connection: { type: "string", required: true },
    samples: { type: "int", default: 200 },
    warmup: { type: "int", default: 20 },
    "idle-ms": { type: "int", default: 20 },
    "poll-interval": { type: "int", default: 100 },
    "timeout-seconds": { type: "int", default: 280 },
  },
  USAGE,
);

/** Nearest-rank percentile of an ascending-sorted array. */
function percentile(sorted, p) {
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[Math.min(rank, sorted.length) - 1];
}

const round3 = (x) => Number(x.toFixed(3));

async function main() {
  const connectionString = args.connection;
  assertLocalConnection(connectionString);
  const samples = args.samples;
  if (samples < 1) fail("--samples must be >= 1");
  const logger = makeQuietLogger();
  const version = graphileWorkerVersion();
  const deadline = Date.now() + args["timeout-seconds"] * 1000;

  log(`graphile-worker ${version}; resetting schema graphile_worker`);
  await dropWorkerSchema(connectionString);
  await runMigrations({ connectionString, logger });

  // Task start times, keyed by job payload id.
  const waiters = new Map();
  const taskList = {
    latency: async (payload) => {
      const now = process.hrtime.bigint();
      const w = waiters.get(payload.id);
      if (w) w.resolve(now);
    },
  };

  const events = new EventEmitter();
  events.on("job:error", ({ error }) => log(`job error: ${error && error.message}`));

  const runner = await run({
    connectionString,
    concurrency: 1,
    pollInterval: args["poll-interval"],
    noHandleSignals: true,
    logger,
    events,
    taskList,
    parsedCronItems: [],
  });
  const utils = await makeWorkerUtils({ connectionString, logger });

  // Wait for the worker's LISTEN connection to be established, so that the
  // first jobs are not picked up by the initial poll instead.
  await sleep(500);

  const measureOne = async (id) => {
    let resolve;
    const started = new Promise((r) => (resolve = r));
    waiters.set(id, { resolve });
    const t0 = process.hrtime.bigint();
    const addPromise = utils.addJob("latency", { id });
    const remaining = deadline - Date.now();
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`job ${id} did not start in time`)), Math.max(remaining, 1));
    });
    try {
      const [tStart] = await Promise.race([Promise.all([started, addPromise]), timeout]);
      return Number(tStart - t0) / 1e6;
    } finally {
      clearTimeout(timer);
      waiters.delete(id);
    }
  };

  let latencies = [];
  try {
    for (let i = 0; i < args.warmup; i++) {
      await measureOne(-1 - i);
      await sleep(args["idle-ms"]);
    }
    log(`warm-up of ${args.warmup} jobs done; measuring ${samples} samples`);
    for (let i = 0; i < samples; i++) {
      latencies.push(await measureOne(i));
      await sleep(args["idle-ms"]);
    }
  } finally {
    await runner.stop();
    await utils.release();
  }

  const sorted = [...latencies].sort((a, b) => a - b);
  const mean = sorted.reduce((s, x) => s + x, 0) / sorted.length;
  const result = {
    samples: sorted.length,
    p50_ms: round3(percentile(sorted, 50)),
    p99_ms: round3(percentile(sorted, 99)),
    min_ms: round3(sorted[0]),
    max_ms: round3(sorted[sorted.length - 1]),
  };
  log(
    `add_job -> task start over ${sorted.length} samples: mean ${mean.toFixed(3)} ms, ` +
      `p90 ${percentile(sorted, 90).toFixed(3)} ms (pollInterval ${args["poll-interval"]} ms, ` +
      `idle ${args["idle-ms"]} ms, concurrency 1)`,
  );
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().then(
  () => process.exit(0),
  (e) => {
    log(`ERROR: ${e && e.stack ? e.stack : e}`);
    process.exit(1);
  },
);
