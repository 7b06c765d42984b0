// herald.js: the browser client of a herald hub, dependency-free. It keeps one subscription alive:
// resumes by last event id, reconnects with backoff, refreshes tokens, surfaces herald.gap, stops
// for good on herald.close or a refusal that cannot heal. Two transports (a fetch() stream read
// with the WHATWG event-stream rules, or the native EventSource), and, with `share`, one stream
// for all tabs of the page's origin (Web Locks elect the tab that holds it, BroadcastChannel
// carries its events to the others, each tab gets exactly the events for its own topics, once).

/**
 * Connection states, in the order a connection usually goes through them.
 * @typedef {'connecting' | 'open' | 'reconnecting' | 'closed'} State
 */

/**
 * What a `state` handler gets besides the new state.
 * @typedef {object} StateDetail
 * @property {number} [attempt] Reconnect attempt about to be made (1 for the first; 0 for a
 *   reconnect after a stream that was open ended, or after a token refresh).
 * @property {number} [delayMs] Milliseconds until that attempt.
 * @property {number | null} [status] HTTP status the hub answered the failed attempt with
 *   (null when it could not be learned, e.g. the hub was unreachable).
 * @property {{error: string, message: string} | null} [error] The hub's error body, when it sent one.
 * @property {string} [reason] Why the connection closed for good, or why it reconnects.
 * @property {'client' | 'server'} [by] Who closed it for good.
 * @property {string | null} [lastEventId] The id the (re)opened stream resumed after.
 */

/**
 * An event from the hub, as handlers of event types get it.
 * @typedef {object} HeraldEvent
 * @property {string} id The event id ('' when the event had none).
 * @property {string} type The event type ('message' when the event had none).
 * @property {string} data The event data, lines joined with '\n'.
 * @property {MessageEvent} raw A MessageEvent of that type, data and lastEventId.
 */

/**
 * What a `gap` handler gets: the hub could not replay everything after `lastEventId`.
 * @typedef {object} Gap
 * @property {string | null} lastEventId The id the client resumed after.
 * @property {string | null} oldest The oldest id the hub still had, or null.
 */

/**
 * One event as the event-stream parser dispatches it, with the routing lines of `route=1`.
 * @typedef {object} ParsedEvent
 * @property {string} id The last event id in force ('' if none was ever set).
 * @property {string} type
 * @property {string} data
 * @property {string[]} topics The `topic:` lines (where the event was published).
 * @property {boolean} broadcast A `broadcast: 1` line.
 * @property {string | null} user The `user:` line (sent to the connection's own user).
 */

/**
 * A token, or what gives one: called before connecting and again each time the hub refuses the
 * token in use (401, or `herald.close` with `token_expired`).
 * @typedef {string | (() => string | null | Promise<string | null>)} TokenSource
 */

/**
 * @typedef {object} ConnectOptions
 * @property {string | string[]} [topics] Topic selectors (`chat/*`, `news/**`).
 * @property {string} [user] Connect as this user (also receives messages sent to the user).
 * @property {string} [lastEventId] Resume after this id.
 * @property {'all'} [since] Without `lastEventId`, start from the oldest event the hub retains
 *   (default: from now).
 * @property {TokenSource} [token] The subscriber's token.
 * @property {'fetch' | 'eventsource'} [transport] How to hold the stream (default 'fetch' where
 *   the browser can stream a fetch() body, else 'eventsource').
 * @property {boolean} [share] One stream for every tab of this origin with the same hub, user and
 *   token rights (default false; needs the fetch transport).
 * @property {number} [minBackoffMs] Base of the exponential backoff (default 500).
 * @property {number} [maxBackoffMs] Cap of the backoff (default 30000).
 * @property {boolean} [withCredentials] Send cookies to another origin (default false).
 * @property {number} [probeTimeoutMs] EventSource transport: how long to wait for the probe that
 *   tells a 204 or a 401 from other failures (default 5000).
 * @property {typeof EventSource} [EventSource] EventSource constructor (default: the global one).
 * @property {typeof fetch | null} [fetch] fetch (default: the global one; null with the
 *   EventSource transport: no probe, so a 204 is retried like any other failure).
 * @property {() => number} [random] Uniform random number in [0, 1) (default Math.random).
 * @property {{setTimeout: (fn: () => void, ms: number) => any, clearTimeout: (t: any) => void}} [timers]
 */

const CONNECTING = 0;
const CLOSED = 2;
/** Handler names that are not event types. */
const CLIENT_TYPES = new Set(['state', 'gap', '*']);
/** The default reconnect delay of a dropped stream until the hub sends `retry:`. */
const DEFAULT_RETRY_MS = 3000;
/** How long a shared stream waits for more tabs to come or go before it reopens with their topics. */
const SHARE_SETTLE_MS = 30;

/**
 * Full-jitter exponential backoff: a uniform delay in [0, min(maxMs, minMs * 2^attempt)).
 * @param {number} attempt 0 for the first retry.
 * @param {number} minMs
 * @param {number} maxMs
 * @param {() => number} [random]
 * @returns {number} milliseconds
 */
function backoffDelay(attempt, minMs, maxMs, random = Math.random) {
  const ceiling = Math.min(maxMs, minMs * Math.pow(2, Math.max(0, attempt)));
  return Math.floor(random() * ceiling);
}

/**
 * The subscribe URL of a hub: `${base}/events?topic=..&user=..&lastEventId=..`.
 * @param {string} base The hub's base URL, e.g. `https://push.example.com` or `/push`.
 * @param {{topics?: string | string[], user?: string, lastEventId?: string | null,
 *   since?: string | null, route?: boolean, accessToken?: string | null}} params
 * @returns {string}
 */
