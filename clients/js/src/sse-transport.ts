// The SSE transport: GET /api/v1/realtime[/{collection}], read with `fetch`
// streaming (so it runs in browsers and in Node, and can send an
// Authorization header, which EventSource cannot). A stream carries one
// subscription, so each channel gets its own stream, resumed with `since=`.

import type { Backoff } from './backoff.js';
import { StromError, errorFromBody } from './errors.js';
import { filterToText } from './filter.js';
import {
  type Channel, type Transport, type TransportHost, type TransportState,
  channelMatches, parsePositions, position, resumePosition,
} from './internal.js';
import { SseParser, type SseMessage } from './sse-parser.js';
import { EVENT_TYPES, type StromEvent } from './types.js';

const EVENT_NAMES = new Set<string>(EVENT_TYPES);

export class SseTransport implements Transport {
  readonly kind = 'sse';
  private readonly streams = new Map<Channel, Stream>();
  private running = false;

  constructor(readonly host: TransportHost) {}

  start(): void {
    if (this.running) return;
    this.running = true;
    for (const stream of this.streams.values()) stream.start();
    this.host.stateChanged();
  }

  stop(): void {
    this.running = false;
    for (const stream of this.streams.values()) stream.close();
    this.streams.clear();
  }

  add(channel: Channel): void {
    if (this.streams.has(channel)) return;
    const stream = new Stream(this.host, channel);
    this.streams.set(channel, stream);
    if (this.running) stream.start();
    this.host.stateChanged();
  }

  remove(channel: Channel): void {
    const stream = this.streams.get(channel);
    if (!stream) return;
    this.streams.delete(channel);
    stream.close();
    this.host.stateChanged();
  }

  /** SSE has no `auth` message: each stream reopens (and resumes) with the new token. */
  async authenticate(): Promise<void> {
    for (const stream of this.streams.values()) stream.restart();
  }

  state(): TransportState {
    const phases = [...this.streams.values()].map((s) => s.phase());
    if (phases.includes('reconnecting')) return 'reconnecting';
    if (phases.includes('connecting')) return 'connecting';
    return 'connected';
  }
}

class Stream {
  private abort: AbortController | null = null;
  private closed = false;
  private running = false;
  private open = false;
  private everOpened = false;
  private readonly backoff: Backoff;
  private wake: (() => void) | null = null;
  private heartbeatTimer: ReturnType<typeof setTimeout> | null = null;
  /** Why the last attempt failed, for diagnostics. */
  lastNetworkError: Error | null = null;

  constructor(private readonly host: TransportHost, private readonly channel: Channel) {
    this.backoff = host.newBackoff();
  }

  phase(): TransportState {
    if (this.open) return 'connected';
    return this.everOpened ? 'reconnecting' : 'connecting';
  }

  start(): void {
    if (this.running || this.closed) return;
    this.running = true;
    void this.loop().finally(() => {
      this.running = false;
    });
  }

  close(): void {
    this.closed = true;
    this.abort?.abort();
    this.wake?.();
    this.clearHeartbeat();
    this.channel.live = false;
  }

  /** Ends the current request now and reconnects at once. */
  restart(): void {
    this.backoff.reset();
    this.abort?.abort();
    this.wake?.();
  }

  private async loop(): Promise<void> {
    while (!this.closed) {
      let permanent = false;
      try {
        permanent = await this.once();
      } catch (error) {
        if (this.closed) return;
        // A refused connection or a dropped stream: the connection state says
        // "reconnecting"; only errors the server explains are reported.
        if (error instanceof StromError) this.host.channelError(this.channel, error, false);
        else if (!isAbort(error)) this.lastNetworkError = asError(error);
      }
      this.setOpen(false);
      if (this.closed) return;
      if (permanent) return;
      await this.sleep(this.backoff.next());
    }
  }

