// Real headless Chromium against the real herald binary over HTTPS and HTTP/2: one page opens 20
// EventSources (each on its own topic) plus a fetch of /stats, and all of them work, because they
// share one HTTP/2 connection. The same page over plain HTTP/1.1 shows the browser's limit of 6
// connections per origin: it must not see all 20. The certificate is self-signed, made here with
// the openssl CLI; Chromium runs with --ignore-certificate-errors. A third test makes Chromium
// speak HTTP/1.1 over TLS (--disable-http2), so its streams take herald's lean path, where
// herald writes the TLS records itself after the handshake (crates/herald/src/sealed.rs).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { request } from 'node:https';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const HERALD = process.env.HERALD_BIN || join(root, 'target/debug/herald');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const PATIENCE = 15000;
const STREAMS = 20;

let browser;
let dir;
let cert;
let key;

before(async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium`);
  assert.ok(existsSync(HERALD), `${HERALD} is missing: cargo build -p herald (or set HERALD_BIN)`);
  dir = mkdtempSync(join(tmpdir(), 'herald-https-'));
  cert = join(dir, 'cert.pem');
  key = join(dir, 'key.pem');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-days', '2', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    '-keyout', key, '-out', cert,
  ], { stdio: 'ignore' });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--ignore-certificate-errors'],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function startHerald(args) {
  const child = spawn(HERALD, ['serve', '--listen', '127.0.0.1:0', ...args], {
    env: { ...process.env, RUST_LOG: 'warn' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise((r) => child.once('exit', r));
  const lines = createInterface({ input: child.stdout });
  const first = await Promise.race([
    new Promise((r) => lines.once('line', r)),
    exited.then((code) => {
      throw new Error(`herald exited with ${code} before listening`);
    }),
    sleep(PATIENCE).then(() => {
      throw new Error('herald did not start in time');
    }),
  ]);
  const m = /^herald listening on (https?:\/\/127\.0\.0\.1:\d+)$/.exec(first);
  assert.ok(m, `unexpected first line: ${first}`);
  lines.on('line', () => {});
  return {
    url: m[1],
    async stop() {
      if (child.exitCode === null) child.kill('SIGTERM');
      const code = await Promise.race([exited, sleep(PATIENCE).then(() => 'timeout')]);
      if (code === 'timeout') {
        child.kill('SIGKILL');
        await exited;
      }
    },
  };
}

/** POSTs JSON from node, trusting herald's self-signed certificate. */
function publish(url, body) {
  const payload = JSON.stringify(body);
  if (url.startsWith('http://')) {
    return fetch(`${url}/publish`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: payload,
    }).then((r) => assert.equal(r.status, 200));
  }
  return new Promise((resolvePost, reject) => {
    const req = request(`${url}/publish`, {
      method: 'POST',
      ca: readFileSync(cert),
      headers: { 'content-type': 'application/json' },
    }, (res) => {
      res.resume();
      res.on('end', () => (res.statusCode === 200 ? resolvePost() : reject(new Error(`publish: ${res.statusCode}`))));
    });
    req.on('error', reject);
    req.end(payload);
  });
}

/** Opens STREAMS EventSources on one page of herald's origin. */
async function openStreams(url) {
  const page = await browser.newPage();
  await page.goto(`${url}/stats`);
  const protocol = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
  await page.evaluate((n) => {
    window.opened = 0;
    window.got = {};
    for (let i = 0; i < n; i++) {
      const es = new EventSource(`/events?topic=page${i}`);
      es.onopen = () => window.opened++;
      es.onmessage = (e) => (window.got[i] = e.data);
    }
  }, STREAMS);
  return { page, protocol };
}

/** Fetches /stats from the page once its streams are open; sets `window.statsAnswered`. */
async function fetchStats(page) {
  await page.evaluate(() => {
    window.statsAnswered = false;
    fetch('/stats', { cache: 'no-store' }).then((r) => r.json()).then(() => (window.statsAnswered = true));
  });
}

async function waitFor(page, check, what) {
  const deadline = Date.now() + PATIENCE;
  while (!(await page.evaluate(check))) {
    assert.ok(Date.now() < deadline, `never happened: ${what}`);
    await sleep(50);
  }
}

test('over HTTPS and HTTP/2, one page holds 20 EventSources and still fetches', async () => {
  const herald = await startHerald(['--tls-cert', cert, '--tls-key', key]);
  try {
    assert.ok(herald.url.startsWith('https://'));
    const { page, protocol } = await openStreams(herald.url);
    assert.equal(protocol, 'h2');
    await waitFor(page, `window.opened === ${STREAMS}`, 'all streams open');
    await fetchStats(page);
    for (let i = 0; i < STREAMS; i++) await publish(herald.url, { topic: `page${i}`, data: `to ${i}` });
    await waitFor(page, `Object.keys(window.got).length === ${STREAMS}`, 'every stream received its event');
    const got = await page.evaluate(() => window.got);
    for (let i = 0; i < STREAMS; i++) assert.equal(got[i], `to ${i}`);
    await waitFor(page, 'window.statsAnswered', 'the fetch of /stats answered');
    await page.close();
  } finally {
    await herald.stop();
  }
});

test('over plain HTTP/1.1 the same page hits the browser limit of 6 connections', async () => {
  const herald = await startHerald([]);
  try {
    const { page, protocol } = await openStreams(herald.url);
    assert.equal(protocol, 'http/1.1');
    await waitFor(page, 'window.opened >= 6', 'the first six streams open');
    await fetchStats(page);
    // The rest wait for a free connection, which never comes while the first six stay open.
    await sleep(2000);
    for (let i = 0; i < STREAMS; i++) await publish(herald.url, { topic: `page${i}`, data: `to ${i}` });
    await sleep(1000);
    const state = await page.evaluate(() => ({
      opened: window.opened,
      got: Object.keys(window.got).length,
      stats: window.statsAnswered,
    }));
    assert.equal(state.opened, 6, JSON.stringify(state));
    assert.ok(state.got < STREAMS, JSON.stringify(state));
    assert.equal(state.stats, false, `the fetch should still wait for a connection: ${JSON.stringify(state)}`);
    await page.close();
  } finally {
    await herald.stop();
  }
});

test('over HTTPS with HTTP/1.1, Chromium reads records herald seals itself, large events included', async () => {
  const herald = await startHerald(['--tls-cert', cert, '--tls-key', key]);
  const h1 = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-http2',
      '--ignore-certificate-errors'],
  });
  try {
    const page = await h1.newPage();
    await page.goto(`${herald.url}/stats`);
    const protocol = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
    assert.equal(protocol, 'http/1.1');
    await page.evaluate(() => {
      window.opened = 0;
      window.got = { 0: [], 1: [], 2: [] };
      for (let i = 0; i < 3; i++) {
        const es = new EventSource(`/events?topic=sealed${i}`);
        es.onopen = () => window.opened++;
        es.onmessage = (e) => window.got[i].push(e.data);
      }
    });
    await waitFor(page, 'window.opened === 3', 'three streams open');
    // 40,000 bytes span three TLS records (at most 16 KiB each).
    const large = 'x'.repeat(40000);
    for (let i = 0; i < 3; i++) {
      await publish(herald.url, { topic: `sealed${i}`, data: `small ${i}` });
      await publish(herald.url, { topic: `sealed${i}`, data: large });
      await publish(herald.url, { topic: `sealed${i}`, data: `after ${i}` });
    }
    await waitFor(page, 'Object.values(window.got).every((g) => g.length === 3)', 'every stream got its three events');
    const got = await page.evaluate(() => window.got);
    for (let i = 0; i < 3; i++) assert.deepEqual(got[i], [`small ${i}`, large, `after ${i}`]);
    await page.close();
  } finally {
    await h1.close();
    await herald.stop();
  }
});
