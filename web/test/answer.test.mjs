// The streamed-answer demo (the `answer_stream` example, issue 16) in real headless Chromium
// (Debian's chromium, driven by playwright-core): the page asks, the example's fake model pipes
// its answer into the hub through one streaming publish, and the page follows it with
// herald.stream(). Reloaded mid-answer, the page ends up with the whole answer exactly once (what
// the hub's history holds, token for token), stops at herald.complete and opens no stream after
// it; reloaded after the end, it is answered 204 and stays closed. Its Stop button cancels the
// answer on the hub, which stops the producer.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
// `cargo test` builds the examples into target/debug/examples/ (or: cargo build -p herald --example answer_stream).
const EXAMPLE = process.env.ANSWER_STREAM_BIN || join(root, 'target/debug/examples/answer_stream');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const PATIENCE = 20000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** @type {import('playwright-core').BrowserContext} */
let context;
let profile;
const children = [];

before(async () => {
  // Never skip: a missing browser or binary is a failure of the test setup.
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium chromium-driver`);
  assert.ok(existsSync(EXAMPLE), `${EXAMPLE} is missing: cargo build -p herald --example answer_stream (or set ANSWER_STREAM_BIN)`);
  profile = mkdtempSync(join(tmpdir(), 'herald-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--no-first-run', '--disable-quic'],
  });
});

after(async () => {
  if (context) await context.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
  for (const c of children) if (c.exitCode === null) c.kill('SIGTERM');
});

/** The example on a port of its own, a token every `delayMs`. */
async function startExample(delayMs) {
  const child = spawn(EXAMPLE, ['--listen', '127.0.0.1:0', '--token-delay-ms', String(delayMs)], {
    env: { ...process.env, RUST_LOG: 'warn' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  children.push(child);
  const lines = createInterface({ input: child.stdout });
  const first = await Promise.race([
    new Promise((r) => lines.once('line', r)),
    sleep(PATIENCE).then(() => {
      throw new Error('answer_stream did not start in time');
    }),
  ]);
  lines.on('line', () => {});
  const m = /^answer_stream listening on (http:\/\/127\.0\.0\.1:\d+)$/.exec(first);
  assert.ok(m, `unexpected first line: ${first}`);
  return m[1];
}

/**
 * Every event of `topic` in the hub's history up to its herald.complete, read with Node's fetch;
 * with `linger`, also whatever comes in that many ms after it.
 */
async function history(url, topic, linger = 0) {
  const ctl = new AbortController();
  const res = await fetch(`${url}/push/events?topic=${encodeURIComponent(topic)}&since=all`, { signal: ctl.signal });
  assert.equal(res.status, 200);
  const events = [];
  let buf = '';
  let ended = false;
  const decoder = new TextDecoder();
  try {
    for await (const chunk of res.body) {
      buf += decoder.decode(chunk, { stream: true });
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const ev = { type: 'message', data: [] };
        for (const line of block.split('\n')) {
          const [k, ...v] = line.split(':');
          const value = v.join(':').replace(/^ /, '');
          if (k === 'event') ev.type = value;
          else if (k === 'data') ev.data.push(value);
          else if (k === 'id') ev.id = value;
        }
        if (!ev.data.length) continue;
        ev.data = ev.data.join('\n');
        events.push(ev);
        if (ev.type === 'herald.complete' && !ended) {
          ended = true;
          setTimeout(() => ctl.abort(), linger);
        }
      }
    }
  } catch (e) {
    if (!ended || e.name !== 'AbortError') throw e;
  }
  return events;
}

/** The demo page, recording every stream it opens and how each was answered. */
async function openPage(url) {
  const page = await context.newPage();
  const streams = [];
  const errors = [];
  page.on('request', (r) => {
    if (new URL(r.url()).pathname === '/push/events') streams.push({ url: r.url(), status: null, request: r });
  });
  page.on('response', (res) => {
    const s = streams.find((x) => x.request === res.request());
    if (s) s.status = res.status();
  });
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(url + '/');
  return { page, streams, errors };
}

const text = (page) => page.textContent('#answer');
const waitState = (page, want) =>
  page.waitForFunction((w) => document.getElementById('state').textContent === w, want, { timeout: PATIENCE * 2 });

test('reloaded mid-answer, the demo shows the whole answer once, stops at complete and stays stopped', async () => {
  const url = await startExample(60);
  const { page, streams, errors } = await openPage(url);
  try {
    const asked = page.waitForResponse((r) => new URL(r.url()).pathname === '/answers');
    await page.click('#start');
    const { topic, tokens } = await (await asked).json();
    assert.ok(tokens > 40, `a long enough answer: ${tokens} tokens`);
    // Mid-answer: a few words are on the page, most are still to come.
    await page.waitForFunction(() => document.getElementById('answer').textContent.split(' ').length > 8, null, {
      timeout: PATIENCE,
    });
    const before = await text(page);
    assert.equal(await page.textContent('#state'), 'streaming');
    await page.reload();
    // The reloaded page shows what it had at once and resumes after the last id it was given.
    assert.ok((await text(page)).startsWith(before.slice(0, 10)), 'the rendered part survives the reload');
    await waitState(page, 'complete');
    const shown = await text(page);

    const events = await history(url, topic);
    const answer = events.filter((e) => e.type === 'token').map((e) => JSON.parse(e.data)).join('');
    assert.equal(events.at(-1).type, 'herald.complete');
    assert.equal(events.at(-1).data, '{}');
    assert.equal(events.filter((e) => e.type === 'token').length, tokens);
    assert.equal(shown, answer, 'the whole answer, each token once');
    assert.ok(shown.startsWith(before), 'what was shown before the reload is the start of it');

    // Two streams in all: the first page's, and the reloaded page's, resuming after an id.
    assert.equal(streams.length, 2, streams.map((s) => s.url).join('\n'));
    assert.match(streams[0].url, /since=all/);
    const resumedAfter = new URL(streams[1].url).searchParams.get('lastEventId');
    assert.ok(resumedAfter, `the reload resumed after an id: ${streams[1].url}`);
    const at = events.findIndex((e) => e.id === resumedAfter);
    assert.ok(at >= 0, 'that id is one of the answer\'s');
    // Mid-answer indeed: tokens came after the id the reload resumed from (not just the end).
    assert.ok(at <= events.length - 3, `resumed after event ${at} of ${events.length}`);
    // After herald.complete nothing reconnects (a native retry would come after 3 s).
    await sleep(4000);
    assert.equal(streams.length, 2, 'no stream is opened after the answer completed');
    assert.equal(await page.textContent('#state'), 'complete');

    // Reloaded after the end: the text is kept, the one stream it opens is answered 204, and
    // that is the end of it.
    await page.reload();
    await waitState(page, 'complete');
    assert.equal(await text(page), answer);
    await sleep(4000);
    assert.equal(streams.length, 3, streams.map((s) => s.url).join('\n'));
    assert.equal(streams[2].status, 204);
    assert.equal(await text(page), answer);
    assert.deepEqual(errors, []);
  } finally {
    await page.close();
  }
});

test('the Stop button cancels the answer on the hub and the producer stops', async () => {
  const url = await startExample(100);
  const { page, errors } = await openPage(url);
  try {
    const asked = page.waitForResponse((r) => new URL(r.url()).pathname === '/answers');
    await page.click('#start');
    const { topic, tokens } = await (await asked).json();
    await page.waitForFunction(() => document.getElementById('answer').textContent.split(' ').length > 3, null, {
      timeout: PATIENCE,
    });
    await page.click('#stop');
    await waitState(page, 'cancelled');
    // Read for a second past the end: nothing comes after herald.complete.
    const events = await history(url, topic, 1000);
    const types = events.map((e) => e.type);
    const cancel = types.indexOf('herald.cancel');
    assert.ok(cancel > 0, types.join(' '));
    assert.deepEqual(types.slice(-1), ['herald.complete']);
    assert.equal(events.at(-1).data, '{"reason":"cancelled"}');
    const sent = types.filter((t) => t === 'token').length;
    assert.ok(sent < tokens, `the producer stopped early: ${sent} of ${tokens} tokens`);
    assert.deepEqual(errors, []);
  } finally {
    await page.close();
  }
});
