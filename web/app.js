// app.js: the dashboard's behaviour — subscribe through herald.js (every event type, via on('*')),
// publish, end a user's streams, and poll /stats and /users every second for the numbers, the
// nodes, the online users and the chart. The presence panel holds its own herald.js stream on
// `$presence/*` (from what history holds, then resuming by last id across reconnects): events
// alone say who is online or offline, ordered by `generation`; the /users poll only refreshes the
// connection counts. With auth on, every request and both streams carry the token or publish key
// typed into the page (kept in sessionStorage, so it lasts as long as the tab); `$presence/*`
// needs one that may subscribe to it (the publish key, an admin token; a token naming a user makes
// the panel's stream one of that user's, as any stream it opens). `?presence=0` leaves the panel
// off. Every URL is relative to this file, so the dashboard also works when herald is
// nested (/push/).
import { connect } from './herald.js';

const base = new URL('.', import.meta.url);
const api = (path) => new URL(path, base).href;
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

const MAX_ROWS = 500;
const CHART_SECONDS = 60;

/** @type {import('./herald.js').Connection | null} */
let connection = null;
let eventCount = 0;
const CREDENTIAL = 'herald.credential';

/** The token or publish key typed into the page ('' for none). */
function credential() {
  return sessionStorage.getItem(CREDENTIAL) || '';
}

/** fetch() with the credential as `Authorization: Bearer`. */
function hubFetch(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  if (credential()) headers.Authorization = `Bearer ${credential()}`;
  return fetch(api(path), { ...init, headers });
}

// ---- connection state, always visible in the top bar ------------------------------------------

function showState(state, text) {
  $('state').dataset.state = state;
  $('state-text').textContent = text;
}

function describe(state, detail, user) {
  const who = user ? ` as ${user}` : '';
  switch (state) {
    case 'connecting':
      return `connecting${who}…`;
    case 'open':
      return `open${who}`;
    case 'reconnecting':
      if (detail.delayMs !== undefined) {
        const status = detail.status ? `hub answered ${detail.status}` : 'hub unreachable';
        return `reconnecting in ${(detail.delayMs / 1000).toFixed(1)} s · ${status}`;
      }
      return 'reconnecting…';
    case 'closed':
      return `closed · ${detail.reason || 'closed'}`;
    default:
      return state;
  }
}

// ---- the live event list ----------------------------------------------------------------------

function time() {
  return timeOf(new Date());
}

