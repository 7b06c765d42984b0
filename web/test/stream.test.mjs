// herald.stream (finite streams, issue 16) under Node against the real herald binary, with Node's
// own fetch as the transport: the iterator yields a streamed answer in order and ends at
// herald.complete; a second iterator with the same storage (a reloaded page) resumes after the
// last id it gave out, or ends at once (204) when the answer was already complete; cancel() stops
// the producer's streaming publish and makes the iterator throw; an aborted producer throws.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { request } from 'node:http';

import { stream, StreamEnded } from '../herald.js';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const HERALD = process.env.HERALD_BIN || join(root, 'target/debug/herald');
const PATIENCE = 15000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A sessionStorage stand-in, shared between two iterators as between a page and its reload. */
function memoryStorage() {
  const m = new Map();
  return {
    getItem: (k) => (m.has(k) ? m.get(k) : null),
    setItem: (k, v) => m.set(k, String(v)),
    removeItem: (k) => m.delete(k),
  };
}

const hubs = [];
after(async () => {
  for (const h of hubs) h.kill('SIGTERM');
});

async function startHerald(args = []) {
  assert.ok(existsSync(HERALD), `${HERALD} is missing: cargo build -p herald (or set HERALD_BIN)`);
  const child = spawn(HERALD, ['serve', '--listen', '127.0.0.1:0', ...args], {
    env: { ...process.env, RUST_LOG: 'warn' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  hubs.push(child);
  const lines = createInterface({ input: child.stdout });
  const first = await Promise.race([
    new Promise((r) => lines.once('line', r)),
    sleep(PATIENCE).then(() => {
      throw new Error('herald did not start in time');
    }),
  ]);
  lines.on('line', () => {});
  const m = /^herald listening on (http:\/\/127\.0\.0\.1:(\d+))$/.exec(first);
  assert.ok(m, `unexpected first line: ${first}`);
  return { url: m[1], port: Number(m[2]) };
}

/** A producer's streaming publish whose body is written event by event; `answer` is its reply. */
function producer(hub, query) {
  const req = request({
    host: '127.0.0.1',
    port: hub.port,
    method: 'POST',
    path: `/publish?${query}`,
    headers: { 'Content-Type': 'text/event-stream', 'Transfer-Encoding': 'chunked' },
  });
  const answer = new Promise((resolve, reject) => {
    req.on('response', (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode, body: JSON.parse(body) }));
    });
    req.on('error', reject);
  });
  req.flushHeaders();
  return {
    token: (data) => req.write(`event: token\ndata: ${data}\n\n`),
    end: () => req.end(),
    destroy: () => req.destroy(),
    answer,
  };
}

/** The data of the next `n` events of an iterator. */
async function take(it, n) {
  const out = [];
  while (out.length < n) {
    const { value, done } = await it.next();
    assert.equal(done, false, `the stream ended after ${out.length} of ${n} events`);
    out.push(value.data);
  }
  return out;
}

test('herald.stream yields the answer in order, ends at complete, and a reload resumes after its last id', async () => {
  const hub = await startHerald();
  const storage = memoryStorage();
  const words = ['The', ' answer', ' is', ' 42', '.'];
  const p = producer(hub, 'topic=ai/answer/1&complete=true');
  p.token(words[0]);
  p.token(words[1]);
  const page = stream(hub.url, 'ai/answer/1', { storage });
  // A page that never saw the stream gets it from its start.
  assert.deepEqual(await take(page, 2), words.slice(0, 2));
  // The page is reloaded mid-answer: the old iterator stops, a new one resumes from storage.
  await page.return();
  p.token(words[2]);
  const reloaded = stream(hub.url, 'ai/answer/1', { storage });
  assert.deepEqual(await take(reloaded, 1), [words[2]]);
  p.token(words[3]);
  p.token(words[4]);
  p.end();
  const rest = [];
  for await (const ev of reloaded) rest.push(ev.data);
  assert.deepEqual(rest, words.slice(3), 'the rest, once, then the end at herald.complete');
  const { status, body } = await p.answer;
  assert.equal(status, 200);
  assert.equal(body.published, 5);
  // The clean end's id is kept: a page reloaded after it is answered 204.
  assert.equal(reloaded.lastEventId, body.complete);
  // Reloaded again after the end: nothing more, and it ends.
  const again = stream(hub.url, 'ai/answer/1', { storage });
  assert.deepEqual(await again.next(), { value: undefined, done: true });
});

test('cancel() stops the producer on the hub and the iterator throws StreamEnded(cancelled)', async () => {
  const hub = await startHerald();
  const p = producer(hub, 'topic=ai/answer/2&complete=true');
  p.token('Once');
  const answer = stream(hub.url, 'ai/answer/2', { storage: memoryStorage() });
  assert.deepEqual(await take(answer, 1), ['Once']);
  const cancelled = await answer.cancel('stop button');
  assert.match(cancelled.id, /^\d+$/);
  const { status, body } = await p.answer; // answered although its body is still open
  assert.equal(status, 200);
  assert.equal(body.cancelled, true);
  assert.equal(body.cancel, cancelled.id);
  await assert.rejects(answer.next(), (e) => e instanceof StreamEnded && e.reason === 'cancelled');
  assert.deepEqual(await answer.next(), { value: undefined, done: true });
  p.destroy();
});

test('a producer that breaks off makes the iterator throw StreamEnded(aborted)', async () => {
  const hub = await startHerald();
  const p = producer(hub, 'topic=ai/answer/3&complete=true');
  p.answer.catch(() => {}); // its connection is cut on purpose
  p.token('Half');
  const answer = stream(hub.url, 'ai/answer/3', { storage: memoryStorage() });
  assert.deepEqual(await take(answer, 1), ['Half']);
  p.destroy();
  await assert.rejects(answer.next(), (e) => e instanceof StreamEnded && e.reason === 'aborted');
});