function eventsUrl(base, params) {
  const topics = params.topics == null ? [] : [].concat(params.topics);
  const query = [];
  for (const t of topics) query.push('topic=' + encodeURIComponent(t));
  if (params.user) query.push('user=' + encodeURIComponent(params.user));
  if (params.lastEventId) query.push('lastEventId=' + encodeURIComponent(params.lastEventId));
  else if (params.since) query.push('since=' + encodeURIComponent(params.since));
  if (params.route) query.push('route=1');
  if (params.accessToken) query.push('access_token=' + encodeURIComponent(params.accessToken));
  const root = String(base).replace(/\/+$/, '');
  return root + '/events' + (query.length ? '?' + query.join('&') : '');
}

/**
 * Whether a topic selector matches a topic, as the hub decides it: `*` is one segment, a last
 * `**` one or more.
 * @param {string} selector
 * @param {string} topic
 * @returns {boolean}
 */
function matches(selector, topic) {
  if (!selector.includes('*')) return selector === topic;
  const want = selector.split('/');
  const have = topic.split('/');
  for (let i = 0; i < want.length; i++) {
    if (want[i] === '**') return have.length > i;
    if (i >= have.length) return false;
    if (want[i] !== '*' && want[i] !== have[i]) return false;
  }
  return have.length === want.length;
}

/**
 * An incremental `text/event-stream` parser following the WHATWG HTML rules: lines end in CRLF, LF
 * or CR (also split across chunks), a leading BOM is dropped, `data:` lines join with LF, `id:`
 * (without NUL) sets the last event id for this and later events, `retry:` takes digits only,
 * comments and unknown fields are ignored, and a blank line dispatches an event unless its data is
 * empty. herald's routing fields (`topic:`, `broadcast:`, `user:`) are kept on the event.
 */
class EventStreamParser {
  /** @param {string | null} [lastEventId] The last event id in force before this stream. */
  constructor(lastEventId = null) {
    this.lastEventId = lastEventId || '';
    /** @type {number | null} The most recent valid `retry:` value. */
    this.retry = null;
    this._pending = '';
    this._skipLf = false;
    this._started = false;
    this._reset();
  }

  _reset() {
    this._data = '';
    this._hasData = false;
    this._type = '';
    /** @type {string[]} */
    this._topics = [];
    this._broadcast = false;
    /** @type {string | null} */
    this._user = null;
  }

  /**
   * Parses as much of `text` as forms whole lines; returns the events it completes.
   * @param {string} text
   * @returns {ParsedEvent[]}
   */
  feed(text) {
    /** @type {ParsedEvent[]} */
    const out = [];
    let s = text;
    if (!this._started && s.length > 0) {
      this._started = true;
      if (s.charCodeAt(0) === 0xfeff) s = s.slice(1);
    }
    if (this._skipLf && s.length > 0) {
      this._skipLf = false;
      if (s[0] === '\n') s = s.slice(1);
    }
    let start = 0;
    for (let i = 0; i < s.length; i++) {
      const c = s[i];
      if (c !== '\n' && c !== '\r') continue;
      const line = this._pending + s.slice(start, i);
      this._pending = '';
      this._line(line, out);
      if (c === '\r') {
        if (i + 1 < s.length) {
          if (s[i + 1] === '\n') i += 1;
        } else {
          this._skipLf = true;
        }
      }
      start = i + 1;
    }
    this._pending += s.slice(start);
    return out;
  }

  /** @param {string} line @param {ParsedEvent[]} out */
  _line(line, out) {
    if (line === '') {
      if (this._hasData) {
        out.push({
          id: this.lastEventId,
          type: this._type || 'message',
          data: this._data,
          topics: this._topics,
          broadcast: this._broadcast,
          user: this._user,
        });
      }
      this._reset();
      return;
    }
    if (line[0] === ':') return;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value[0] === ' ') value = value.slice(1);
    switch (field) {
      case 'data':
        this._data = this._hasData ? this._data + '\n' + value : value;
        this._hasData = true;
        break;
      case 'event':
        this._type = value;
        break;
      case 'id':
        if (!value.includes('\0')) this.lastEventId = value;
        break;
      case 'retry':
        if (/^[0-9]+$/.test(value)) this.retry = Number(value);
        break;
      case 'topic':
        this._topics.push(value);
        break;
      case 'broadcast':
        this._broadcast = value === '1';
        break;
      case 'user':
        this._user = value;
        break;
      default:
        break;
    }
  }
}

/**
 * Whether id `a` comes after id `b` (hub ids are digit strings that increase; anything else
 * is only told apart from the id it equals).
 * @param {string} a
 * @param {string | null} b
 */
function isAfter(a, b) {
  if (!b) return true;
  if (/^[0-9]+$/.test(a) && /^[0-9]+$/.test(b)) {
    return a.length !== b.length ? a.length > b.length : a > b;
  }
  return a !== b;
}

/** @param {TokenSource | undefined} source @returns {Promise<string | null>} */
function readToken(source) {
  if (source == null) return Promise.resolve(null);
  if (typeof source === 'function') return Promise.resolve().then(() => source()).then((t) => t || null);
  return Promise.resolve(String(source));
}

/**
 * What decides a token's rights, so that only tabs with the same rights share a stream: a JWT's
 * claims without its timing (`exp`, `iat`, `nbf`, `jti`), or the whole token if it is not a JWT.
 * @param {string | null} token
 * @returns {string}
 */
