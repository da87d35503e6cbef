// Types shared by the client and its transports; not part of the public API.

import type { Backoff } from './backoff.js';
import type { Filter, JsonObject, ResetInfo, StromEvent, SubscribeOptions, SubscribedInfo } from './types.js';

/** One local `subscribe()` call. */
export interface Member {
  options: SubscribeOptions<JsonObject>;
}

/**
 * One subscription on the server, serving one or more local members with the
 * same collection, record and filter. It keeps the resume position.
 */
export interface Channel {
  readonly id: number;
  /** Equal for subscriptions that may share one server subscription. */
  readonly key: string;
  /** False when created with an explicit `since` (such a replay is its own). */
  readonly shareable: boolean;
  readonly collection: string;
  readonly recordId: string | null;
  readonly filter: Filter | null;
  readonly echo: boolean;
  /** The highest seq delivered (or the `since` asked for); events at or below it are duplicates. */
  lastSeq: number | null;
  /**
   * `*` over several NATS streams: the seq per stream (from the server's
   * position token, and each event's `partition`), in place of `lastSeq`.
   */
  positions: number[] | null;
  /**
   * The server's head seq when the channel first became live: where to resume
   * from if it never received an event. Not used to drop events.
   */
  baselineSeq: number | null;
  /** Live on the server right now. */
  live: boolean;
  lastInfo: SubscribedInfo | null;
  readonly members: Set<Member>;
}

/** The resume position of a channel, if it has one. */
export function resumePosition(channel: Channel): number | string | null {
  if (channel.positions !== null) return Array.from(channel.positions, (seq) => seq ?? 0).join(',');
  return channel.lastSeq ?? channel.baselineSeq;
}

/** A seq, or a position token, as the server sent it (0 when missing). */
export function position(value: unknown): number | string {
  return typeof value === 'string' ? value : Number(value ?? 0);
}

/** A position token (`"12,0,40"`) as one seq per stream, or null if it is none. */
export function parsePositions(token: unknown): number[] | null {
  if (typeof token !== 'string' || !/^\d+(,\d+)+$/.test(token)) return null;
  return token.split(',').map(Number);
}

/** Does this event belong to this channel (collection and record)? */
export function channelMatches(channel: Channel, event: { collection: string; record_id: string | null }): boolean {
  if (channel.collection !== '*' && channel.collection !== event.collection) return false;
  return channel.recordId === null || channel.recordId === event.record_id;
}

/** What a transport needs from the client. */
export interface TransportHost {
  readonly httpBase: string;
  readonly userId: string | undefined;
  readonly userName: string | undefined;
  readonly heartbeatTimeoutMs: number;
  readonly fetch: typeof fetch;
  resolveToken(): Promise<string | null>;
  newBackoff(): Backoff;
  deliver(channel: Channel, event: StromEvent): void;
  reset(channel: Channel, info: ResetInfo): void;
  subscribed(channel: Channel, info: SubscribedInfo): void;
  /** A permanent error removes the channel and its members. */
  channelError(channel: Channel, error: Error, permanent: boolean): void;
  /** An error not tied to one subscription. */
  error(error: Error): void;
  stateChanged(): void;
}

export type TransportState = 'connecting' | 'connected' | 'reconnecting';

export interface Transport {
  readonly kind: 'websocket' | 'sse';
  start(): void;
  stop(): void;
  add(channel: Channel): void;
  remove(channel: Channel): void;
  /** Presents a new token to the server (WebSocket `auth`; SSE reopens its streams). */
  authenticate(token: string | null): Promise<void>;
  /** A channel message over the transport's own connection; null when it cannot (then REST is used). */
  broadcast?(channel: string, data: Record<string, unknown>): Promise<number> | null;
  state(): TransportState;
}

/** Calls a user callback; an exception in it goes to `report`, not up the stack. */
export function safeCall<A extends unknown[]>(report: (error: Error) => void, fn: ((...args: A) => void) | undefined, ...args: A): void {
  if (!fn) return;
  try {
    fn(...args);
  } catch (error) {
    report(error instanceof Error ? error : new Error(String(error)));
  }
}
