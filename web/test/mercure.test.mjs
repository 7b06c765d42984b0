// herald's Mercure endpoint (`--mercure`) with clients no one here wrote: Symfony's Mercure
// component (Debian's php-symfony-mercure, PHP CLI) publishes through its Hub class with a JWT, and
// a browser EventSource in headless Chromium (Debian's chromium, driven by playwright-core)
// receives it, with the publisher's id, type and data exactly; a private update reaches only the
// page whose mercureAuthorization cookie grants its topic.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '../..');
const HERALD = process.env.HERALD_BIN || join(root, 'target/debug/herald');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const PATIENCE = 15000;
const SECRET = 'a-mercure-test-secret-of-32-bytes';

const b64url = (s) => Buffer.from(s).toString('base64url');
/** A v0.x Mercure token (HS256, the `mercure` claim, no exp), as Symfony apps configure them. */
function v0Token(claim) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ mercure: claim }));
  const sig = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

let context;
let profile;
let hub;

before(async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium`);
  assert.ok(existsSync(HERALD), `${HERALD} is missing: cargo build -p herald (or set HERALD_BIN)`);
  assert.ok(
    existsSync('/usr/share/php/Symfony/Component/Mercure/Hub.php'),
    'apt-get install php-cli php-symfony-mercure',
  );
  const child = spawn(
    HERALD,
    ['serve', '--listen', '127.0.0.1:0', '--mercure', '--jwt-secret', SECRET, '--anonymous'],
    { env: { ...process.env, RUST_LOG: 'warn' }, stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const lines = createInterface({ input: child.stdout });
  const first = await new Promise((r) => lines.once('line', r));
  const m = /^herald listening on (http:\/\/127\.0\.0\.1:\d+)$/.exec(first);
  assert.ok(m, `unexpected first line: ${first}`);
  lines.on('line', () => {});
  hub = { url: m[1], child };
  profile = mkdtempSync(join(tmpdir(), 'herald-mercure-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-quic'],
  });
});

after(async () => {
  if (context) await context.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
  if (hub) hub.child.kill('SIGTERM');
});

/** A page of the hub's origin holding an EventSource on `query`; its events go to window.got. */
async function openSubscriber(query) {
  const page = await context.newPage();
  await page.goto(`${hub.url}/`);
  await page.evaluate(
    (q) =>
      new Promise((resolve, reject) => {
        window.got = [];
        const es = new EventSource(`/.well-known/mercure?${q}`, { withCredentials: true });
        es.addEventListener('book.updated', (e) =>
          window.got.push({ id: e.lastEventId, type: e.type, data: e.data }),
        );
        es.onopen = () => resolve();
        es.onerror = () => reject(new Error('EventSource failed'));
      }),
    query,
  );
  return page;
}

async function symfonyPublish(jwt, topic, data, id, priv = '') {
  const { stdout } = await promisify(execFile)('php', [
    join(here, 'symfony_publish.php'),
    `${hub.url}/.well-known/mercure`,
    jwt,
    topic,
    data,
    id,
    priv,
  ]);
  return stdout;
}

const waitGot = (page, n) =>
  page.waitForFunction((n) => window.got.length >= n, n, { timeout: PATIENCE });

test('an update published by Symfony Hub::publish reaches a Chromium EventSource', async () => {
  const publisher = v0Token({ publish: ['*'] });
  const page = await openSubscriber('topic=' + encodeURIComponent('https://example.com/books/{id}'));
  const data = 'line one\n\n  indented line';
  const id = await symfonyPublish(publisher, 'https://example.com/books/1', data, 'urn:uuid:symfony-1');
  assert.equal(id, 'urn:uuid:symfony-1', 'Hub::publish returns the id the hub answered');
  await waitGot(page, 1);
  assert.deepEqual(await page.evaluate(() => window.got), [
    { id: 'urn:uuid:symfony-1', type: 'book.updated', data },
  ]);
  await page.close();
});

test('a private update reaches only the page whose cookie grants its topic', async () => {
  const publisher = v0Token({ publish: ['*'] });
  const plain = await openSubscriber('match=*');
  // The second page connects with a cookie set for the hub's host.
  await context.addCookies([
    {
      name: 'mercureAuthorization',
      value: v0Token({ subscribe: ['https://example.com/books/{id}'] }),
      url: hub.url,
    },
  ]);
  const withCookie = await openSubscriber('match=*');
  await context.clearCookies();
  await symfonyPublish(publisher, 'https://example.com/books/2', 'secret', 'urn:uuid:private-1', 'private');
  await symfonyPublish(publisher, 'https://example.com/books/2', 'public', 'urn:uuid:public-1');
  await waitGot(withCookie, 2);
  await waitGot(plain, 1);
  assert.deepEqual(
    (await withCookie.evaluate(() => window.got)).map((e) => e.id),
    ['urn:uuid:private-1', 'urn:uuid:public-1'],
  );
  assert.deepEqual(
    (await plain.evaluate(() => window.got)).map((e) => e.id),
    ['urn:uuid:public-1'],
    'the page without the cookie never sees the private update',
  );
  await Promise.all([plain.close(), withCookie.close()]);
});
