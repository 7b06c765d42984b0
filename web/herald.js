// herald.js: the browser client of a herald hub. A dependency-free ES module around the native
// EventSource that resumes by last event id, reconnects with backoff when the browser gives up,
// surfaces herald.gap, and stops for good on herald.close or a 204 answer.

/**
 * Connection states, in the order a connection usually goes through them.
 * @typedef {'connecting' | 'open' | 'reconnecting' | 'closed'} State
 */

/**
 * What a `state` handler gets besides the new state.
 * @typedef {object} StateDetail
 * @property {number} [attempt] Reconnect attempt about to be made (1 for the first).
 * @property {number} [delayMs] Milliseconds until that attempt.
 * @property {number | null} [status] HTTP status the hub answered the failed attempt with
 *   (null when it could not be learned, e.g. the hub was unreachable).
 * @property {string} [reason] Why the connection closed for good.
 * @property {'client' | 'server'} [by] Who closed it for good.
 * @property {string | null} [lastEventId] The id the (re)opened stream resumed after.
 */

/**
 * An event from the hub, as handlers of event types get it.
 * @typedef {object} HeraldEvent
 * @property {string} id The event id ('' when the event had none).
 * @property {string} type The event type ('message' when the event had none).
 * @property {string} data The event data, lines joined with '\n'.
 * @property {MessageEvent} raw The native event.
 */

/**
 * What a `gap` handler gets: the hub could not replay everything after `lastEventId`.
 * @typedef {object} Gap
 * @property {string | null} lastEventId The id the client resumed after.
 * @property {string | null} oldest The oldest id the hub still had, or null.
 */

/**
 * @typedef {object} ConnectOptions
 * @property {string | string[]} [topics] Topic selectors (`chat/*`, `news/**`).
 * @property {string} [user] Connect as this user (also receives messages sent to the user).
 * @property {string} [lastEventId] Resume after this id.
 * @property {number} [minBackoffMs] Base of the exponential backoff (default 500).
 * @property {number} [maxBackoffMs] Cap of the backoff (default 30000).
 * @property {boolean} [withCredentials] Send cookies to another origin (default false).
 * @property {number} [probeTimeoutMs] How long to wait for the probe that tells a 204 from other
 *   failures (default 5000).
 * @property {typeof EventSource} [EventSource] EventSource constructor (default: the global one).
 * @property {typeof fetch | null} [fetch] fetch used for the probe (default: the global one;
 *   null: no probe, so a 204 is retried like any other failure).
 * @property {() => number} [random] Uniform random number in [0, 1) (default Math.random).
 * @property {{setTimeout: (fn: () => void, ms: number) => any, clearTimeout: (t: any) => void}} [timers]
 */

const CONNECTING = 0;
const CLOSED = 2;
const CLIENT_TYPES = new Set(['state', 'gap']);

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
 * @param {{topics?: string | string[], user?: string, lastEventId?: string | null}} params
 * @returns {string}
 */
function eventsUrl(base, params) {
  const topics = params.topics == null ? [] : [].concat(params.topics);
  const query = [];
  for (const t of topics) query.push('topic=' + encodeURIComponent(t));
  if (params.user) query.push('user=' + encodeURIComponent(params.user));
  if (params.lastEventId) query.push('lastEventId=' + encodeURIComponent(params.lastEventId));
  const root = String(base).replace(/\/+$/, '');
  return root + '/events' + (query.length ? '?' + query.join('&') : '');
}

/** A live subscription to a hub; see {@link connect}. */
class Connection {
  /**
   * @param {string} url
   * @param {ConnectOptions} options
   */
  constructor(url, options) {
    this._base = url;
    this._topics = options.topics == null ? [] : [].concat(options.topics);
    this._user = options.user || '';
    /** @type {string | null} */
    this._lastEventId = options.lastEventId || null;
    this._minBackoff = options.minBackoffMs ?? 500;
    this._maxBackoff = options.maxBackoffMs ?? 30000;
    this._withCredentials = !!options.withCredentials;
    this._probeTimeout = options.probeTimeoutMs ?? 5000;
    this._ES = options.EventSource || globalThis.EventSource;
    this._fetch = options.fetch === undefined ? globalThis.fetch : options.fetch;
    this._random = options.random || Math.random;
    this._timers = options.timers || {
      setTimeout: (fn, ms) => setTimeout(fn, ms),
      clearTimeout: (t) => clearTimeout(t),
    };
    if (typeof this._ES !== 'function') throw new Error('herald: no EventSource available');
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
    /** @type {State} */
    this._state = 'connecting';
    this._attempt = 0;
    this._es = null;
    this._timer = null;
    this._probe = null;
    this._url = '';
    this._open();
  }

  /** The current state. @returns {State} */
  get state() {
    return this._state;
  }

  /** The id of the last event seen, sent as `lastEventId` when reconnecting. @returns {string | null} */
  get lastEventId() {
    return this._lastEventId;
  }

  /** The URL of the current (or last) stream. @returns {string} */
  get url() {
    return this._url;
  }

