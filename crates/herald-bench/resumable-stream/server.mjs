// The `resumable-stream` target of `herald-bench finite`: Vercel's npm package (on a real
// redis-server) doing the job herald's streaming publish does, behind the same two routes, so the
// bench drives both with the same load.
//
// - `POST /publish?topic=S` with a `text/event-stream` body still being sent: the producer. The
//   body becomes the source stream of `createNewResumableStream(S, ...)`, as an LLM provider's
//   response would in a Next.js route; the copy it returns is drained (the producer's own reader)
//   and the answer is `{"published":N}` (N = events in the body) when the body has ended.
// - `GET /events?topic=S`: a viewer, `resumeExistingStream(S)` piped out as `text/event-stream`
//   (what a reloaded page asks for). A viewer that comes before its producer waits for it (up to
//   10 s); one after the stream is done gets 204.
//
// Usage: node server.mjs --listen 127.0.0.1:0 --redis redis://127.0.0.1:6379
// Prints `resumable-stream listening on http://HOST:PORT` as its first line, as every bench
// target does.
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import { createClient } from 'redis';
import { createResumableStreamContext } from 'resumable-stream';

const { values } = parseArgs({
  options: {
    listen: { type: 'string', default: '127.0.0.1:0' },
    redis: { type: 'string', default: 'redis://127.0.0.1:6379' },
  },
});
const [host, port] = values.listen.split(/:(?=[^:]*$)/);

const publisher = createClient({ url: values.redis });
const subscriber = createClient({ url: values.redis });
for (const c of [publisher, subscriber]) c.on('error', (e) => console.error('redis:', e.message));
await Promise.all([publisher.connect(), subscriber.connect()]);
const context = createResumableStreamContext({ waitUntil: null, publisher, subscriber });

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function answer(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify(body));
}

/** The request body as a stream of strings, chunk by chunk as it arrives. */
function bodyStream(req) {
  const decoder = new TextDecoder();
  return new ReadableStream({
    start(controller) {
      req.on('data', (buf) => controller.enqueue(decoder.decode(buf, { stream: true })));
      req.on('end', () => controller.close());
      req.on('aborted', () => controller.close());
    },
  });
}

async function produce(req, res, topic) {
  let events = 0;
  let tail = '';
  const copy = await context.createNewResumableStream(topic, () => bodyStream(req));
  if (!copy) return answer(res, 409, { error: 'done', message: `stream ${topic} is already done` });
  const reader = copy.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    // Events end in a blank line; count them across chunk boundaries.
    const text = tail + value;
    events += text.split('\n\n').length - 1;
    tail = text.endsWith('\n') && !text.endsWith('\n\n') ? '\n' : '';
  }
  answer(res, 200, { published: events });
}

async function view(req, res, topic) {
  const started = Date.now();
  let stream = await context.resumeExistingStream(topic);
  while (stream === undefined && Date.now() - started < 10_000) {
    await sleep(20);
    stream = await context.resumeExistingStream(topic);
  }
  if (stream === undefined) return answer(res, 404, { error: 'not_found', message: `no stream ${topic}` });
  if (stream === null) {
    res.writeHead(204);
    return res.end();
  }
  res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
  res.flushHeaders();
  const reader = stream.getReader();
  res.on('close', () => reader.cancel().catch(() => {}));
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    res.write(value);
  }
  res.end();
}

const server = createServer({ requestTimeout: 0, headersTimeout: 60_000 }, (req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const topic = url.searchParams.get('topic');
  const route = `${req.method} ${url.pathname}`;
  let handled;
  if (!topic && (route === 'POST /publish' || route === 'GET /events')) {
    handled = Promise.resolve(answer(res, 400, { error: 'no_target', message: 'give topic=...' }));
  } else if (route === 'POST /publish') {
    handled = produce(req, res, topic);
  } else if (route === 'GET /events') {
    handled = view(req, res, topic);
  } else {
    handled = Promise.resolve(answer(res, 404, { error: 'not_found', message: route }));
  }
  handled.catch((e) => {
    console.error(`${route}: ${e.stack || e}`);
    if (!res.headersSent) answer(res, 500, { error: 'internal', message: String(e) });
    else res.destroy();
  });
});
server.keepAliveTimeout = 60_000;
server.listen(Number(port), host, () => {
  const a = server.address();
  console.log(`resumable-stream listening on http://${a.address}:${a.port}`);
});
