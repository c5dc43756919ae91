// Drives the web console in headless Chromium against a running rdev-api (RDEV_URL, RDEV_API_KEY):
// sign in, run a command and watch its output arrive live, drop the network under the event
// stream and check that no line is lost or repeated, cancel another command, read /docs, and
// save a screenshot. The browser reaches the server through a TCP proxy this script controls,
// so "dropping the network" is real: every connection is reset and new ones are refused for a
// moment, or answered with 503 (after which EventSource gives up and the console reopens
// the stream itself).

import assert from 'node:assert/strict';
import { mkdir } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { chromium } from 'playwright-core';

const SERVER = process.env.RDEV_URL ?? 'http://127.0.0.1:8080';
const KEY = process.env.RDEV_API_KEY;
const SCREENSHOTS = process.env.SCREENSHOT_DIR ?? 'target/browser';
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
assert.ok(KEY, 'RDEV_API_KEY must be set');

async function api(method, route, body) {
  const response = await fetch(`${SERVER}/api/v1${route}`, {
    method,
    headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  assert.ok(response.ok, `${method} ${route}: ${response.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

/** A TCP proxy to the server that can reset every connection and refuse new ones for a while. */
async function startProxy(target) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  const requests = [];
  let refusing = false;
  let failing = false;
  const server = net.createServer((client) => {
    if (refusing) {
      client.resetAndDestroy();
      return;
    }
    if (failing) {
      client.end('HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
      return;
    }
    const upstream = net.connect(Number(port), hostname);
    sockets.add(client);
    sockets.add(upstream);
    client.on('data', (chunk) => {
      const head = chunk.toString('latin1').split('\r\n\r\n', 1)[0];
      if (/^(GET|POST|PUT|PATCH|DELETE) /.test(head)) requests.push(head);
    });
    client.pipe(upstream).pipe(client);
    const close = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('error', close).on('close', close);
    upstream.on('error', close).on('close', close);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    requests,
    /** Resets every open connection and refuses new ones for `ms`. */
    async drop(ms) {
      refusing = true;
      for (const socket of sockets) socket.resetAndDestroy();
      await new Promise((resolve) => setTimeout(resolve, ms));
      refusing = false;
    },
    /** Resets every open connection and answers 503 to new ones for `ms`. */
    async fail(ms) {
      failing = true;
      for (const socket of sockets) socket.resetAndDestroy();
      await new Promise((resolve) => setTimeout(resolve, ms));
      failing = false;
    },
    close: () => server.close(),
  };
}

async function main() {
  await mkdir(SCREENSHOTS, { recursive: true });
  const projectName = `browser-${Date.now().toString(36)}`;
  await api('POST', '/projects', { name: projectName, workdir: '/tmp', executor: 'local', max_concurrency: 4 });
  const proxy = await startProxy(SERVER);
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  const problems = [];
  page.on('console', (message) => {
    if (message.type() === 'error' && !/Failed to load resource|net::ERR_|EventSource/.test(message.text())) {
      problems.push(message.text());
    }
  });
  page.on('pageerror', (error) => problems.push(error.message));
  try {
    // Sign in.
    await page.goto(`${proxy.url}/`);
    await page.getByLabel('API key').fill('rdev_wrongkey_0123456789abcdefghijklmnopqrstuv');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByText('That key was not accepted.').waitFor();
    await page.getByLabel('API key').fill(KEY);
    await page.keyboard.press('Enter');
    await page.locator('#workspace').waitFor({ state: 'visible' });
    await page.getByLabel('Project', { exact: true }).selectOption({ label: `${projectName} (local)` });
    console.log('signed in');

    // Run a command that prints numbered lines over ~6 s, a coloured word, and stderr.
    const lines = 100;
    await page.getByLabel('Command', { exact: true }).fill(
      `for i in $(seq 1 ${lines}); do echo "line $i"; sleep 0.1; done; printf '\\033[31mred\\033[0m\\n'; echo oops >&2; exit 3`,
    );
    await page.getByLabel('Priority', { exact: true }).selectOption('high');
    await page.getByLabel('Command', { exact: true }).press('Control+Enter');
    const output = page.locator('#output');
    await output.getByText('line 3', { exact: false }).waitFor({ timeout: 15000 });
    assert.equal(await page.locator('#status').textContent(), 'running', 'output appears while the command runs');
    console.log('output is live');

    // Drop the network under the stream while output is still arriving.
    const eventsBefore = proxy.requests.filter((r) => r.includes('/events?')).length;
    await proxy.drop(1500);
    await page.locator('#connection[data-state="live"]').waitFor({ timeout: 15000 });
    const resumed = proxy.requests.filter((r) => r.includes('/events?')).slice(eventsBefore);
    assert.ok(
      resumed.some((r) => /last_event_id=[1-9]|\r\nlast-event-id: [1-9]/i.test(r)),
      `the console reconnected after the last output it showed: ${resumed.join(' | ')}`,
    );
    const how = resumed.some((r) => /\r\nlast-event-id: /i.test(r)) ? 'the browser, with Last-Event-ID' : 'the console, with a fresh token';
    console.log(`stream dropped and resumed by ${how}`);

    // Now the server "fails" for a moment: EventSource stops retrying on an error answer, and
    // the console must reopen the stream itself from the last line it showed.
    const shown = Number(await output.getAttribute('data-last-seq'));
    await page.waitForFunction((seq) => Number(document.getElementById('output').dataset.lastSeq) > seq, shown);
    const eventsBeforeFailure = proxy.requests.filter((r) => r.includes('/events?')).length;
    // Longer than the reconnect delay the server suggests (`retry: 2000`), so the browser's own
    // retry meets the 503.
    await proxy.fail(3500);
    await page.locator('#connection[data-state="live"], #connection[data-state="closed"]').waitFor({ timeout: 15000 });
    const reopened = proxy.requests.filter((r) => r.includes('/events?')).slice(eventsBeforeFailure);
    assert.ok(
      reopened.some((r) => /last_event_id=[1-9]/.test(r.split('\r\n', 1)[0])),
      `the console reopened the stream after the last output it showed: ${reopened.map((r) => r.split('\r\n', 1)[0]).join(' | ')}`,
    );
    console.log('stream failed and reopened by the console with a fresh token');

    await page.locator('#status.status-failed').waitFor({ timeout: 30000 });
    assert.equal(await page.locator('#exit-code').textContent(), '3');
    const text = await output.textContent();
    const numbered = text.split('\n').filter((line) => line.startsWith('line '));
    assert.deepEqual(
      numbered,
      Array.from({ length: lines }, (_, i) => `line ${i + 1}`),
      'every line exactly once, in order, across the drop',
    );
    assert.equal(await output.locator('.out-stderr').textContent(), 'oops\n');
    assert.equal(await output.locator('.ansi-fg-1').textContent(), 'red');
    console.log('all lines once, stderr and colour rendered');
    await page.locator('#recent li').first().waitFor();
    await page.screenshot({ path: path.join(SCREENSHOTS, 'console.png') });

    // A project that runs one command at a time: the second waits in the queue.
    await api('POST', '/projects', { name: `${projectName}-q`, workdir: '/tmp', executor: 'local', max_concurrency: 1 });
    await page.reload();
    await page.locator('#workspace').waitFor({ state: 'visible' });
    await page.getByLabel('Project', { exact: true }).selectOption({ label: `${projectName}-q (local)` });
    await page.getByLabel('Command', { exact: true }).fill('echo started; sleep 600');
    await page.getByRole('button', { name: 'Run', exact: true }).click();
    await output.getByText('started').waitFor({ timeout: 15000 });
    const running = await output.getAttribute('data-command-id');

    await page.getByLabel('Command', { exact: true }).fill('echo second');
    await page.getByRole('button', { name: 'Run', exact: true }).click();
    await page.locator('#status.status-queued').waitFor();
    await page.locator('#position', { hasText: /^1$/ }).waitFor();
    const queued = await output.getAttribute('data-command-id');
    assert.notEqual(queued, running);
    await page.getByRole('button', { name: 'Cancel', exact: true }).click();
    await page.locator('#status.status-cancelled').waitFor({ timeout: 20000 });
    assert.equal((await api('GET', `/commands/${queued}`)).status, 'cancelled');
    console.log('queue position shown; queued command cancelled');

    // Back to the running one from the recent list (its output replays), and cancel it.
    await page.getByRole('button', { name: 'Show echo started; sleep 600 (running)' }).click();
    await output.getByText('started').waitFor();
    await page.locator('#status.status-running').waitFor();
    await page.getByRole('button', { name: 'Cancel', exact: true }).click();
    await page.locator('#status.status-cancelled').waitFor({ timeout: 20000 });
    assert.equal((await api('GET', `/commands/${running}`)).status, 'cancelled');
    console.log('running command cancelled from the console');

    // Readable on a phone: nothing wider than the screen.
    await page.setViewportSize({ width: 390, height: 844 });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the page is ${overflow}px wider than a phone screen`);
    await page.screenshot({ path: path.join(SCREENSHOTS, 'console-phone.png'), fullPage: true });

    // The API reference renders from /openapi.json.
    await page.setViewportSize({ width: 1280, height: 860 });
    await page.goto(`${proxy.url}/docs`);
    await page.locator('#toc li').nth(10).waitFor();
    await page.getByText('POST /api/v1/projects/{id}/commands').first().click();
    await page.locator('#schema-CommandResponse').waitFor();
    await page.screenshot({ path: path.join(SCREENSHOTS, 'docs.png') });
    console.log('API reference rendered');

    assert.deepEqual(problems, [], 'no script errors or CSP violations');
  } catch (error) {
    await page.screenshot({ path: path.join(SCREENSHOTS, 'failure.png') }).catch(() => {});
    throw error;
  } finally {
    await browser.close();
    proxy.close();
  }
  console.log(`ok: screenshots in ${SCREENSHOTS}`);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