function tokenRights(token) {
  if (!token) return '';
  const parts = token.split('.');
  if (parts.length === 3) {
    try {
      const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
      const bytes = Uint8Array.from(atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4)), (c) => c.charCodeAt(0));
      const claims = JSON.parse(new TextDecoder().decode(bytes));
      for (const k of ['exp', 'iat', 'nbf', 'jti']) delete claims[k];
      return 'jwt:' + stableJson(claims);
    } catch {
      // Not a JWT after all: the token itself decides.
    }
  }
  return 'token:' + token;
}

/** JSON with object keys sorted, so equal claims give equal strings. */
function stableJson(v) {
  if (Array.isArray(v)) return '[' + v.map(stableJson).join(',') + ']';
  if (v && typeof v === 'object') {
    return '{' + Object.keys(v).sort().map((k) => JSON.stringify(k) + ':' + stableJson(v[k])).join(',') + '}';
  }
  return JSON.stringify(v);
}

/** The hub's JSON error body, or null. @param {Response} res */
function errorBody(res) {
  return res.text().then(
    (text) => {
      try {
        const body = JSON.parse(text);
        return body && typeof body.error === 'string' ? body : null;
      } catch {
        return null;
      }
    },
    () => null,
  );
}

/** @param {ParsedEvent} ev @returns {MessageEvent | object} */
function rawEvent(ev) {
  const init = { data: ev.data, lastEventId: ev.id };
  return typeof MessageEvent === 'function' ? new MessageEvent(ev.type, init) : { type: ev.type, ...init };
}

/**
 * One stream to the hub through one transport: opens it, reconnects with backoff and the last id,
 * refreshes the token when the hub refuses it, and reports events and states to its owner.
 */
class Stream {
  /**
   * @param {string} base
   * @param {ConnectOptions & {transport: 'fetch' | 'eventsource'}} o
   * @param {{topics: string[], user: string, route: boolean, lastEventId: string | null, since: number | null}} at
   * @param {{event: (ev: ParsedEvent, raw?: MessageEvent) => void, state: (s: State, d: StateDetail) => void,
   *   types: () => Iterable<string>}} sink
   */
  constructor(base, o, at, sink) {
    this._base = base;
    this._o = o;
    this._sink = sink;
    this._topics = at.topics;
    this._user = at.user;
    this._route = at.route;
    /** @type {string | null} */
    this.lastEventId = at.lastEventId;
    /** Date.now() from when events count as this stream's (used while no id was seen yet). */
    this._since = at.since;
    /** @type {string | null | undefined} undefined: to be read from the token source. */
    this._token = undefined;
    this._refusals = 0;
    this._attempt = 0;
    this._retryMs = DEFAULT_RETRY_MS;
    this._gen = 0;
    /** @type {State} */
    this.state = 'connecting';
    /** @type {string[]} The topics of the stream that last opened. */
    this.openTopics = [];
    this.url = '';
    this._es = null;
    this._abort = null;
    this._timer = null;
    this._probe = null;
    this._open();
  }

  get topics() {
    return this._topics;
  }

  /** Reopens with other topics, resuming where the stream was. @param {string[]} topics */
  setTopics(topics) {
    if (this.state === 'closed' || topics.join('\n') === this._topics.join('\n')) return;
    this._topics = topics;
    this._stop();
    this._open();
  }

  /** Listens for one more event type (EventSource transport only). @param {string} type */
  listen(type) {
    if (this._es && type !== 'message' && !CLIENT_TYPES.has(type)) this._listen(this._es, this._gen, type);
  }

  /** @param {StateDetail} detail */
  finish(detail) {
    if (this.state === 'closed') return;
    this._stop();
    this._setState('closed', detail);
  }

  /** @param {State} state @param {StateDetail} [detail] */
  _setState(state, detail = {}) {
    this.state = state;
    this._sink.state(state, detail);
  }

  /** Ends the current attempt (stream, timer, probe) without a state change. */
  _stop() {
    this._gen += 1;
    if (this._es) this._es.close();
    this._es = null;
    if (this._abort) this._abort.abort();
    this._abort = null;
    if (this._timer !== null) this._o.timers.clearTimeout(this._timer);
    this._timer = null;
    if (this._probe) this._probe.abort();
    this._probe = null;
  }

  /** Where the next stream starts: after the last id, or since this stream's start. */
  _position() {
    if (this.lastEventId) return { lastEventId: this.lastEventId, since: null };
    if (this._since === 'all') return { lastEventId: null, since: 'all' };
    if (this._since === null) return { lastEventId: null, since: null };
    return { lastEventId: null, since: Math.max(0, Date.now() - this._since) + 'ms' };
  }

  _open() {
    this._timer = null;
    const gen = ++this._gen;
    const go = (t) => {
      if (gen !== this._gen) return;
      this._token = t;
      if (this._o.transport === 'fetch') this._openFetch(gen, t);
      else this._openEventSource(gen, t);
    };
    const source = this._o.token;
    // Without a token function to call, open at once (in the same task).
    if (this._token !== undefined || source == null || typeof source !== 'function') {
      go(this._token !== undefined ? this._token : source == null ? null : String(source));
      return;
    }
    readToken(source).then(
      go,
      (err) => {
        if (gen !== this._gen) return;
        // The token source failed (e.g. the app's auth endpoint is down): retry like a failure.
        this._failed(null, { error: 'token_unavailable', message: String((err && err.message) || err) });
      },
    );
  }

