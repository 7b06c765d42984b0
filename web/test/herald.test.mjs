// Unit tests of herald.js under Node's test runner: URL building, full-jitter backoff bounds, last
// event id tracking across reconnects, gap and close handling, and the 204 stop. A scripted
// EventSource, fetch and clock stand in for the browser's; the browser tests use the real ones.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { connect, backoffDelay, eventsUrl, matches, EventStreamParser } from '../herald.js';

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
    transport: 'eventsource',
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
  assert.deepEqual(states.at(-1), ['reconnecting', { attempt: 1, delayMs: 50, status: 503, error: null }]);
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

// ---- the event-stream parser (WHATWG rules) and selectors ------------------------------------

/** Feeds `input` to a fresh parser in pieces cut at `cuts`; returns every event. */
function parseIn(input, cuts = []) {
  const p = new EventStreamParser();
  const out = [];
  let at = 0;
  for (const cut of [...cuts, input.length]) {
    out.push(...p.feed(input.slice(at, cut)));
    at = cut;
  }
  return { p, out };
}

test('the parser reads fields, joins data lines and keeps the last id', () => {
  const { p, out } = parseIn('retry: 2500\n: a comment\n\nid: 1\nevent: chat\ndata: a\ndata:b\n\ndata: c\n\n');
  assert.equal(p.retry, 2500);
  assert.deepEqual(
    out.map((e) => [e.id, e.type, e.data]),
    [
      ['1', 'chat', 'a\nb'],
      ['1', 'message', 'c'],
    ],
  );
});

test('the parser accepts CRLF, LF and CR line ends split anywhere, and a BOM', () => {
  const input = '\ufeffid: 5\r\ndata: one\r\ndata: two\r\n\r\ndata: three\r\rdata: four\n\n';
  for (let cut = 0; cut <= input.length; cut++) {
    const { out } = parseIn(input, [cut]);
    assert.deepEqual(
      out.map((e) => [e.id, e.data]),
      [
        ['5', 'one\ntwo'],
        ['5', 'three'],
        ['5', 'four'],
      ],
      `cut at ${cut}`,
    );
  }
  // Only a first BOM is dropped.
  assert.deepEqual(parseIn('data: \ufeffx\n\n').out[0].data, '\ufeffx');
});

test('the parser follows the edge rules of the spec', () => {
  // No data: nothing is dispatched, and the type does not leak into the next event.
  assert.deepEqual(parseIn('event: x\n\n').out, []);
  assert.equal(parseIn('event: x\n\ndata: y\n\n').out[0].type, 'message');
  // An empty data line dispatches an empty message; a field without a colon is an empty value.
  assert.deepEqual(parseIn('data\n\n').out.map((e) => e.data), ['']);
  assert.deepEqual(parseIn('data:\ndata\n\n').out.map((e) => e.data), ['\n']);
  // Only one leading space is stripped.
  assert.equal(parseIn('data:  two spaces\n\n').out[0].data, ' two spaces');
  // An id with NUL is ignored; an empty id resets the last id.
  assert.equal(parseIn('id: 1\ndata: a\n\nid: 2\0\ndata: b\n\n').out[1].id, '1');
  assert.equal(parseIn('id: 1\ndata: a\n\nid\ndata: b\n\n').out[1].id, '');
  // retry takes ASCII digits only; unknown fields and comments are ignored.
  assert.equal(parseIn('retry: 1x\n\n').p.retry, null);
  assert.equal(parseIn('retry: -1\n\n').p.retry, null);
  assert.deepEqual(parseIn('foo: bar\n:data: no\ndata: yes\n\n').out.map((e) => e.data), ['yes']);
  // An unfinished event at the end of a stream is not dispatched.
  assert.deepEqual(parseIn('data: cut').out, []);
  // A parser started with a last id (a reconnect) keeps it until the stream sets another.
  const resumed = new EventStreamParser('41');
  assert.equal(resumed.feed('event: herald.gap\ndata: {}\n\n')[0].id, '41');
});