function timeOf(d) {
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function addRow({ id = '', type, data, kind = 'event' }) {
  const tbody = /** @type {HTMLTableElement} */ ($('events')).tBodies[0];
  const tr = document.createElement('tr');
  tr.className = `${kind} fresh`;
  if (kind === 'event') tr.dataset.id = id;
  tr.dataset.type = type;
  const cell = (cls, text) => {
    const td = document.createElement('td');
    td.className = cls;
    td.textContent = text;
    tr.append(td);
    return td;
  };
  cell('time', time());
  cell('id', id);
  const typeCell = cell('type-cell', '');
  const badge = document.createElement('span');
  badge.className = 'type';
  badge.textContent = type;
  typeCell.append(badge);
  cell('data', data);
  tbody.prepend(tr);
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
  if (kind === 'event') {
    eventCount += 1;
    $('event-count').textContent = String(eventCount);
  }
  $('events-empty').hidden = true;
}

function showLastId() {
  const id = connection && connection.lastEventId;
  $('last-id').textContent = id ? `last id ${id}` : '';
}

// ---- subscribe --------------------------------------------------------------------------------

const words = (s) => s.split(/[\s,]+/).filter(Boolean);

function startConnection() {
  const form = /** @type {HTMLFormElement} */ ($('connect-form'));
  const user = form.user.value.trim();
  const topics = words(form.topics.value);
  const lastEventId = form.lastEventId.value.trim();
  stopConnection();
  $('connect-error').hidden = true;
  let h;
  try {
    h = connect(base.href, {
      topics,
      user: user || undefined,
      lastEventId: lastEventId || undefined,
      token: () => credential() || null,
      maxBackoffMs: Number(new URLSearchParams(location.search).get('maxBackoffMs')) || undefined,
    });
  } catch (err) {
    showError($('connect-error'), String(err));
    return;
  }
  connection = h;
  h.on('state', (state, detail) => {
    if (connection !== h) return;
    showState(state, describe(state, detail, user));
    if (state === 'closed' || (state === 'reconnecting' && detail.delayMs !== undefined)) {
      addRow({ type: state, data: describe(state, detail, user), kind: 'system' });
    }
    if (state === 'closed') setConnected(false);
    // The hub's own reason for a refusal (503 at_capacity, 401 invalid_token ...).
    if (detail.error) showError($('connect-error'), `${detail.status} ${detail.error.error}: ${detail.error.message}`);
    else if (state === 'reconnecting' && detail.status && detail.status !== 204 && h.transport === 'eventsource') {
      probeReason(h.url);
    }
  });
  h.on('gap', (gap) => {
    const oldest = gap.oldest ? `the oldest kept is ${gap.oldest}` : 'the hub keeps none';
    addRow({
      type: 'herald.gap',
      data: `events after ${gap.lastEventId} may be missing; ${oldest}`,
      kind: 'system gap',
    });
  });
  // Every event, whatever its type.
  h.on('*', (ev) => {
    addRow({ id: ev.id, type: ev.type, data: ev.data });
    showLastId();
  });
  showState('connecting', describe('connecting', {}, user));
  setConnected(true);
}

/** After a refused stream, shows the hub's own error message (EventSource hides it). */
async function probeReason(url) {
  try {
    const res = await hubFetch(url, { headers: { Accept: 'text/event-stream' } });
    if (res.ok) {
      res.body && res.body.cancel();
      return;
    }
    showError($('connect-error'), await errorText(res));
  } catch {
    // The hub is unreachable; the top bar says so.
  }
}

function stopConnection() {
  const old = connection;
  // Forget it first, so its handlers ignore the closing it reports.
  connection = null;
  if (old) old.close();
}

function setConnected(on) {
  /** @type {HTMLButtonElement} */ ($('connect')).textContent = on ? 'Reconnect' : 'Connect';
  /** @type {HTMLButtonElement} */ ($('disconnect')).disabled = !on;
}

// ---- publish ----------------------------------------------------------------------------------

async function errorText(res) {
  const text = await res.text();
  try {
    const body = JSON.parse(text);
    if (body && body.message) return `${res.status} ${body.error}: ${body.message}`;
  } catch {
    // Not JSON: show the text as is.
  }
  return `${res.status} ${res.statusText}${text ? `: ${text}` : ''}`;
}

function showError(el, text) {
  el.className = 'message error';
  el.textContent = text;
  el.hidden = false;
}

function kind() {
  const form = /** @type {HTMLFormElement} */ ($('publish-form'));
  return /** @type {RadioNodeList} */ (form.elements.namedItem('kind')).value;
}

function updateTargets() {
  const k = kind();
  $('targets-label').hidden = k === 'broadcast';
  $('targets-name').textContent = k === 'users' ? 'Users' : 'Topics';
  /** @type {HTMLInputElement} */ ($('targets')).placeholder = k === 'users' ? 'ann bob' : 'chat/room1';
}

async function publish(event) {
  event.preventDefault();
  const form = /** @type {HTMLFormElement} */ ($('publish-form'));
  const out = $('publish-result');
  const k = kind();
  /** @type {Record<string, unknown>} */
  const body = {};
  if (k === 'broadcast') body.broadcast = true;
  else body[k] = words(form.targets.value);
  body.data = form.data.value;
  const type = form.event.value.trim();
  if (type) body.event = type;
  const button = /** @type {HTMLButtonElement} */ ($('publish'));
  button.disabled = true;
  try {
    const res = await hubFetch('publish', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
    if (!res.ok) {
      showError(out, await errorText(res));
      return;
    }
    const answer = await res.json();
    out.className = 'message ok';
    out.replaceChildren(
      'Published ',
      Object.assign(document.createElement('code'), { textContent: `id ${answer.id}` }),
      ` · delivered to ${answer.delivered} connection${answer.delivered === 1 ? '' : 's'}`,
    );
    out.dataset.id = answer.id;
    out.hidden = false;
  } catch (err) {
    showError(out, `the hub did not answer: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

// ---- hub numbers, users and the chart ----------------------------------------------------------

const series = { published: [], delivered: [] };
let previous = null;

function fmtUptime(s) {
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

const number = new Intl.NumberFormat();

async function poll() {
  try {
    const [statsRes, usersRes] = await Promise.all([hubFetch('stats'), hubFetch('users?limit=100')]);
    if (!statsRes.ok) throw new Error(await errorText(statsRes));
    if (!usersRes.ok) throw new Error(await errorText(usersRes));
    const stats = await statsRes.json();
    const users = await usersRes.json();
    const now = performance.now();
    for (const key of ['connections', 'users', 'topics', 'published', 'delivered']) {
      $(`stat-${key}`).textContent = number.format(stats[key]);
    }
    $('stat-uptime').textContent = fmtUptime(stats.uptimeSeconds);
    if (previous && stats.published >= previous.published) {
      const seconds = Math.max(0.001, (now - previous.at) / 1000);
      push('published', (stats.published - previous.published) / seconds);
      push('delivered', (stats.delivered - previous.delivered) / seconds);
    } else {
      // First sample, or the hub restarted: start the rates again.
      series.published.length = 0;
      series.delivered.length = 0;
    }
    previous = { at: now, published: stats.published, delivered: stats.delivered };
    showNodes(stats.nodes);
    showUsers(users);
    const hub = $('hub-status');
    hub.dataset.up = 'true';
    hub.textContent = `hub up ${fmtUptime(stats.uptimeSeconds)}`;
  } catch (err) {
    const hub = $('hub-status');
    hub.dataset.up = 'false';
    hub.textContent = err instanceof TypeError ? 'hub unreachable' : `hub error: ${err.message}`;
    previous = null;
  }
  draw();
}

function push(key, value) {
  const s = series[key];
  s.push(value);
  if (s.length > CHART_SECONDS) s.shift();
  $(`rate-${key}`).textContent = value >= 10 ? number.format(Math.round(value)) : String(Math.round(value * 10) / 10);
}

function showUsers({ count, users }) {
  presenceCounts(count, users);
  $('user-count').textContent = String(count);
  const list = $('users');
  const most = Math.max(1, ...users.map((u) => u.connections));
  list.replaceChildren(
    ...users.map((u) => {
      const li = document.createElement('li');
      li.dataset.user = u.id;
      const name = Object.assign(document.createElement('span'), { className: 'name', textContent: u.id });
      const n = Object.assign(document.createElement('span'), {
        className: 'n',
        textContent: `${u.connections} connection${u.connections === 1 ? '' : 's'}`,
      });
      const bar = Object.assign(document.createElement('span'), { className: 'bar' });
      const fill = document.createElement('i');
      fill.style.width = `${(100 * u.connections) / most}%`;
      bar.append(fill);
      const end = Object.assign(document.createElement('button'), {
        type: 'button',
        className: 'ghost end',
        textContent: 'End',
        title: `End ${u.id}'s connections`,
      });
      end.addEventListener('click', () => endUser(u.id));
      li.append(name, n, end, bar);
      return li;
    }),
  );
  $('users-empty').hidden = users.length > 0;
}