  _opened() {
    this.openTopics = this._topics;
    this._attempt = 0;
    this._refusals = 0;
    // From now on a reconnect without any id resumes from this moment.
    if (this._since === null) this._since = Date.now();
    this._setState('open', { lastEventId: this.lastEventId });
  }

  /** @param {ParsedEvent} ev @param {MessageEvent} [raw] */
  _event(ev, raw) {
    if (ev.type === 'herald.close') {
      let reason = 'closed by the hub';
      try {
        reason = JSON.parse(ev.data).reason || reason;
      } catch {
        // Keep the default reason.
      }
      if (reason === 'token_expired') this._refused(401, { error: 'token_expired', message: 'the token expired' }, reason);
      else this.finish({ reason, by: 'server' });
      return;
    }
    if (ev.type !== 'herald.gap' && ev.id) this.lastEventId = ev.id;
    this._sink.event(ev, raw);
  }

  /**
   * The hub refused the stream (or the token ran out): decides between reconnecting, refreshing
   * the token and stopping for good.
   * @param {number | null} status
   * @param {{error: string, message: string} | null} error
   * @param {string} [reason]
   */
  _refused(status, error, reason) {
    const why = reason || (error ? `${error.error}: ${error.message}` : `the hub answered ${status}`);
    if (status === 204) {
      this.finish({ reason: 'the hub answered 204 No Content', by: 'server', status });
    } else if (status === 401) {
      this._refusals += 1;
      if (this._refusals >= 2) {
        this.finish({ reason: why, by: 'server', status, error });
        return;
      }
      // Get a fresh token, then reconnect at once from the last id.
      this._stop();
      this._token = undefined;
      this._setState('reconnecting', { attempt: 0, delayMs: 0, status, error, reason: why });
      this._open();
    } else if (status === 400 || status === 403 || status === 404) {
      // Asking again cannot help: a bad selector, a right the token lacks, no such hub.
      this.finish({ reason: why, by: 'server', status, error });
    } else {
      this._failed(status, error);
    }
  }

  /** A failed attempt: retry with backoff. @param {number | null} status @param {object | null} error */
  _failed(status, error) {
    this._stop();
    const delayMs = backoffDelay(this._attempt, this._o.minBackoffMs, this._o.maxBackoffMs, this._o.random);
    this._attempt += 1;
    this._timer = this._o.timers.setTimeout(() => this._open(), delayMs);
    this._setState('reconnecting', { attempt: this._attempt, delayMs, status, error });
  }

  /** An open stream ended: reconnect after the hub's `retry`, as a browser does. */
  _dropped() {
    this._stop();
    const delayMs = this._retryMs;
    this._timer = this._o.timers.setTimeout(() => this._open(), delayMs);
    this._setState('reconnecting', { attempt: 0, delayMs });
  }

  // ---- fetch transport: the token in the Authorization header, every event type -------------

  /** @param {number} gen @param {string | null} token */
  _openFetch(gen, token) {
    const fetchFn = this._o.fetch;
    const pos = this._position();
    this.url = eventsUrl(this._base, {
      topics: this._topics,
      user: this._user,
      lastEventId: pos.lastEventId,
      since: pos.since,
      route: this._route,
    });
    const abort = new AbortController();
    this._abort = abort;
    /** @type {Record<string, string>} */
    const headers = { Accept: 'text/event-stream' };
    if (token) headers.Authorization = 'Bearer ' + token;
    let opened = false;
    Promise.resolve()
      // Called unbound: the browser's fetch throws "Illegal invocation" when `this` is not window.
      .then(() =>
        fetchFn(this.url, {
          headers,
          cache: 'no-store',
          credentials: this._o.withCredentials ? 'include' : 'same-origin',
          signal: abort.signal,
        }),
      )
      .then(async (res) => {
        if (gen !== this._gen) return;
        const type = (res.headers && res.headers.get && res.headers.get('content-type')) || '';
        if (res.status !== 200 || !type.startsWith('text/event-stream') || !res.body) {
          const error = res.status === 200 ? null : await errorBody(res);
          if (gen === this._gen) this._refused(res.status === 200 ? null : res.status, error);
          return;
        }
        opened = true;
        this._opened();
        const parser = new EventStreamParser(this.lastEventId);
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        for (;;) {
          const { done, value } = await reader.read();
          if (gen !== this._gen) {
            reader.cancel().catch(() => {});
            return;
          }
          if (done) break;
          for (const ev of parser.feed(decoder.decode(value, { stream: true }))) {
            this._event(ev);
            if (gen !== this._gen) return;
          }
          if (parser.retry !== null) this._retryMs = parser.retry;
        }
        this._dropped();
      })
      .catch(() => {
        if (gen !== this._gen) return;
        if (opened) this._dropped();
        else this._failed(null, null);
      });
  }

  // ---- EventSource transport: the browser's own reconnect, `access_token` in the URL ---------

  /** @param {number} gen @param {string | null} token */
  _openEventSource(gen, token) {
    const pos = this._position();
    this.url = eventsUrl(this._base, {
      topics: this._topics,
      user: this._user,
      lastEventId: pos.lastEventId,
      since: pos.since,
      route: this._route,
      accessToken: token,
    });
    const es = new this._o.EventSource(this.url, { withCredentials: this._o.withCredentials });
    this._es = es;
    es.addEventListener('open', () => {
      if (this._gen === gen) this._opened();
    });
    es.addEventListener('error', () => this._onEventSourceError(es, gen));
    for (const type of new Set(['herald.gap', 'herald.close', 'message', ...this._sink.types()])) {
      if (!CLIENT_TYPES.has(type)) this._listen(es, gen, type);
    }
  }

