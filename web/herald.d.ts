// herald.d.ts: TypeScript types of herald.js, the browser client of a herald hub.
// Import from the module: `import { connect } from 'https://push.example.com/herald.js'`.

/** Connection states, in the order a connection usually goes through them. */
export type State = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** What a `state` handler gets besides the new state. */
export interface StateDetail {
  /**
   * Reconnect attempt about to be made (1 for the first failed one; 0 after an open stream ended,
   * after a token refresh, or when the browser's EventSource retries itself).
   */
  attempt?: number;
  /** Milliseconds until that attempt. */
  delayMs?: number;
  /** HTTP status of the failed attempt, or null when it could not be learned. */
  status?: number | null;
  /** The hub's JSON error body, when it sent one. */
  error?: HubError | null;
  /** Why the connection closed for good (or why it reconnects, e.g. 'token_expired'). */
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
  /** A MessageEvent of that type, data and lastEventId (the native one with EventSource). */
  raw: MessageEvent;
}

/** A hub's error answer. */
export interface HubError {
  /** A stable code such as 'invalid_token', 'forbidden_selector', 'at_capacity'. */
  error: string;
  message: string;
}

/** One event as {@link EventStreamParser} dispatches it, with herald's routing lines (`route=1`). */
export interface ParsedEvent {
  /** The last event id in force ('' if none was ever set). */
  id: string;
  type: string;
  data: string;
  /** The `topic:` lines: the topics the event was published to. */
  topics: string[];
  /** A `broadcast: 1` line. */
  broadcast: boolean;
  /** The `user:` line: the event was sent to the stream's own user. */
  user: string | null;
}

/**
 * A token, or what gives one: called before connecting and again each time the hub refuses the
 * token in use (a 401, or `herald.close` with `token_expired`).
 */
export type TokenSource = string | (() => string | null | Promise<string | null>);

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
  /** Resume after this id (with `share`, only for the tab that opens the shared stream). */
  lastEventId?: string;
  /** Without `lastEventId`, start from the oldest event the hub retains (default: from now). */
  since?: 'all';
  /** The subscriber's token (`Authorization: Bearer` with fetch, `access_token` with EventSource). */
  token?: TokenSource;
  /**
   * 'fetch' (the default where fetch() bodies stream): every event type, the token in a header.
   * 'eventsource': the browser's EventSource.
   */
  transport?: 'fetch' | 'eventsource';
  /**
   * One stream for every tab of this origin with the same hub, user and token rights
   * (Web Locks + BroadcastChannel). Default false; needs the fetch transport.
   */
  share?: boolean;
  /** Base of the exponential backoff (default 500). */
  minBackoffMs?: number;
  /** Cap of the backoff (default 30000). */
  maxBackoffMs?: number;
  /** Send cookies to another origin (default false). */
  withCredentials?: boolean;
  /** EventSource transport: how long to wait for the probe that learns a refused stream's status (default 5000). */
  probeTimeoutMs?: number;
  /** EventSource constructor (default: the global one). */
  EventSource?: typeof EventSource;
  /** fetch (default: the global one; with EventSource, null means no probe). */
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
  /** The URL of the current (or last) stream ('' in a tab that shares another tab's). */
  readonly url: string;
  /** The transport in use. */
  readonly transport: 'fetch' | 'eventsource';
  /** With `share`: whether this tab holds the shared stream. */
  readonly leader: boolean;
  /** Every change of state, and each new reconnect attempt. Returns a function that removes it. */
  on(type: 'state', fn: (state: State, detail: StateDetail) => void): () => void;
  /** The hub could not replay everything missed. */
  on(type: 'gap', fn: (gap: Gap) => void): () => void;
  /** Events of one type; 'message' for events without a type; '*' for every event. */
  on(type: string, fn: (event: HeraldEvent) => void): () => void;
  off(type: string, fn: (...args: any[]) => void): void;
  /** Closes the connection for good (with `share`, another tab takes the stream over). */
  close(): void;
}

/** Why a finite stream ended without completing. */
export declare class StreamEnded extends Error {
  /** 'aborted', 'cancelled', 'gap', or the reason the hub closed the stream. */
  readonly reason: string;
}

/** Options of {@link stream}: those of `connect`, and where the last id is kept. */
export interface StreamOptions extends ConnectOptions {
  /** Where the last id is kept across reloads (default: sessionStorage; null: nowhere). */
  storage?: Pick<Storage, 'getItem' | 'setItem' | 'removeItem'> | null;
}

/**
 * One finite stream (an LLM answer, a job's progress) as an async iterator of its events: ends at
 * `herald.complete`, throws StreamEnded on `herald.cancel`, on an `aborted`/`cancelled` complete
 * and on a gap; resumes across drops and reloads from the last id in sessionStorage.
 */
export declare class FiniteStream implements AsyncIterableIterator<HeraldEvent> {
  private constructor(url: string, topic: string, options?: StreamOptions);
  readonly url: string;
  readonly topic: string;
  /** The id of the last event given out, or of the `herald.complete` that ended it cleanly. */
  readonly lastEventId: string | null;
  next(): Promise<IteratorResult<HeraldEvent>>;
  return(): Promise<IteratorResult<HeraldEvent>>;
  [Symbol.asyncIterator](): FiniteStream;
  /** `POST /cancel` on the topic: the producer stops; this iterator then throws StreamEnded('cancelled'). */
  cancel(reason?: string): Promise<{ id: string }>;
}

/** Follows one finite stream on `topic` at the hub `url`. */
export declare function stream(url: string, topic: string, options?: StreamOptions): FiniteStream;

/** The WHATWG event-stream parser herald.js reads fetch() streams with. */
export declare class EventStreamParser {
  /** @param lastEventId The last event id in force before this stream (a reconnect). */
  constructor(lastEventId?: string | null);
  /** The last event id in force. */
  lastEventId: string;
  /** The most recent valid `retry:` value, or null. */
  retry: number | null;
  /** Parses as much of `text` as forms whole lines; returns the events it completes. */
  feed(text: string): ParsedEvent[];
}

/** Whether a topic selector matches a topic, as the hub decides it. */
export declare function matches(selector: string, topic: string): boolean;

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
  params: {
    topics?: string | string[];
    user?: string;
    lastEventId?: string | null;
    since?: string | null;
    route?: boolean;
    accessToken?: string | null;
  },
): string;

declare global {
  interface Window {
    /** Set by herald.js (module or classic script `herald.global.js`). */
    herald: {
      connect: typeof connect;
      stream: typeof stream;
      backoffDelay: typeof backoffDelay;
      eventsUrl: typeof eventsUrl;
      matches: typeof matches;
      EventStreamParser: typeof EventStreamParser;
      Connection: typeof Connection;
      FiniteStream: typeof FiniteStream;
      StreamEnded: typeof StreamEnded;
    };
  }
}
