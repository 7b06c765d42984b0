// Unit tests of herald.js under Node's test runner: URL building, full-jitter backoff bounds, last
// event id tracking across reconnects, gap and close handling, and the 204 stop. A scripted
// EventSource, fetch and clock stand in for the browser's; the browser tests use the real ones.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { connect, backoffDelay, eventsUrl } from '../herald.js';

/** A scripted EventSource: records what herald.js asks for; the test plays the hub's part. */
class ScriptedEventSource {
  static instances = [];
  constructor(url, init) {
    this.url = url;
    this.init = init;
    this.readyState = 0;
    this.listeners = new Map();
    this.closed = false;
    ScriptedEventSource.instances.push(this);
  }
  addEventListener(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(fn);
  }
  close() {
    this.closed = true;
    this.readyState = 2;
  }
  dispatch(type, ev) {
    for (const fn of this.listeners.get(type) || []) fn(ev);
  }
  open() {
    this.readyState = 1;
    this.dispatch('open', { type: 'open' });
  }
  /** An event as a WHATWG parser dispatches it: lastEventId keeps the last id seen. */
  message(type, data, id) {
    if (id !== undefined) this.lastId = id;
    this.dispatch(type, { type, data, lastEventId: this.lastId || '' });
  }
  /** The stream dropped; the browser retries by itself. */
  drop() {
    this.readyState = 0;
    this.dispatch('error', { type: 'error' });
  }
  /** The browser gave up (non-200 answer, 204 among them). */
  fail() {
    this.readyState = 2;
    this.dispatch('error', { type: 'error' });
  }
}

function clock() {
  const pending = [];
  return {
    pending,
    setTimeout(fn, ms) {
      const t = { fn, ms, cleared: false };
      pending.push(t);
      return t;
    },
    clearTimeout(t) {
      if (t) t.cleared = true;
    },
    /** Runs the live timers scheduled for `ms` (not the probe timeouts). */
    fire(ms) {
      const due = pending.filter((t) => !t.cleared && t.ms === ms);
      assert.ok(due.length > 0, `no live timer of ${ms} ms`);
      for (const t of due) {
        t.cleared = true;
        t.fn();
      }
    },
    live() {
      return pending.filter((t) => !t.cleared);
    },
  };
}

function setup(options = {}) {
  ScriptedEventSource.instances = [];
  const timers = clock();
  const probes = [];
  const status = options.status ?? 503;
  const h = connect('http://hub.test/', {
    topics: ['chat/*', 'news/**'],
    user: 'ann',
    EventSource: ScriptedEventSource,
    fetch: async function (url, init) {
      // A browser's fetch refuses to be called as a method of another object.
      assert.ok(this === undefined || this === globalThis, 'fetch must be called unbound');
      probes.push({ url, init });
      return { status: typeof status === 'function' ? status() : status };
    },
    timers,
    random: options.random ?? (() => 0.5),
    minBackoffMs: 100,
    maxBackoffMs: 1000,
    ...options.connect,
  });
  const states = [];
  h.on('state', (s, d) => states.push([s, d]));
  const es = () => ScriptedEventSource.instances.at(-1);
  return { h, timers, probes, states, es };
}

const settle = () => new Promise((r) => setImmediate(r));

test('eventsUrl encodes selectors, user and last id', () => {
  assert.equal(eventsUrl('http://h/', {}), 'http://h/events');
  assert.equal(eventsUrl('/push', { topics: 'a/b' }), '/push/events?topic=a%2Fb');
  assert.equal(
    eventsUrl('http://h//', { topics: ['chat/*', 'x y'], user: 'ü&1', lastEventId: '42' }),
    'http://h/events?topic=chat%2F*&topic=x%20y&user=%C3%BC%261&lastEventId=42',
  );
  assert.equal(eventsUrl('', { lastEventId: '' }), '/events');
});

test('backoff has full jitter under an exponential ceiling with a cap', () => {
  const ceiling = (a) => Math.min(1000, 100 * 2 ** a);
  for (let attempt = 0; attempt < 12; attempt++) {
    assert.equal(backoffDelay(attempt, 100, 1000, () => 0), 0);
    const top = backoffDelay(attempt, 100, 1000, () => 0.999999);
    assert.ok(top < ceiling(attempt), `attempt ${attempt}: ${top}`);
    assert.ok(top >= ceiling(attempt) - 1, `attempt ${attempt}: ${top}`);
  }
  assert.equal(backoffDelay(3, 100, 1000, () => 0.5), 400);
  assert.equal(backoffDelay(20, 100, 1000, () => 0.5), 500);
  // Real randomness stays in bounds and actually spreads.
  const seen = new Set();
  for (let i = 0; i < 500; i++) {
    const d = backoffDelay(2, 100, 1000);
    assert.ok(d >= 0 && d < 400);
    seen.add(Math.floor(d / 100));
  }
  assert.equal(seen.size, 4);
});

