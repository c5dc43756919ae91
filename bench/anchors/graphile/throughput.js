#!/usr/bin/env node
"use strict";
// Anchor throughput benchmark for graphile-worker.
//
// 1. drop schema graphile_worker cascade, let graphile-worker migrate it again
// 2. enqueue --jobs `noop` jobs with ONE call to graphile_worker.add_jobs()
//    (job specs generated server-side; no worker running yet)
// 3. start a worker (run()) with --concurrency and time from just before
//    run() is called until every job has completed and the jobs table is empty
//
// stdout: exactly one JSON line. Everything else goes to stderr.

// graphile-worker 0.16.x formats and logs an INFO line for every completed job
// unless this is set; per-job logging would dominate a no-op benchmark.
process.env.NO_LOG_SUCCESS = "1";

const { EventEmitter } = require("events");
const { Client } = require("pg");
const { run, runMigrations } = require("graphile-worker");
const {
  log,
  fail,
  parseArgs,
  assertLocalConnection,
  makeQuietLogger,
  graphileWorkerVersion,
  supportsBatchedFetchComplete,
  dropWorkerSchema,
  sleep,
  elapsedMs,
} = require("./common");

const USAGE = `usage: node throughput.js --connection postgres://postgres@127.0.0.1:5432/DBNAME
         [--jobs 50000] [--concurrency 24] [--batch]
         [--pool-size N]        pg pool size for the worker (default: concurrency + 1)
         [--poll-interval MS]   worker poll interval (default: 10)
         [--no-prepared]        disable prepared statements (default: prepared)
         [--use-node-time]      pass Node's clock to get_job instead of now() (useNodeTime)
         [--no-analyze]         skip ANALYZE of the jobs table after enqueueing
         [--timeout-seconds S]  give up (exit 1) after S seconds of processing (default: 280)`;

const args = parseArgs(
  process.argv.slice(2),
  {
    connection: { type: "string", required: true },
    jobs: { type: "int", default: 50000 },
    concurrency: { type: "int", default: 24 },
    batch: { type: "bool", default: false },
    "pool-size": { type: "int", default: undefined },
    "poll-interval": { type: "int", default: 10 },
    "no-prepared": { type: "bool", default: false },
    "use-node-time": { type: "bool", default: false },
    "no-analyze": { type: "bool", default: false },
    "timeout-seconds": { type: "int", default: 280 },
  },
  USAGE,
);

