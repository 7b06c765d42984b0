// herald.d.ts: TypeScript types of herald.js, the browser client of a herald hub.
// Import from the module: `import { connect } from 'https://push.example.com/herald.js'`.

/** Connection states, in the order a connection usually goes through them. */
export type State = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** What a `state` handler gets besides the new state. */
export interface StateDetail {
  /** Reconnect attempt about to be made (1 for the first; 0 when the browser retries itself). */
  attempt?: number;
  /** Milliseconds until that attempt. */
  delayMs?: number;
  /** HTTP status of the failed attempt, or null when it could not be learned. */
  status?: number | null;
  /** Why the connection closed for good. */
  reason?: string;
  /** Who closed it for good. */
  by?: 'client' | 'server';
  /** The id the (re)opened stream resumed after. */
  lastEventId?: string | null;
}

/** An event from the hub, as handlers of event types get it. */
export interface HeraldEvent {
  /** The event id ('' when the event had none). */
  id: string;
  /** The event type ('message' when the event had none). */
  type: string;
  /** The event data, lines joined with '\n'. */
  data: string;
  /** The native event. */
  raw: MessageEvent;
}

/** The hub could not replay everything after `lastEventId`. */
export interface Gap {
  lastEventId: string | null;
  /** The oldest id the hub still had, or null. */
  oldest: string | null;
}

export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(timer: unknown): void;
}

export interface ConnectOptions {
  /** Topic selectors (`chat/*`, `news/**`). */
  topics?: string | string[];
  /** Connect as this user (also receives messages sent to the user). */
  user?: string;
  /** Resume after this id. */
  lastEventId?: string;
  /** Base of the exponential backoff (default 500). */
  minBackoffMs?: number;
  /** Cap of the backoff (default 30000). */
  maxBackoffMs?: number;
  /** Send cookies to another origin (default false). */
  withCredentials?: boolean;
  /** How long to wait for the probe that tells a 204 from other failures (default 5000). */
  probeTimeoutMs?: number;
  /** EventSource constructor (default: the global one). */
  EventSource?: typeof EventSource;
  /** fetch used for the probe (default: the global one; null: no probe). */
  fetch?: typeof fetch | null;
  /** Uniform random number in [0, 1) (default Math.random). */
  random?: () => number;
  timers?: Timers;
}

/** A live subscription to a hub. */
export declare class Connection {
  private constructor(url: string, options: ConnectOptions);
  /** The current state. */
  readonly state: State;
  /** The id of the last event seen, sent as `lastEventId` when reconnecting. */
  readonly lastEventId: string | null;
  /** The URL of the current (or last) stream. */
  readonly url: string;
  /** Every change of state, and each new reconnect attempt. Returns a function that removes it. */
  on(type: 'state', fn: (state: State, detail: StateDetail) => void): () => void;
  /** The hub could not replay everything missed. */
  on(type: 'gap', fn: (gap: Gap) => void): () => void;
  /** Events of one type; 'message' for events without a type. */
  on(type: string, fn: (event: HeraldEvent) => void): () => void;
  off(type: string, fn: (...args: any[]) => void): void;
  /** Closes the connection for good. */
  close(): void;
}

/** Subscribes to the hub at `url` (its base URL, e.g. `https://push.example.com`). */
export declare function connect(url: string, options?: ConnectOptions): Connection;

/** Full-jitter exponential backoff: uniform in [0, min(maxMs, minMs * 2^attempt)). */
export declare function backoffDelay(
  attempt: number,
  minMs: number,
  maxMs: number,
  random?: () => number,
): number;

/** The subscribe URL of a hub. */
export declare function eventsUrl(
  base: string,
  params: { topics?: string | string[]; user?: string; lastEventId?: string | null },
): string;

declare global {
  interface Window {
    /** Set by herald.js (module or classic script `herald.global.js`). */
    herald: {
      connect: typeof connect;
      backoffDelay: typeof backoffDelay;
      eventsUrl: typeof eventsUrl;
      Connection: typeof Connection;
    };
  }
}