  /** @param {EventSource} es @param {number} gen @param {string} type */
  _listen(es, gen, type) {
    es.addEventListener(type, (/** @type {MessageEvent} */ m) => {
      if (this._gen !== gen) return;
      const ev = { id: m.lastEventId || '', type, data: m.data, topics: [], broadcast: false, user: null };
      this._event(ev, m);
    });
  }

  /** @param {EventSource} es @param {number} gen */
  _onEventSourceError(es, gen) {
    if (this._gen !== gen) return;
    if (es.readyState === CONNECTING) {
      // The browser reconnects by itself, sending Last-Event-ID.
      if (this.state !== 'reconnecting') this._setState('reconnecting', { attempt: 0 });
      return;
    }
    if (es.readyState !== CLOSED) return;
    // The browser gave up: a non-200 answer (a 204 or 401 among them) or a refused stream.
    es.close();
    this._es = null;
    this._probeStatus(gen).then(({ status, error }) => {
      if (this._gen !== gen || this.state === 'closed') return;
      this._refused(status, error);
    });
  }

  /**
   * Asks the hub with a plain GET what it answers the stream URL (an EventSource hides it).
   * @param {number} gen
   * @returns {Promise<{status: number | null, error: {error: string, message: string} | null}>}
   */
  _probeStatus(gen) {
    const fetchFn = this._o.fetch;
    if (typeof fetchFn !== 'function') return Promise.resolve({ status: null, error: null });
    const abort = typeof AbortController === 'function' ? new AbortController() : null;
    const timeout = this._o.timers.setTimeout(() => abort && abort.abort(), this._o.probeTimeoutMs);
    this._probe = abort;
    const init = {
      headers: { Accept: 'text/event-stream' },
      cache: 'no-store',
      credentials: this._o.withCredentials ? 'include' : 'same-origin',
    };
    if (abort) init.signal = abort.signal;
    return Promise.resolve()
      .then(() => fetchFn(this.url, init))
      .then(
        async (response) => ({
          status: response.status,
          error: response.status >= 400 && response.text ? await errorBody(response) : null,
        }),
        () => ({ status: null, error: null }),
      )
      .finally(() => {
        this._o.timers.clearTimeout(timeout);
        if (abort) abort.abort();
        if (this._probe === abort && this._gen === gen) this._probe = null;
      });
  }
}

/**
 * A tab's membership of a shared stream. Every tab of the group holds a lock of its own while it
 * is in, and waits for the group's lock; the tab that holds it (the leader) opens the stream with
 * every member's topics and `route=1`, and posts each event on the group's BroadcastChannel. Each
 * tab keeps the newest id it has seen, delivers an event only if it is newer and for its own
 * topics or user, and, when it becomes the leader, resumes from that id: nothing lost, nothing twice.
 */
class Share {
  /** @param {Connection} conn */
  constructor(conn) {
    this._conn = conn;
    this._id = Math.random().toString(36).slice(2) + Date.now().toString(36);
    /** @type {Map<string, string[]>} member id -> its topics */
    this._members = new Map([[this._id, conn._topics]]);
    /** @type {string | null} The newest id seen on the shared stream. */
    this.seen = conn._o.lastEventId || null;
    this._joinedAt = Date.now();
    this.leading = false;
    /** @type {Stream | null} */
    this.stream = null;
    this._abort = new AbortController();
    this._leave = null;
    this._left = new Promise((r) => (this._leave = r));
    this._watched = new Set();
    this._settle = null;
    /** @type {{state: State, detail: StateDetail, topics: string[]} | null} */
    this._leader = null;
    this._join().catch((err) => {
      if (!this._abort.signal.aborted) conn._finish({ reason: `cannot share: ${(err && err.message) || err}`, by: 'client' });
    });
  }

  async _join() {
    const conn = this._conn;
    const locks = typeof navigator !== 'undefined' && navigator.locks;
    if (!locks || typeof BroadcastChannel !== 'function') throw new Error('this browser has no Web Locks or BroadcastChannel');
    const token = await readToken(conn._o.token);
    if (this._abort.signal.aborted) return;
    const hub = new URL(conn._base, typeof location !== 'undefined' ? location.href : undefined).href;
    this._name = 'herald.share:' + JSON.stringify([hub, conn._user, tokenRights(token), conn._o.withCredentials]);
    this._channel = new BroadcastChannel(this._name);
    this._channel.onmessage = (m) => this._message(m.data);
    const signal = this._abort.signal;
    // Hold our member lock for as long as we are in: the leader learns we are gone when it frees.
    await new Promise((held, failed) => {
      locks
        .request(this._memberLock(this._id), { signal }, () => {
          held();
          return this._left;
        })
        .catch(failed);
    });
    this._post({ t: 'hello', from: this._id, topics: conn._topics, ask: true });
    this._showState();
    locks.request(this._name, { signal }, () => this._lead()).catch(() => {});
  }

  /** @param {string} id */
  _memberLock(id) {
    return this._name + '#' + id;
  }

  /** @param {object} m */
  _post(m) {
    if (this._channel && !this._abort.signal.aborted) this._channel.postMessage(m);
  }

  /** All members' topics, sorted, each once. */
  _union() {
    const all = new Set();
    for (const topics of this._members.values()) for (const t of topics) all.add(t);
    return [...all].sort();
  }

