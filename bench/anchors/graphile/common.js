"use strict";
// Shared helpers for the graphile-worker anchor benchmarks.
// Everything here writes diagnostics to stderr only; stdout is reserved for
// the single JSON result line printed by each script.

const fs = require("fs");
const path = require("path");
const { Client } = require("pg");
const { Logger } = require("graphile-worker");

function log(...args) {
  process.stderr.write(`[anchor] ${args.join(" ")}\n`);
}

function fail(message) {
  log(`ERROR: ${message}`);
  process.exit(1);
}

/**
 * Minimal `--name value` / `--flag` parser. `spec` maps option name to
 * { type: "string" | "int" | "bool", default }.
 */
function parseArgs(argv, spec, usage) {
  const out = {};
  for (const [name, s] of Object.entries(spec)) out[name] = s.default;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--help" || arg === "-h") {
      process.stderr.write(usage + "\n");
      process.exit(0);
    }
    if (!arg.startsWith("--")) fail(`unexpected argument '${arg}'\n${usage}`);
    let name = arg.slice(2);
    let value;
    const eq = name.indexOf("=");
    if (eq >= 0) {
      value = name.slice(eq + 1);
      name = name.slice(0, eq);
    }
    const s = spec[name];
    if (!s) fail(`unknown option '--${name}'\n${usage}`);
    if (s.type === "bool") {
      out[name] = value === undefined ? true : !/^(0|false|no)$/i.test(value);
      continue;
    }
    if (value === undefined) {
      value = argv[++i];
      if (value === undefined) fail(`option '--${name}' needs a value`);
    }
    if (s.type === "int") {
      const n = Number(value);
      if (!Number.isInteger(n) || n < 0) fail(`option '--${name}' must be a non-negative integer`);
      out[name] = n;
    } else {
      out[name] = value;
    }
  }
  for (const [name, s] of Object.entries(spec)) {
    if (s.required && (out[name] === undefined || out[name] === "")) {
      fail(`missing required option '--${name}'\n${usage}`);
    }
  }
  return out;
}

/** Only talk to the local database. */
function assertLocalConnection(connectionString) {
  let url;
  try {
    url = new URL(connectionString);
  } catch (e) {
    fail(`--connection is not a URL: ${e.message}`);
  }
  const host = url.hostname;
  if (!["127.0.0.1", "localhost", "::1", "[::1]", ""].includes(host)) {
    fail(`refusing to connect to non-local host '${host}'`);
  }
}

/** A graphile-worker Logger that drops info/debug and sends the rest to stderr. */
function makeQuietLogger() {
  return new Logger((scope) => (level, message) => {
    if (level === "error" || level === "warning") {
      const label = scope && scope.label ? `${scope.label}: ` : "";
      process.stderr.write(`[graphile-worker ${level}] ${label}${message}\n`);
    }
  });
}

/** Version of the graphile-worker actually installed in node_modules. */
function graphileWorkerVersion() {
  const pkgPath = path.join(
    path.dirname(require.resolve("graphile-worker")),
    "..",
    "package.json",
  );
  return JSON.parse(fs.readFileSync(pkgPath, "utf8")).version;
}

/**
 * Does the installed graphile-worker know about the batched fetch/complete
 * options (`localQueue`, `completeJobBatchDelay`, `failJobBatchDelay`)?
 * They first appeared in 0.17; 0.16.6 does not have them. We look at the
 * shipped type declarations rather than trusting a version number.
 */
function supportsBatchedFetchComplete() {
  const dist = path.dirname(require.resolve("graphile-worker"));
  let text = "";
  for (const f of ["index.d.ts", "interfaces.d.ts"]) {
    try {
      text += fs.readFileSync(path.join(dist, f), "utf8");
    } catch (_) {
      /* ignore */
    }
  }
  return /\blocalQueue\b/.test(text) && /\bcompleteJobBatchDelay\b/.test(text);
}

/** drop schema graphile_worker cascade (graphile-worker re-creates it on migrate). */
async function dropWorkerSchema(connectionString) {
  const client = new Client({ connectionString });
  await client.connect();
  try {
    // Silence "drop cascades to ..." notices.
    await client.query("set client_min_messages = warning");
    await client.query("drop schema if exists graphile_worker cascade");
  } finally {
    await client.end();
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function elapsedMs(startNs) {
  return Number(process.hrtime.bigint() - startNs) / 1e6;
}

module.exports = {
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
};