test('the parser keeps herald routing lines with their event', () => {
  const { out } = parseIn('topic: chat/a\ntopic: news/x\nid: 3\ndata: t\n\nbroadcast: 1\nid: 4\ndata: b\n\nuser: ann\nid: 5\ndata: u\n\nid: 6\ndata: p\n\n');
  assert.deepEqual(
    out.map((e) => [e.id, e.topics, e.broadcast, e.user]),
    [
      ['3', ['chat/a', 'news/x'], false, null],
      ['4', [], true, null],
      ['5', [], false, 'ann'],
      ['6', [], false, null],
    ],
  );
});

test('selectors match as the hub matches them', () => {
  const cases = [
    ['chat/a', 'chat/a', true],
    ['chat/a', 'chat/b', false],
    ['chat/*', 'chat/a', true],
    ['chat/*', 'chat', false],
    ['chat/*', 'chat/a/b', false],
    ['chat/**', 'chat/a/b', true],
    ['chat/**', 'chat', false],
    ['*/a', 'x/a', true],
    ['**', 'x', true],
    ['a*b', 'a*b', true],
    ['a*b', 'axb', false],
  ];
  for (const [selector, topic, want] of cases) assert.equal(matches(selector, topic), want, `${selector} ~ ${topic}`);
});

// ---- the fetch transport: every type, headers, tokens, reconnects ----------------------------

/** A scripted hub behind fetch: each call gets the next answer; streams are fed by the test. */
function scriptedHub() {
  const calls = [];
  const answers = [];
  const fetchFn = async function (url, init) {
    const call = { url, init, controller: null };
    calls.push(call);
    const answer = answers.shift() || { status: 200 };
    if (answer.status !== 200) {
      const text = answer.status === 204 ? null : JSON.stringify(answer.body || {});
      return new Response(text, { status: answer.status });
    }
    const body = new ReadableStream({
      start(c) {
        call.controller = c;
      },
    });
    init.signal.addEventListener('abort', () => {
      try {
        call.controller.error(new Error('aborted'));
      } catch {
        // Already closed.
      }
    });
    return new Response(body, { status: 200, headers: { 'content-type': 'text/event-stream' } });
  };
  const send = (text) => calls.at(-1).controller.enqueue(new TextEncoder().encode(text));
  return { calls, answers, fetch: fetchFn, send, end: () => calls.at(-1).controller.close() };
}

const tick = () => new Promise((r) => setTimeout(r, 5));

async function until(check) {
  for (let i = 0; i < 200 && !check(); i++) await tick();
  assert.ok(check(), 'condition never held');
}

function fetchSetup(options = {}) {
  const hub = scriptedHub();
  const timers = clock();
  const h = connect('http://hub.test', {
    topics: ['chat/*'],
    fetch: hub.fetch,
    timers,
    random: () => 0.5,
    minBackoffMs: 100,
    maxBackoffMs: 1000,
    ...options,
  });
  const states = [];
  h.on('state', (s, d) => states.push([s, d]));
  const all = [];
  h.on('*', (e) => all.push([e.id, e.type, e.data]));
  return { h, hub, timers, states, all };
}

test('fetch transport: every event type reaches on("*"), the token goes in a header, a drop resumes', async () => {
  let n = 0;
  const { h, hub, timers, states, all } = fetchSetup({ token: () => `tok${++n}` });
  assert.equal(h.transport, 'fetch');
  await until(() => hub.calls.length === 1);
  assert.equal(hub.calls[0].url, 'http://hub.test/events?topic=chat%2F*');
  assert.equal(hub.calls[0].init.headers.Authorization, 'Bearer tok1');
  assert.ok(!hub.calls[0].url.includes('tok1'), 'the token stays out of the URL');
  await until(() => h.state === 'open');
  const typed = [];
  h.on('never.named.before', (e) => typed.push(e.data));
  hub.send('retry: 250\n: herald\n\nid: 1\ndata: plain\n\nid: 2\nevent: never.named.before\ndata: x\n\n');
  hub.send('id: 3\nevent: other\ndata: y\n');
  hub.send('\n');
  await until(() => all.length === 3);
  assert.deepEqual(all, [
    ['1', 'message', 'plain'],
    ['2', 'never.named.before', 'x'],
    ['3', 'other', 'y'],
  ]);
  assert.deepEqual(typed, ['x']);
  assert.equal(h.lastEventId, '3');
  // The stream ends: reconnect after the hub's retry, from the last id, with the same token.
  hub.end();
  await until(() => h.state === 'reconnecting');
  assert.deepEqual(states.at(-1), ['reconnecting', { attempt: 0, delayMs: 250 }]);
  timers.fire(250);
  await until(() => hub.calls.length === 2);
  assert.equal(hub.calls[1].url, 'http://hub.test/events?topic=chat%2F*&lastEventId=3');
  assert.equal(hub.calls[1].init.headers.Authorization, 'Bearer tok1');
  h.close();
});