  _message(m) {
    if (!m || this._abort.signal.aborted) return;
    switch (m.t) {
      case 'hello':
        this._members.set(m.from, m.topics);
        if (m.ask) this._post({ t: 'hello', from: this._id, topics: this._conn._topics, ask: false });
        if (this.leading) {
          this._watch(m.from);
          this._topicsChanged();
          this._postState();
        }
        break;
      case 'bye':
        this._members.delete(m.from);
        if (this.leading) this._topicsChanged();
        break;
      case 'event':
        this._deliver(m.ev);
        break;
      case 'state':
        this._leader = { state: m.state, detail: m.detail, topics: m.topics };
        if (m.state === 'closed') {
          this._conn._finish(m.detail);
          return;
        }
        this._showState();
        break;
      default:
        break;
    }
  }

  /** A follower's state: the leader's, but open only once the stream carries all our topics. */
  _showState() {
    if (this.leading) return;
    const l = this._leader;
    if (!l) {
      if (this._conn._state !== 'connecting') this._conn._setState('connecting', {});
      return;
    }
    const covered = this._conn._topics.every((t) => l.topics.includes(t));
    const state = l.state === 'open' && !covered ? 'connecting' : l.state;
    if (state !== this._conn._state || state === 'reconnecting') this._conn._setState(state, state === l.state ? l.detail : {});
  }

  _postState() {
    if (this.stream) this._post({ t: 'state', state: this.stream.state, detail: this._lastDetail || {}, topics: this.stream.openTopics });
  }

  /** Watches a member's lock: when we get it, that member is gone (closed or crashed). @param {string} id */
  _watch(id) {
    if (id === this._id || this._watched.has(id)) return;
    this._watched.add(id);
    navigator.locks
      .request(this._memberLock(id), { signal: this._abort.signal }, () => {
        this._watched.delete(id);
        if (this._members.delete(id)) {
          this._post({ t: 'bye', from: id });
          this._topicsChanged();
        }
      })
      .catch(() => {});
  }

  _topicsChanged() {
    if (this._settle !== null) return;
    this._settle = this._conn._o.timers.setTimeout(() => {
      this._settle = null;
      if (this.stream) this.stream.setTopics(this._union());
    }, SHARE_SETTLE_MS);
  }

  /** Runs while this tab holds the group's lock; resolves when it leaves. */
  async _lead() {
    if (this._abort.signal.aborted) return;
    // Members whose lock is free are gone (they crashed with the last leader).
    const held = new Set((await navigator.locks.query()).held.map((l) => l.name));
    for (const id of [...this._members.keys()]) {
      if (id !== this._id && !held.has(this._memberLock(id))) this._members.delete(id);
    }
    if (this._abort.signal.aborted) return;
    this.leading = true;
    for (const id of this._members.keys()) this._watch(id);
    const conn = this._conn;
    this.stream = new Stream(
      conn._base,
      conn._o,
      { topics: this._union(), user: conn._user, route: true, lastEventId: this.seen, since: this._joinedAt },
      {
        event: (ev) => {
          this._post({ t: 'event', ev });
          this._deliver(ev);
        },
        state: (state, detail) => {
          this._lastDetail = detail;
          if (this._abort.signal.aborted) return;
          this._postState();
          if (state === 'closed') conn._finish(detail);
          else conn._setState(state, detail);
        },
        types: () => [],
      },
    );
    await this._left;
  }

  /** Hands an event to this tab if it is new and for it. @param {ParsedEvent} ev */
  _deliver(ev) {
    if (ev.type === 'herald.gap') {
      this._conn._dispatch(ev);
      return;
    }
    if (ev.id) {
      if (!isAfter(ev.id, this.seen)) return;
      this.seen = ev.id;
    }
    const conn = this._conn;
    const mine =
      ev.broadcast ||
      // The stream writes `user:` only before events sent to its own user, which is this group's.
      ev.user !== null ||
      ev.topics.some((t) => conn._topics.some((s) => matches(s, t)));
    if (mine) conn._dispatch(ev);
  }

  /** Leaves the group: the next tab in line takes the stream over. */
  leave() {
    if (this._abort.signal.aborted) return;
    this._post({ t: 'bye', from: this._id });
    this._abort.abort();
    if (this._settle !== null) this._conn._o.timers.clearTimeout(this._settle);
    if (this.stream) this.stream._stop();
    this.leading = false;
    this._leave();
    if (this._channel) this._channel.close();
  }
}

/** A live subscription to a hub; see {@link connect}. */
class Connection {
  /**
   * @param {string} url
   * @param {ConnectOptions} options
   */
  constructor(url, options) {
    const fetchFn = options.fetch === undefined ? globalThis.fetch : options.fetch;
    const canStream =
      typeof fetchFn === 'function' && typeof ReadableStream === 'function' && typeof TextDecoder === 'function';
    const transport = options.transport || (canStream ? 'fetch' : 'eventsource');
    if (transport !== 'fetch' && transport !== 'eventsource') {
      throw new Error(`herald: transport must be 'fetch' or 'eventsource', not '${transport}'`);
    }
    this._o = {
      ...options,
      transport,
      minBackoffMs: options.minBackoffMs ?? 500,
      maxBackoffMs: options.maxBackoffMs ?? 30000,
      withCredentials: !!options.withCredentials,
      probeTimeoutMs: options.probeTimeoutMs ?? 5000,
      EventSource: options.EventSource || globalThis.EventSource,
      fetch: fetchFn,
      random: options.random || Math.random,
      timers: options.timers || {
        setTimeout: (fn, ms) => setTimeout(fn, ms),
        clearTimeout: (t) => clearTimeout(t),
      },
    };
    if (transport === 'eventsource' && typeof this._o.EventSource !== 'function') {
      throw new Error('herald: no EventSource available');
    }
    if (transport === 'fetch' && typeof fetchFn !== 'function') throw new Error('herald: no fetch available');
    if (options.share && transport !== 'fetch') {
      throw new Error("herald: share needs the 'fetch' transport (an EventSource cannot read the routing lines)");
    }
    this._base = url;
    this._topics = [...new Set(options.topics == null ? [] : [].concat(options.topics))].sort();
    this._user = options.user || '';
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
    /** @type {State} */
    this._state = 'connecting';
    /** @type {Stream | null} */
    this._stream = null;
    /** @type {Share | null} */
    this._share = null;
    if (options.share) {
      this._share = new Share(this);
    } else {
      this._stream = new Stream(
        url,
        this._o,
        {
          topics: this._topics,
          user: this._user,
          route: false,
          lastEventId: options.lastEventId || null,
          since: options.since === 'all' ? 'all' : null,
        },
        {
          event: (ev, raw) => this._dispatch(ev, raw),
          state: (state, detail) => this._setState(state, detail),
          types: () => this._handlers.keys(),
        },
      );
    }
  }