async function main() {
  const connectionString = args.connection;
  assertLocalConnection(connectionString);
  const jobs = args.jobs;
  const concurrency = args.concurrency;
  if (jobs < 1) fail("--jobs must be >= 1");
  if (concurrency < 1) fail("--concurrency must be >= 1");
  const poolSize = args["pool-size"] ?? concurrency + 1;
  const pollInterval = args["poll-interval"];
  const version = graphileWorkerVersion();
  const logger = makeQuietLogger();

  // --- batching (localQueue / completeJobBatchDelay) -------------------------
  let batchPreset = undefined;
  let batchDesc = "per-job get/complete";
  if (args.batch) {
    if (supportsBatchedFetchComplete()) {
      batchPreset = {
        worker: {
          localQueue: { size: 500 },
          completeJobBatchDelay: 0,
          failJobBatchDelay: 0,
        },
      };
      batchDesc = "localQueue=500,completeJobBatchDelay=0,failJobBatchDelay=0";
    } else {
      log(
        `WARNING: --batch requested but graphile-worker ${version} has no batched ` +
          `job fetching/completion (no localQueue / completeJobBatchDelay; those ` +
          `arrived in 0.17). Running the per-job get/complete path instead.`,
      );
      batchDesc = "batch unsupported->per-job get/complete";
    }
  }

  // --- reset schema ----------------------------------------------------------
  log(`graphile-worker ${version}; resetting schema graphile_worker`);
  await dropWorkerSchema(connectionString);
  await runMigrations({ connectionString, logger });

  // --- enqueue ---------------------------------------------------------------
  const admin = new Client({ connectionString });
  await admin.connect();
  let enqueueMs;
  try {
    const t = process.hrtime.bigint();
    const {
      rows: [row],
    } = await admin.query(
      `select count(*)::int as n
         from graphile_worker.add_jobs(
           (select array_agg(
                     row('noop', json_build_object('id', i), null, null, null, null, null, null)
                       ::graphile_worker.job_spec)
              from generate_series(1, $1::int) as i)
         )`,
      [jobs],
    );
    enqueueMs = elapsedMs(t);
    if (row.n !== jobs) fail(`add_jobs inserted ${row.n} jobs, expected ${jobs}`);
    log(
      `enqueued ${jobs} jobs in ${enqueueMs.toFixed(1)} ms ` +
        `(${Math.round(jobs / (enqueueMs / 1000))} jobs/s, single add_jobs call)`,
    );
    if (!args["no-analyze"]) {
      await admin.query("analyze graphile_worker._private_jobs");
    }
  } catch (e) {
    await admin.end().catch(() => {});
    throw e;
  }

  // --- run the worker --------------------------------------------------------
  const events = new EventEmitter();
  let completed = 0;
  let errored = 0;
  let allCompleted;
  const allCompletedPromise = new Promise((resolve) => (allCompleted = resolve));
  events.on("job:complete", ({ error }) => {
    if (error) errored++;
    if (++completed >= jobs) allCompleted();
  });
  events.on("job:error", ({ error }) => {
    if (errored < 5) log(`job error: ${error && error.message}`);
  });

  const options = {
    connectionString,
    concurrency,
    maxPoolSize: poolSize,
    pollInterval,
    noHandleSignals: true,
    noPreparedStatements: args["no-prepared"],
    useNodeTime: args["use-node-time"],
    logger,
    events,
    taskList: { noop: async () => {} },
    parsedCronItems: [],
  };
  if (batchPreset) options.preset = batchPreset;

  const timeoutMs = args["timeout-seconds"] * 1000;
  const cpuBefore = process.cpuUsage();
  const start = process.hrtime.bigint();
  const runner = await run(options);
  const readyMs = elapsedMs(start);
  log(`worker started in ${readyMs.toFixed(1)} ms (concurrency ${concurrency}, pool ${poolSize})`);

  let timer;
  const timedOut = new Promise((resolve) => {
    timer = setTimeout(() => resolve("timeout"), timeoutMs);
  });
  // Progress report every 5 s (stderr).
  const progress = setInterval(() => {
    log(`... ${completed}/${jobs} completed after ${(elapsedMs(start) / 1000).toFixed(1)} s`);
  }, 5000);

  const outcome = await Promise.race([allCompletedPromise.then(() => "done"), timedOut]);
  let remaining = -1;
  if (outcome === "done") {
    // The job:complete event fires after complete_job() has returned, so the
    // table should already be empty; confirm it before stopping the clock.
    for (;;) {
      const { rows } = await admin.query(
        "select count(*)::int as n from graphile_worker._private_jobs",
      );
      remaining = rows[0].n;
      if (remaining === 0 || elapsedMs(start) > timeoutMs) break;
      await sleep(2);
    }
  }
  const seconds = elapsedMs(start) / 1000;
  const cpu = process.cpuUsage(cpuBefore);
  clearTimeout(timer);
  clearInterval(progress);

  await runner.stop();
  await admin.end();

  if (outcome !== "done" || remaining !== 0) {
    fail(
      `timed out after ${args["timeout-seconds"]} s: ${completed}/${jobs} completed, ` +
        `${remaining} rows remaining`,
    );
  }
  if (errored > 0) fail(`${errored} jobs failed`);

  const jobsPerSec = jobs / seconds;
  log(
    `processed ${jobs} jobs in ${seconds.toFixed(3)} s -> ${jobsPerSec.toFixed(0)} jobs/s ` +
      `(incl. ${readyMs.toFixed(0)} ms worker start-up); node CPU ` +
      `${((cpu.user + cpu.system) / 1e6).toFixed(2)} s = ` +
      `${((cpu.user + cpu.system) / 1e4 / seconds).toFixed(0)}% of one core`,
  );
  const config = [
    `graphile-worker ${version}`,
    `run() 1 process`,
    `concurrency=${concurrency}`,
    `maxPoolSize=${poolSize}`,
    `pollInterval=${pollInterval}ms`,
    args["no-prepared"] ? "preparedStatements=off" : "preparedStatements=on",
    ...(args["use-node-time"] ? ["useNodeTime"] : []),
    batchDesc,
    "LISTEN/NOTIFY",
    "NO_LOG_SUCCESS",
    args["no-analyze"] ? "enqueue=1x add_jobs" : "enqueue=1x add_jobs+analyze",
  ].join("; ");
  process.stdout.write(
    JSON.stringify({
      jobs,
      seconds: Number(seconds.toFixed(4)),
      jobs_per_sec: Number(jobsPerSec.toFixed(1)),
      concurrency,
      config,
    }) + "\n",
  );
}

main().then(
  () => process.exit(0),
  (e) => {
    log(`ERROR: ${e && e.stack ? e.stack : e}`);
    process.exit(1);
  },
);