test('opens the stream, tracks ids of every watched type, and goes open', () => {
  const { h, es, states } = setup();
  assert.equal(es().url, 'http://hub.test/events?topic=chat%2F*&topic=news%2F**&user=ann');
  assert.equal(h.state, 'connecting');
  const got = [];
  h.on('message', (e) => got.push(e));
  h.on('chat', (e) => got.push(e));
  es().open();
  assert.deepEqual(states.at(-1), ['open', { lastEventId: null }]);
  es().message('message', 'one', '1');
  es().message('chat', 'two\nlines', '2');
  es().message('ignored', 'nobody listens', '3');
  assert.deepEqual(
    got.map((e) => [e.id, e.type, e.data]),
    [
      ['1', 'message', 'one'],
      ['2', 'chat', 'two\nlines'],
    ],
  );
  assert.equal(h.lastEventId, '2');
});

test('a handler added later listens on the live stream too', () => {
  const { h, es } = setup();
  es().open();
  const got = [];
  h.on('late', (e) => got.push(e.data));
  es().message('late', 'x', '9');
  assert.deepEqual(got, ['x']);
  assert.equal(h.lastEventId, '9');
});

test('when the browser gives up it reconnects with backoff and the last id seen', async () => {
  const { h, es, timers, probes, states } = setup({ random: () => 0.5 });
  h.on('message', () => {});
  es().open();
  es().message('message', 'a', '7');
  const first = es();
  first.drop();
  assert.equal(h.state, 'reconnecting');
  first.fail(); // the browser's own retry got a 503
  await settle();
  assert.equal(probes.length, 1);
  assert.equal(probes[0].url, first.url);
  assert.ok(first.closed);
  assert.deepEqual(states.at(-1), ['reconnecting', { attempt: 1, delayMs: 50, status: 503 }]);
  timers.fire(50);
  assert.equal(es().url, 'http://hub.test/events?topic=chat%2F*&topic=news%2F**&user=ann&lastEventId=7');
  // Failing again doubles the ceiling, up to the cap.
  const delays = [];
  for (let i = 0; i < 6; i++) {
    es().fail();
    await settle();
    delays.push(states.at(-1)[1].delayMs);
    timers.fire(states.at(-1)[1].delayMs);
  }
  assert.deepEqual(delays, [100, 200, 400, 500, 500, 500]);
  // Events from a stale stream are ignored; the new stream resumes and resets the backoff.
  first.message('message', 'stale', '99');
  assert.equal(h.lastEventId, '7');
  es().open();
  assert.deepEqual(states.at(-1), ['open', { lastEventId: '7' }]);
  es().message('message', 'b', '8');
  es().fail();
  await settle();
  assert.equal(states.at(-1)[1].delayMs, 50);
  timers.fire(50);
  assert.match(es().url, /lastEventId=8$/);
});

test('a 204 answer stops for good', async () => {
  const { h, es, timers, states } = setup({ status: 204 });
  es().fail();
  await settle();
  assert.equal(h.state, 'closed');
  assert.deepEqual(states.at(-1), [
    'closed',
    { reason: 'the hub answered 204 No Content', by: 'server', status: 204 },
  ]);
  assert.equal(timers.live().length, 0);
  assert.equal(ScriptedEventSource.instances.length, 1);
});

test('an unreachable hub (probe fails) is retried', async () => {
  const { h, es, states } = setup({
    status: () => {
      throw new TypeError('fetch failed');
    },
  });
  es().fail();
  await settle();
  assert.equal(h.state, 'reconnecting');
  assert.equal(states.at(-1)[1].status, null);
});

test('herald.close stops for good with the reason, and nothing reconnects', async () => {
  const { h, es, timers, states } = setup();
  es().open();
  es().message('herald.close', '{"reason":"kicked"}');
  assert.deepEqual(states.at(-1), ['closed', { reason: 'kicked', by: 'server' }]);
  assert.ok(es().closed);
  es().fail();
  await settle();
  assert.equal(timers.live().length, 0);
  assert.equal(ScriptedEventSource.instances.length, 1);
  assert.equal(h.state, 'closed');
});

test('herald.gap is surfaced with its ids and does not move the last id', () => {
  const { h, es } = setup({ connect: { lastEventId: '3' } });
  assert.match(es().url, /lastEventId=3$/);
  const gaps = [];
  h.on('gap', (g) => gaps.push(g));
  es().open();
  es().message('herald.gap', '{"lastEventId":"3","oldest":"10"}');
  assert.deepEqual(gaps, [{ lastEventId: '3', oldest: '10' }]);
  assert.equal(h.lastEventId, '3');
});

test('close() during a probe or a pending retry cancels it', async () => {
  const { h, es, timers, probes } = setup();
  es().fail();
  h.close();
  await settle();
  assert.equal(probes.length, 1);
  assert.equal(timers.live().length, 0);
  assert.equal(h.state, 'closed');
  const second = setup();
  second.es().fail();
  await settle();
  assert.equal(second.timers.live().length, 1);
  second.h.close();
  assert.equal(second.timers.live().length, 0);
  assert.deepEqual(second.states.at(-1), ['closed', { reason: 'closed by the client', by: 'client' }]);
});

test('a throwing handler is reported and does not stop the others', () => {
  const { h, es } = setup();
  const got = [];
  const errors = [];
  const saved = globalThis.reportError;
  globalThis.reportError = (e) => errors.push(e.message);
  h.on('message', () => {
    throw new Error('boom');
  });
  h.on('message', (e) => got.push(e.data));
  es().message('message', 'x', '1');
  globalThis.reportError = saved;
  assert.deepEqual(got, ['x']);
  assert.deepEqual(errors, ['boom']);
});