  /** The current state. @returns {State} */
  get state() {
    return this._state;
  }

  /** The id of the last event seen, sent as `lastEventId` when reconnecting. @returns {string | null} */
  get lastEventId() {
    if (this._share) return this._share.seen;
    return this._stream ? this._stream.lastEventId : null;
  }

  /** The URL of the current (or last) stream ('' for a tab that shares another tab's). @returns {string} */
  get url() {
    const s = this._stream || (this._share && this._share.stream);
    return s ? s.url : '';
  }

  /** The transport in use. @returns {'fetch' | 'eventsource'} */
  get transport() {
    return this._o.transport;
  }

  /** With `share`: whether this tab holds the shared stream. @returns {boolean} */
  get leader() {
    return !!(this._share && this._share.leading);
  }

  /**
   * Calls `fn` for each event of `type` ('message' for untyped events, '*' for every event), for
   * every `gap`, or on every change of `state` (and each new reconnect attempt). Returns a
   * function that removes it.
   * @param {string} type
   * @param {Function} fn
   * @returns {() => void}
   */
  on(type, fn) {
    if (typeof fn !== 'function') throw new TypeError('herald: handler must be a function');
    let set = this._handlers.get(type);
    if (!set) {
      set = new Set();
      this._handlers.set(type, set);
      if (this._stream) this._stream.listen(type);
    }
    set.add(fn);
    return () => this.off(type, fn);
  }

  /** Removes a handler added with {@link Connection#on}. @param {string} type @param {Function} fn */
  off(type, fn) {
    const set = this._handlers.get(type);
    if (set) set.delete(fn);
  }

  /** Closes the connection for good (with `share`, another tab takes the stream over). */
  close() {
    this._finish({ reason: 'closed by the client', by: 'client' });
  }

  _emit(type, ...args) {
    const set = this._handlers.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (err) {
        // One failing handler must not stop the others nor the connection: report and go on.
        if (typeof globalThis.reportError === 'function') globalThis.reportError(err);
        else console.error(err);
      }
    }
  }

  /** @param {ParsedEvent} ev @param {MessageEvent} [raw] */
  _dispatch(ev, raw) {
    if (this._state === 'closed') return;
    if (ev.type === 'herald.gap') {
      let gap = { lastEventId: null, oldest: null };
      try {
        gap = Object.assign(gap, JSON.parse(ev.data));
      } catch {
        // A malformed gap still tells the client it missed events.
      }
      this._emit('gap', gap);
      return;
    }
    const event = { id: ev.id || '', type: ev.type, data: ev.data, raw: raw || rawEvent(ev) };
    this._emit(ev.type, event);
    this._emit('*', event);
  }

  /** @param {State} state @param {StateDetail} [detail] */
  _setState(state, detail = {}) {
    if (this._state === 'closed') return;
    this._state = state;
    this._emit('state', state, detail);
  }

  /** @param {StateDetail} detail */
  _finish(detail) {
    if (this._state === 'closed') return;
    if (this._stream) this._stream.finish(detail);
    if (this._share) this._share.leave();
    this._setState('closed', detail);
  }
}

/**
 * Why a finite stream ended without completing: `aborted` (the producer broke off), `cancelled`
 * (a `herald.cancel`, or a `herald.complete` with that reason), `gap` (history lost part of it),
 * or the hub's refusal.
 */
class StreamEnded extends Error {
  /** @param {string} reason @param {string} [message] */
  constructor(reason, message) {
    super(message || `herald: the stream ended: ${reason}`);
    this.name = 'StreamEnded';
    this.reason = reason;
  }
}

/** The page's sessionStorage, or null where there is none (Node, a sandboxed frame). */
function sessionStore() {
  try {
    return globalThis.sessionStorage || null;
  } catch {
    return null;
  }
}

/**
 * @typedef {ConnectOptions & {storage?: {getItem(k: string): string | null, setItem(k: string, v: string): void,
 *   removeItem(k: string): void} | null}} StreamOptions
 */

/**
 * One finite stream (an LLM answer, a job's progress) on one topic, as an async iterator of its
 * events. It ends at `herald.complete`, throws a {@link StreamEnded} on `herald.cancel`, on a
 * `herald.complete` with a reason (`aborted`, `cancelled`) and on a gap, and resumes across drops
 * and page reloads: the id of the last event it gave out is kept in `sessionStorage`, so a
 * reloaded page gets only what it has not yet had (keep what you rendered there too). A page
 * that never saw the stream starts from its beginning (`since=all`).
 */