/** Ends every stream of `user` (each gets `herald.close`) and says how many it was. */
async function endUser(user) {
  const out = $('users-result');
  try {
    const res = await hubFetch(`users/${encodeURIComponent(user)}/connections?reason=${encodeURIComponent('ended from the dashboard')}`, {
      method: 'DELETE',
    });
    if (!res.ok) {
      showError(out, await errorText(res));
      return;
    }
    const { closed } = await res.json();
    out.className = 'message ok';
    out.textContent = `Ended ${closed} connection${closed === 1 ? '' : 's'} of ${user}`;
    out.hidden = false;
  } catch (err) {
    showError(out, `the hub did not answer: ${err.message}`);
  }
}

// ---- presence: who is online, from $presence/* events -----------------------------------------

const PRESENCE_TOPIC = '$presence/*';
const MAX_PRESENCE = 200;
/**
 * What the page knows of each user: from their latest presence event (`generation` > 0), or, for
 * users online before any event of theirs reached the page, from the /users poll (generation 0).
 * @type {Map<string, {online: boolean, connections: number, generation: number, id: string, at: Date | null}>}
 */
const presence = new Map();
/** @type {import('./herald.js').Connection | null} */
let presenceConnection = null;
/** The last presence event id seen, so a new stream (another credential) resumes after it. */
let presenceLastId = null;
let presenceRestart = 0;

