/**
 * The event types strom delivers: the eight of records, collections and
 * presence, and `broadcast` (a message on a channel).
 */
export const EVENT_TYPES = [
  'record.created',
  'record.updated',
  'record.deleted',
  'collection.created',
  'collection.updated',
  'collection.deleted',
  'user.joined',
  'user.left',
  'broadcast',
] as const;

export type EventType = (typeof EVENT_TYPES)[number];

/** A JSON object, as carried by an event's `data` and `old_data`. */
export type JsonObject = Record<string, unknown>;

/**
 * One event, as every transport of strom delivers it.
 *
 * `seq` is the event's position in the server's log. It increases over all
 * collections, so the last `seq` received is the position to resume from.
 * Presence events (`user.joined`, `user.left`) are not part of the log and
 * carry `seq: 0`.
 */
export interface StromEvent<T extends JsonObject = JsonObject> {
  type: EventType;
  collection: string;
  /** The record's id; null when the event has none (e.g. a `broadcast`). */
  record_id: string | null;
  data: T;
  old_data: T | null;
  /** RFC 3339. */
  timestamp: string;
  seq: number;
  /**
   * Present (true) on a `record.updated` whose old version matched the
   * subscription's filter and whose new version does not: the record left
   * the live query.
   */
  left_filter?: boolean;
  /** The publisher's user id, set by the server when the publisher was authenticated. */
  sender?: string;
  /** On a `broadcast`: its channel (the same as `collection`). */
  channel?: string;
  /** A stable id of the change, when the source has one (e.g. `pg:<lsn>` from Postgres capture). */
  id?: string;
  /**
   * The NATS stream the event is in, when the server spreads collections
   * over several (`--nats-partitions`); `seq` counts within it. The client
   * keeps a `*` subscription's resume position per stream from it.
   */
  partition?: number;
}

/** What to publish: `seq` is assigned by the server; `timestamp` is optional. */
export interface PublishEvent<T extends JsonObject = JsonObject> {
  type: EventType;
  collection: string;
  record_id?: string;
  data?: T;
  old_data?: T | null;
  timestamp?: string;
}

/**
 * A subscription filter: the text form (`'price > 100 && status = "live"'`)
 * or the object shorthand (`{published: true, tag: ['a', 'b']}`).
 */
export type Filter = string | JsonObject;

export type ConnectionState = 'connecting' | 'connected' | 'reconnecting' | 'disconnected';

export type TransportKind = 'websocket' | 'sse' | 'auto';

/** A token, or a function the client calls whenever it needs one. */
export type TokenSource = string | (() => string | Promise<string>);

export interface BackoffOptions {
  /** The cap of the first retry's delay, in ms (default 500). */
  baseMs?: number;
  /** The largest delay, in ms (default 30 000). */
  maxMs?: number;
}

/** The parts of the standard WebSocket that the client uses. */
export interface WebSocketLike {
  readonly readyState: number;
  // Handler parameters are `any` so that both the DOM class and the `ws`
  // package's class fit this shape.
  /* eslint-disable @typescript-eslint/no-explicit-any */
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  /* eslint-enable @typescript-eslint/no-explicit-any */
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketFactory = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface StromClientOptions {
  /** The server, e.g. `http://localhost:8000` (`ws://` and `https://` work too). */
  url: string;
  /** A JWT, or a function returning one; it is called again on every reconnect. */
  token?: TokenSource | null;
  /**
   * `websocket`, `sse` (one `fetch` stream per subscription), or `auto`
   * (default): WebSocket, falling back to SSE when no WebSocket is available
   * or it cannot connect while plain HTTP works.
   */
  transport?: TransportKind;
  /** Presence identity of an anonymous client (honored by servers in open mode). */
  userId?: string;
  userName?: string;
  /** Reconnect delays: exponential with full jitter. */
  backoff?: BackoffOptions;
  /**
   * The WebSocket class. Defaults to `globalThis.WebSocket`; on Node 20 pass
   * the `ws` package's class.
   */
  WebSocket?: WebSocketFactory;
  /** The fetch function (defaults to `globalThis.fetch`). */
  fetch?: typeof fetch;
  /** Connect when constructed (default true); otherwise call `connect()`. */
  autoConnect?: boolean;
  /**
   * A WebSocket that receives nothing for this long is considered dead and
   * replaced (default 75 000 ms; the server pings every 30 s). 0 turns it off.
   */
  heartbeatTimeoutMs?: number;
  /**
   * With a token function: fetch a new token this long before the current
   * one's `exp` and send it with the `auth` action (default 30 000 ms).
   */
  tokenRefreshMarginMs?: number;
}

export interface ResetInfo {
  collection: string;
  /**
   * The resume position that asked for events no longer retained (a
   * position token for `*` over several NATS streams, see `since`).
   */
  since: number | string;
  /** The oldest event still retained; the replay goes on from it (a token likewise). */
  firstAvailableSeq: number | string;
}

export interface SubscribedInfo {
  collection: string;
  /** True when this (re)subscription resumed from an earlier position. */
  resumed: boolean;
  /** The position the server resumed from, if any. */
  since: number | string | null;
  /** The server's head seq when the subscription became live (WebSocket only). */
  headSeq: number | null;
}

export interface SubscribeOptions<T extends JsonObject = JsonObject> {
  filter?: Filter | null;
  /** Only this record's events. */
  recordId?: string | null;
  /**
   * Start with the retained events after this seq (`0`: everything
   * retained). For `*` on a server that spreads collections over several
   * NATS streams: a position token, one seq per stream (`"12,0,40"`).
   */
  since?: number | string | null;
  /**
   * Channels: also receive the messages this connection broadcast itself
   * (WebSocket only; the server leaves them out by default).
   */
  echo?: boolean;
  onEvent: (event: StromEvent<T>) => void;
  /** The resume position is older than what the server retains: reload state. */
  onReset?: (info: ResetInfo) => void;
  /** The server refused the subscription, or the transport failed for it. */
  onError?: (error: Error) => void;
  /** The subscription is live (again): after the first subscribe and after every reconnect. */
  onSubscribed?: (info: SubscribedInfo) => void;
}

export interface PresenceUser {
  user_id: string;
  user_name: string | null;
  connections: number;
  last_seen: string;
}

export interface PresenceSnapshot {
  users: PresenceUser[];
  count: number;
  channel: string | null;
}

/** `data` of a `user.joined` / `user.left` event. */
export interface PresenceData extends JsonObject {
  user_id: string;
  user_name: string | null;
  connections: number;
  last_seen: string;
  channel: string | null;
}

export type PresenceEvent = StromEvent<PresenceData>;