class FiniteStream {
  /** @param {string} url @param {string} topic @param {StreamOptions} [options] */
  constructor(url, topic, options = {}) {
    this.url = url;
    this.topic = topic;
    this._o = options;
    this._storage = options.storage !== undefined ? options.storage : sessionStore();
    this._key = `herald.stream ${url} ${topic}`;
    /** @type {HeraldEvent[]} */
    this._ready = [];
    /** @type {{resolve: Function, reject: Function}[]} */
    this._waiting = [];
    this._done = false;
    /** @type {Error | null} */
    this._error = null;
    const last = this._storage ? this._storage.getItem(this._key) : null;
    const { storage: _storage, ...connectOptions } = options;
    this._conn = connect(url, {
      ...connectOptions,
      topics: [topic],
      lastEventId: last || undefined,
      since: 'all',
    });
    this._conn.on('*', (ev) => this._event(ev));
    this._conn.on('gap', () => this._end(new StreamEnded('gap', 'herald: part of the stream is no longer in the hub\'s history')));
    this._conn.on('state', (state, detail) => {
      if (state !== 'closed' || this._done) return;
      // 204: the hub says the stream was already complete when this page resumed.
      if (detail.status === 204) this._end(null);
      else this._end(new StreamEnded(detail.reason || 'closed', `herald: the stream closed: ${detail.reason || ''}`));
    });
  }

  /**
   * The id of the last event given out, or of the `herald.complete` that ended the stream cleanly
   * (also in sessionStorage). @returns {string | null}
   */
  get lastEventId() {
    return this._storage ? this._storage.getItem(this._key) : this._conn.lastEventId;
  }

  /** @param {HeraldEvent} ev */
  _event(ev) {
    if (this._done) return;
    if (ev.type === 'herald.complete') {
      let reason = null;
      try {
        reason = JSON.parse(ev.data).reason || null;
      } catch {
        // A complete without a readable reason ends the stream normally.
      }
      // A clean end is remembered too: a reloaded page resumes after it and is answered 204,
      // with nothing replayed. An aborted or cancelled end is not, so a reload says so again.
      if (!reason && this._storage && ev.id) this._storage.setItem(this._key, ev.id);
      this._end(reason ? new StreamEnded(reason) : null);
      return;
    }
    if (ev.type === 'herald.cancel') {
      this._end(new StreamEnded('cancelled'));
      return;
    }
    if (this._storage && ev.id) this._storage.setItem(this._key, ev.id);
    const w = this._waiting.shift();
    if (w) w.resolve({ value: ev, done: false });
    else this._ready.push(ev);
  }

  /** @param {Error | null} error */
  _end(error) {
    if (this._done) return;
    this._done = true;
    this._error = error;
    this._conn.close();
    for (const w of this._waiting.splice(0)) {
      if (error) w.reject(error);
      else w.resolve({ value: undefined, done: true });
    }
  }

  /** @returns {Promise<IteratorResult<HeraldEvent>>} */
  next() {
    if (this._ready.length) return Promise.resolve({ value: this._ready.shift(), done: false });
    if (this._done) {
      if (this._error && !this._thrown) {
        this._thrown = true;
        return Promise.reject(this._error);
      }
      return Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) =>
      this._waiting.push({
        resolve,
        reject: (e) => {
          this._thrown = true;
          reject(e);
        },
      }),
    );
  }

  /** Stops following the stream (a `for await` that breaks calls this). */
  return() {
    this._end(null);
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  /**
   * Asks the hub to stop the stream (`POST /cancel`): the producer, on any node, is told at once,
   * and this iterator then throws `StreamEnded('cancelled')`. Resolves with the hub's answer.
   * @param {string} [reason]
   * @returns {Promise<{id: string}>}
   */
  async cancel(reason) {
    const fetchFn = this._o.fetch || globalThis.fetch;
    const query = 'topic=' + encodeURIComponent(this.topic) + (reason ? '&reason=' + encodeURIComponent(reason) : '');
    /** @type {Record<string, string>} */
    const headers = {};
    const token = this._o.token == null ? null : await readToken(this._o.token);
    if (token) headers.Authorization = 'Bearer ' + token;
    const res = await fetchFn(this.url.replace(/\/+$/, '') + '/cancel?' + query, { method: 'POST', headers });
    const body = await res.json().catch(() => null);
    if (!res.ok) throw new StreamEnded('cancel_refused', `herald: cancel answered ${res.status}: ${body && body.message}`);
    return body;
  }
}

/**
 * Follows one finite stream on `topic` at the hub `url`: see {@link FiniteStream}.
 * @param {string} url
 * @param {string} topic
 * @param {StreamOptions} [options]
 * @returns {FiniteStream}
 */
function stream(url, topic, options = {}) {
  return new FiniteStream(url, topic, options);
}

/**
 * Subscribes to the hub at `url` (its base URL, e.g. `https://push.example.com`).
 * @param {string} url
 * @param {ConnectOptions} [options]
 * @returns {Connection}
 */
function connect(url, options = {}) {
  return new Connection(url, options);
}

const herald = { connect, stream, backoffDelay, eventsUrl, matches, EventStreamParser, Connection, FiniteStream, StreamEnded };
if (typeof window !== 'undefined') window.herald = herald;

export { connect, stream, backoffDelay, eventsUrl, matches, EventStreamParser, Connection, FiniteStream, StreamEnded };