test('fetch transport: token_expired and a 401 refresh the token; refused twice in a row closes', async () => {
  let n = 0;
  const { h, hub, timers, states, all } = fetchSetup({ token: () => Promise.resolve(`tok${++n}`) });
  await until(() => h.state === 'open');
  hub.send('id: 7\ndata: a\n\nevent: herald.close\ndata: {"reason":"token_expired"}\n\n');
  // A fresh token, at once, from the last id.
  await until(() => hub.calls.length === 2);
  assert.equal(hub.calls[1].init.headers.Authorization, 'Bearer tok2');
  assert.match(hub.calls[1].url, /lastEventId=7$/);
  await until(() => h.state === 'open');
  hub.send('id: 8\ndata: b\n\n');
  await until(() => all.length === 2);
  // The hub refuses the next token once (401): refresh again, and it works.
  hub.answers.push({ status: 401, body: { error: 'invalid_token', message: 'the token expired' } }, { status: 200 });
  hub.end();
  await until(() => h.state === 'reconnecting');
  assert.deepEqual(states.at(-1), ['reconnecting', { attempt: 0, delayMs: 3000 }]);
  timers.fire(3000);
  await until(() => hub.calls.length === 4);
  assert.equal(hub.calls[2].init.headers.Authorization, 'Bearer tok2');
  assert.equal(hub.calls[3].init.headers.Authorization, 'Bearer tok3');
  assert.match(hub.calls[3].url, /lastEventId=8$/);
  await until(() => h.state === 'open');
  assert.deepEqual(all.map((e) => e[2]), ['a', 'b'], 'nothing twice, nothing lost');
  // Refused twice in a row: closed with the hub's error, no loop.
  const refusal = { status: 401, body: { error: 'invalid_token', message: 'bad signature' } };
  hub.answers.push(refusal, refusal, { status: 200 });
  hub.end();
  await until(() => h.state === 'reconnecting');
  timers.fire(3000);
  await until(() => h.state === 'closed');
  assert.deepEqual(states.at(-1), [
    'closed',
    { reason: 'invalid_token: bad signature', by: 'server', status: 401, error: refusal.body },
  ]);
  assert.equal(hub.calls.length, 6);
});

test('fetch transport: 204 and 403 stop for good, 503 backs off', async () => {
  const { h, hub, timers, states } = fetchSetup();
  hub.answers.push({ status: 503, body: { error: 'at_capacity', message: 'full' } });
  await until(() => h.state === 'reconnecting');
  assert.deepEqual(states.at(-1), [
    'reconnecting',
    { attempt: 1, delayMs: 50, status: 503, error: { error: 'at_capacity', message: 'full' } },
  ]);
  hub.answers.push({ status: 403, body: { error: 'forbidden_selector', message: 'no' } });
  timers.fire(50);
  await until(() => h.state === 'closed');
  assert.equal(states.at(-1)[1].reason, 'forbidden_selector: no');
  const second = fetchSetup();
  second.hub.answers.push({ status: 204 });
  await until(() => second.h.state === 'closed');
  assert.equal(second.states.at(-1)[1].reason, 'the hub answered 204 No Content');
  assert.equal(second.hub.calls.length, 1);
});

test('share needs the fetch transport', () => {
  assert.throws(() => connect('http://h', { share: true, transport: 'eventsource', EventSource: ScriptedEventSource }), /fetch/);
  assert.throws(() => connect('http://h', { transport: 'websocket' }), /transport/);
});