  /**
   * Calls `fn` for each event of `type` ('message' for untyped events), for every `gap`, or on
   * every change of `state` (and each new reconnect attempt). Returns a function that removes it.
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
      if (this._es && type !== 'message' && !CLIENT_TYPES.has(type)) this._listen(this._es, type);
    }
    set.add(fn);
    return () => this.off(type, fn);
  }

  /** Removes a handler added with {@link Connection#on}. @param {string} type @param {Function} fn */
  off(type, fn) {
    const set = this._handlers.get(type);
    if (set) set.delete(fn);
  }

  /** Closes the connection for good. */
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

  /** @param {State} state @param {StateDetail} [detail] */
  _setState(state, detail = {}) {
    this._state = state;
    this._emit('state', state, detail);
  }

  _open() {
    this._timer = null;
    this._url = eventsUrl(this._base, {
      topics: this._topics,
      user: this._user,
      lastEventId: this._lastEventId,
    });
    const es = new this._ES(this._url, { withCredentials: this._withCredentials });
    this._es = es;
    es.addEventListener('open', () => {
      if (this._es !== es) return;
      this._attempt = 0;
      this._setState('open', { lastEventId: this._lastEventId });
    });
    es.addEventListener('error', () => this._onError(es));
    es.addEventListener('herald.gap', (ev) => {
      if (this._es !== es) return;
      let gap = { lastEventId: null, oldest: null };
      try {
        gap = Object.assign(gap, JSON.parse(ev.data));
      } catch {
        // A malformed gap still tells the client it missed events.
      }
      this._emit('gap', gap);
    });
    es.addEventListener('herald.close', (ev) => {
      if (this._es !== es) return;
      let reason = 'closed by the hub';
      try {
        reason = JSON.parse(ev.data).reason || reason;
      } catch {
        // Keep the default reason.
      }
      this._finish({ reason, by: 'server' });
    });
    this._listen(es, 'message');
    for (const type of this._handlers.keys()) {
      if (type !== 'message' && !CLIENT_TYPES.has(type)) this._listen(es, type);
    }
  }

  /** @param {EventSource} es @param {string} type */
  _listen(es, type) {
    es.addEventListener(type, (/** @type {MessageEvent} */ ev) => {
      if (this._es !== es) return;
      if (ev.lastEventId) this._lastEventId = ev.lastEventId;
      this._emit(type, { id: ev.lastEventId || '', type, data: ev.data, raw: ev });
    });
  }

  /** @param {EventSource} es */
  _onError(es) {
    if (this._es !== es) return;
    if (es.readyState === CONNECTING) {
      // The browser reconnects by itself, sending Last-Event-ID.
      if (this._state !== 'reconnecting') this._setState('reconnecting', { attempt: 0 });
      return;
    }
    if (es.readyState !== CLOSED) return;
    // The browser gave up: a non-200 answer (a 204 among them) or a refused stream.
    es.close();
    this._es = null;
    this._probeStatus().then((status) => {
      if (this._state === 'closed' || this._es !== null || this._timer !== null) return;
      if (status === 204) {
        this._finish({ reason: 'the hub answered 204 No Content', by: 'server', status });
        return;
      }
      const delayMs = backoffDelay(this._attempt, this._minBackoff, this._maxBackoff, this._random);
      this._attempt += 1;
      this._timer = this._timers.setTimeout(() => this._open(), delayMs);
      this._setState('reconnecting', { attempt: this._attempt, delayMs, status });
    });
  }

  /**
   * Asks the hub with a plain GET what it answers the stream URL, then drops the body.
   * @returns {Promise<number | null>}
   */
  _probeStatus() {
    const fetchFn = this._fetch;
    if (typeof fetchFn !== 'function') return Promise.resolve(null);
    const abort = typeof AbortController === 'function' ? new AbortController() : null;
    const timeout = this._timers.setTimeout(() => abort && abort.abort(), this._probeTimeout);
    this._probe = abort;
    const init = {
      headers: { Accept: 'text/event-stream' },
      cache: 'no-store',
      credentials: this._withCredentials ? 'include' : 'same-origin',
    };
    if (abort) init.signal = abort.signal;
    return Promise.resolve()
      // Called unbound: the browser's fetch throws "Illegal invocation" when `this` is not window.
      .then(() => fetchFn(this._url, init))
      .then(
        (response) => response.status,
        () => null,
      )
      .finally(() => {
        this._timers.clearTimeout(timeout);
        if (abort) abort.abort();
        if (this._probe === abort) this._probe = null;
      });
  }

  /** @param {StateDetail} detail */
  _finish(detail) {
    if (this._state === 'closed') return;
    if (this._es) this._es.close();
    this._es = null;
    if (this._timer !== null) this._timers.clearTimeout(this._timer);
    this._timer = null;
    if (this._probe) this._probe.abort();
    this._setState('closed', detail);
  }
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

const herald = { connect, backoffDelay, eventsUrl, Connection };
if (typeof window !== 'undefined') window.herald = herald;

export { connect, backoffDelay, eventsUrl, Connection };