function startPresence() {
  const old = presenceConnection;
  presenceConnection = null;
  if (old) {
    presenceLastId = old.lastEventId || presenceLastId;
    old.close();
  }
  $('presence-error').hidden = true;
  const h = connect(base.href, {
    topics: [PRESENCE_TOPIC],
    // The first stream starts from what history holds; later ones resume after the last id.
    lastEventId: presenceLastId || undefined,
    since: presenceLastId ? undefined : 'all',
    token: () => credential() || null,
    maxBackoffMs: Number(new URLSearchParams(location.search).get('maxBackoffMs')) || undefined,
  });
  presenceConnection = h;
  h.on('state', (state, detail) => {
    if (presenceConnection !== h) return;
    const label = $('presence-state');
    label.dataset.state = state;
    label.textContent = { connecting: 'connecting…', open: 'live', reconnecting: 'reconnecting…' }[state] || 'closed';
    if (detail.error) {
      showError($('presence-error'), `${detail.status} ${detail.error.error}: ${detail.error.message}`);
    } else if (state === 'open') {
      $('presence-error').hidden = true;
    }
  });
  h.on('herald.presence', (ev) => {
    if (presenceConnection !== h) return;
    let p;
    try {
      p = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (!p || typeof p.user !== 'string' || typeof p.generation !== 'number') return;
    const known = presence.get(p.user);
    // Generations grow with every transition of a user: an older one is stale.
    if (known && known.generation >= p.generation) return;
    presence.set(p.user, {
      online: p.online === true,
      connections: Number(p.connections) || 0,
      generation: p.generation,
      id: ev.id,
      at: new Date(),
    });
    renderPresence();
  });
  h.on('gap', (gap) => {
    if (presenceConnection !== h) return;
    const note = $('presence-note');
    note.textContent = `Some presence events after ${gap.lastEventId} are no longer in the hub's history: the list may be behind until those users change again.`;
    note.hidden = false;
  });
}

/** The /users poll: current connection counts of online users (it never decides who is online). */
function presenceCounts(count, users) {
  if (!presenceConnection || presenceConnection.state !== 'open') return;
  const listed = new Map(users.map((u) => [u.id, u.connections]));
  // Only a complete page tells who has no stream at all.
  const complete = count <= users.length;
  for (const [user, p] of presence) {
    if (!p.online) continue;
    if (listed.has(user)) p.connections = listed.get(user);
    else if (complete && p.generation === 0) presence.delete(user);
    else if (complete) p.connections = 0;
  }
  for (const [user, n] of listed) {
    if (!presence.has(user)) presence.set(user, { online: true, connections: n, generation: 0, id: '', at: null });
  }
  renderPresence();
}

function renderPresence() {
  const entries = [...presence.entries()].sort(
    ([, a], [, b]) => Number(b.online) - Number(a.online) || (b.at ? b.at.getTime() : 0) - (a.at ? a.at.getTime() : 0),
  );
  const online = entries.filter(([, p]) => p.online).length;
  $('presence-online').textContent = String(online);
  $('presence').replaceChildren(
    ...entries.slice(0, MAX_PRESENCE).map(([user, p]) => {
      const li = document.createElement('li');
      li.dataset.user = user;
      li.dataset.online = String(p.online);
      li.dataset.generation = String(p.generation);
      const n = p.online ? p.connections : 0;
      let count = `${n} connection${n === 1 ? '' : 's'}`;
      // Online with no stream left: the last one closed and the grace is running.
      if (p.online && n === 0) count += ' · in grace';
      const when = p.at
        ? `${p.online ? 'online' : 'offline'} since ${timeOf(p.at)} · generation ${p.generation}`
        : 'online since before this page opened';
      li.title = p.id ? `event ${p.id}` : 'from /users';
      li.append(
        Object.assign(document.createElement('span'), { className: 'dot' }),
        Object.assign(document.createElement('span'), { className: 'name', textContent: user }),
        Object.assign(document.createElement('span'), { className: 'n', textContent: count }),
        Object.assign(document.createElement('span'), { className: 'when', textContent: when }),
      );
      return li;
    }),
  );
  $('presence-empty').hidden = entries.length > 0;
}

/** Cluster mode: each node with its connections (`/stats` lists them only there). */
function showNodes(nodes) {
  $('nodes-block').hidden = !Array.isArray(nodes);
  if (!Array.isArray(nodes)) return;
  $('nodes').replaceChildren(
    ...nodes.map((node) => {
      const li = document.createElement('li');
      li.dataset.node = node.id;
      li.append(
        Object.assign(document.createElement('span'), { className: 'name', textContent: node.id }),
        Object.assign(document.createElement('span'), {
          className: 'n',
          textContent: `${node.connections} connection${node.connections === 1 ? '' : 's'}`,
        }),
      );
      return li;
    }),
  );
}

/** A nice ceiling for the y axis: 1, 2, 5 times a power of ten. */
function niceMax(v) {
  if (v <= 1) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function draw() {
  const canvas = /** @type {HTMLCanvasElement} */ ($('chart'));
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext('2d');
  if (!ctx) return;
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const left = 34;
  const top = 6;
  const bottom = height - 18;
  const right = width - 4;
  const max = niceMax(Math.max(...series.published, ...series.delivered, 0));
  ctx.font = '11px system-ui, sans-serif';
  ctx.fillStyle = color('--muted');
  ctx.strokeStyle = color('--line');
  ctx.lineWidth = 1;
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  for (let i = 0; i <= 2; i++) {
    const y = Math.round(bottom - ((bottom - top) * i) / 2) + 0.5;
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(right, y);
    ctx.stroke();
    const label = (max * i) / 2;
    ctx.fillText(label >= 10 ? number.format(label) : String(label), left - 6, y);
  }
  ctx.textAlign = 'left';
  ctx.textBaseline = 'alphabetic';
  ctx.fillText(`${CHART_SECONDS}s ago`, left, height - 4);
  ctx.textAlign = 'right';
  ctx.fillText('now', right, height - 4);
  const x = (i, n) => right - ((n - 1 - i) * (right - left)) / (CHART_SECONDS - 1);
  const y = (v) => bottom - ((bottom - top) * v) / max;
  const line = (values, stroke, fill) => {
    const n = values.length;
    if (n === 0) return;
    ctx.beginPath();
    values.forEach((v, i) => (i === 0 ? ctx.moveTo(x(i, n), y(v)) : ctx.lineTo(x(i, n), y(v))));
    if (fill) {
      ctx.lineTo(x(n - 1, n), bottom);
      ctx.lineTo(x(0, n), bottom);
      ctx.closePath();
      ctx.globalAlpha = 0.14;
      ctx.fillStyle = stroke;
      ctx.fill();
      ctx.globalAlpha = 1;
      ctx.beginPath();
      values.forEach((v, i) => (i === 0 ? ctx.moveTo(x(i, n), y(v)) : ctx.lineTo(x(i, n), y(v))));
    }
    ctx.strokeStyle = stroke;
    ctx.lineWidth = 2;
    ctx.lineJoin = 'round';
    ctx.stroke();
    ctx.beginPath();
    ctx.fillStyle = stroke;
    ctx.arc(x(n - 1, n), y(values[n - 1]), 3, 0, 2 * Math.PI);
    ctx.fill();
  };
  line(series.delivered, color('--teal'), true);
  line(series.published, color('--accent'), false);
}

// ---- wiring -----------------------------------------------------------------------------------

function init() {
  const params = new URLSearchParams(location.search);
  const form = /** @type {HTMLFormElement} */ ($('connect-form'));
  if (params.has('user')) form.user.value = params.get('user');
  if (params.has('topic')) form.topics.value = params.getAll('topic').join(' ');
  const secret = /** @type {HTMLInputElement} */ ($('credential'));
  secret.value = credential();
  secret.addEventListener('input', () => {
    if (secret.value) sessionStorage.setItem(CREDENTIAL, secret.value.trim());
    else sessionStorage.removeItem(CREDENTIAL);
    poll();
    // A new credential may open $presence/* (once typing pauses).
    if (watchPresence) {
      clearTimeout(presenceRestart);
      presenceRestart = setTimeout(startPresence, 300);
    }
  });
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    startConnection();
  });
  $('disconnect').addEventListener('click', () => {
    stopConnection();
    showState('idle', 'not connected');
    setConnected(false);
  });
  $('clear').addEventListener('click', () => {
    /** @type {HTMLTableElement} */ ($('events')).tBodies[0].replaceChildren();
    eventCount = 0;
    $('event-count').textContent = '0';
    $('events-empty').hidden = false;
  });
  const publishForm = /** @type {HTMLFormElement} */ ($('publish-form'));
  publishForm.addEventListener('submit', publish);
  publishForm.addEventListener('change', updateTargets);
  updateTargets();
  new ResizeObserver(() => draw()).observe($('chart'));
  if (watchPresence) startPresence();
  else $('presence-state').textContent = 'off (?presence=0)';
  poll();
  setInterval(poll, 1000);
  if (params.get('connect') === '1') startConnection();
}

const watchPresence = new URLSearchParams(location.search).get('presence') !== '0';

// The page's live connection, for the browser tests and for poking at from the console.
Object.defineProperty(window, 'dashboard', {
  value: {
    get connection() {
      return connection;
    },
    get presence() {
      return presenceConnection;
    },
  },
});

init();