  /** One request. Resolves true when the server refused for good. */
  private async once(): Promise<boolean> {
    const token = await this.host.resolveToken();
    if (this.closed) return false;
    const channel = this.channel;
    const path = channel.collection === '*' ? '' : `/${encodeURIComponent(channel.collection)}`;
    const url = new URL(`${this.host.httpBase}/api/v1/realtime${path}`);
    const query = filterToText(channel.filter);
    if (query) url.searchParams.set('query', query);
    const since = resumePosition(channel);
    if (since !== null) url.searchParams.set('since', String(since));
    if (this.host.userId !== undefined) url.searchParams.set('user_id', this.host.userId);
    if (this.host.userName !== undefined) url.searchParams.set('user_name', this.host.userName);
    const headers: Record<string, string> = { accept: 'text/event-stream' };
    if (token) headers.authorization = `Bearer ${token}`;

    const abort = new AbortController();
    this.abort = abort;
    this.armHeartbeat(abort);
    const response = await this.host.fetch(url.toString(), { headers, signal: abort.signal, cache: 'no-store' });
    if (!response.ok) {
      const text = await response.text().catch(() => '');
      let body: unknown = null;
      try {
        body = JSON.parse(text);
      } catch {
        // not JSON
      }
      const error = errorFromBody(body, { status: response.status, text });
      // 400: the filter or collection is wrong and will stay wrong.
      const permanent = response.status === 400;
      this.host.channelError(channel, error, permanent);
      return permanent;
    }
    if (!response.body) throw new StromError('protocol', 'the SSE response has no body');

    let serverError: StromError | null = null;
    const parser = new SseParser((message) => {
      const error = this.onMessage(message, since);
      if (error) serverError = error;
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        this.armHeartbeat(abort);
        parser.feed(decoder.decode(value, { stream: true }));
        if (this.closed) break;
      }
    } finally {
      this.clearHeartbeat();
      reader.releaseLock?.();
      abort.abort();
    }
    if (serverError && !this.closed) this.host.error(serverError);
    return false;
  }

  /** Handles one SSE message; returns the error the server ended the stream with. */
  private onMessage(message: SseMessage, since: number | string | null): StromError | null {
    if (this.closed) return null;
    const channel = this.channel;
    if (message.event === 'connected') {
      this.backoff.reset();
      this.everOpened = true;
      this.setOpen(true);
      this.host.subscribed(channel, { collection: channel.collection, resumed: since !== null, since, headSeq: null });
      return null;
    }
    if (message.event === 'reset') {
      const data = parseJson(message.data) as { since?: number | string; first_available_seq?: number | string } | null;
      this.host.reset(channel, {
        collection: channel.collection,
        since: position(data?.since ?? since),
        firstAvailableSeq: position(data?.first_available_seq),
      });
      return null;
    }
    // `stream_error` ends a stream; newer servers repeat it as the
    // deprecated `error`, which older ones send alone.
    if (message.event === 'stream_error' || message.event === 'error') {
      return errorFromBody(parseJson(message.data));
    }
    if (EVENT_NAMES.has(message.event)) {
      const event = parseJson(message.data) as StromEvent | null;
      if (!event || typeof event.collection !== 'string') return null;
      // SSE has no record subscription: narrow here.
      if (!channelMatches(channel, event)) return null;
      this.host.deliver(channel, event);
      // `*` over several NATS streams: the id is the position token after it.
      channel.positions = parsePositions(message.id) ?? channel.positions;
    }
    return null;
  }

  private setOpen(open: boolean): void {
    if (this.open === open) return;
    this.open = open;
    if (!open) this.channel.live = false;
    this.host.stateChanged();
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wake = () => {
        this.wake = null;
        done();
      };
    });
  }

  private armHeartbeat(abort: AbortController): void {
    this.clearHeartbeat();
    const timeout = this.host.heartbeatTimeoutMs;
    if (timeout > 0) this.heartbeatTimer = setTimeout(() => abort.abort(), timeout);
  }

  private clearHeartbeat(): void {
    if (this.heartbeatTimer) clearTimeout(this.heartbeatTimer);
    this.heartbeatTimer = null;
  }
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function isAbort(error: unknown): boolean {
  return typeof error === 'object' && error !== null && (error as { name?: string }).name === 'AbortError';
}

function asError(error: unknown): Error {
  if (error instanceof StromError) return error;
  const message = error instanceof Error ? error.message : String(error);
  return new StromError('network', `SSE stream failed: ${message}`, { cause: error });
}
