import { Backoff } from './backoff.js';
import { StromError, errorFromBody } from './errors.js';
import { normalizeFilter, presenceFilter, stableStringify } from './filter.js';
import { type Channel, type Member, type Transport, type TransportHost, parsePositions, safeCall } from './internal.js';
import { SseTransport } from './sse-transport.js';
import type {
  BackoffOptions, ConnectionState, JsonObject, PresenceEvent, PresenceSnapshot, PublishEvent,
  ResetInfo, StromClientOptions, StromEvent, SubscribeOptions, SubscribedInfo, TokenSource,
  TransportKind, WebSocketFactory,
} from './types.js';
import { WsTransport } from './ws-transport.js';

const DEFAULT_HEARTBEAT_TIMEOUT_MS = 75_000;
const DEFAULT_TOKEN_REFRESH_MARGIN_MS = 30_000;
/** setTimeout's largest delay; longer token lifetimes are re-checked then. */
const MAX_TIMER_MS = 2_147_483_647;

type Listener<T> = (value: T) => void;

/**
 * A client of one strom server (or cluster).
 *
 * ```ts
 * const client = new StromClient({ url: 'http://localhost:8000' });
 * const stop = client.subscribe('posts', {
 *   filter: { published: true },
 *   onEvent: (event) => console.log(event.type, event.data),
 * });
 * ```
 *
 * Subscriptions survive reconnects: after a dropped connection the client
 * reconnects with exponential backoff (full jitter) and resubscribes each
 * subscription from the last `seq` it received, so nothing published
 * meanwhile is missed (within the server's retention) and nothing arrives
 * twice.
 */
export class StromClient {
  private readonly httpBase: string;
  private token: TokenSource | null;
  private readonly requested: TransportKind;
  private readonly backoffOptions: BackoffOptions;
  private readonly webSocket: WebSocketFactory | undefined;
  private readonly fetchFn: typeof fetch;
  private readonly heartbeatTimeoutMs: number;
  private readonly refreshMarginMs: number;
  private readonly userId: string | undefined;
  private readonly userName: string | undefined;

  private readonly channels = new Map<number, Channel>();
  private nextChannelId = 1;
  private transport: Transport | null = null;
  private kind: 'websocket' | 'sse';
  private current: ConnectionState = 'disconnected';
  private readonly stateListeners = new Set<Listener<ConnectionState>>();
  private readonly errorListeners = new Set<Listener<Error>>();
  private refreshTimer: ReturnType<typeof setTimeout> | null = null;
  private readonly host: TransportHost;

  constructor(options: StromClientOptions) {
    if (!options || typeof options.url !== 'string' || options.url === '') {
      throw new TypeError('StromClient needs a `url`, e.g. http://localhost:8000');
    }
    this.httpBase = httpBase(options.url);
    this.token = options.token ?? null;
    this.requested = options.transport ?? 'auto';
    this.backoffOptions = { ...options.backoff };
    // Validate the backoff options now rather than at the first reconnect.
    new Backoff(this.backoffOptions);
    this.webSocket = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketFactory }).WebSocket;
    const fetchFn = options.fetch ?? globalThis.fetch;
    if (typeof fetchFn !== 'function') throw new TypeError('no fetch available: pass `fetch` in the options');
    this.fetchFn = fetchFn.bind(globalThis);
    this.heartbeatTimeoutMs = options.heartbeatTimeoutMs ?? DEFAULT_HEARTBEAT_TIMEOUT_MS;
    this.refreshMarginMs = options.tokenRefreshMarginMs ?? DEFAULT_TOKEN_REFRESH_MARGIN_MS;
    this.userId = options.userId;
    this.userName = options.userName;

    if (this.requested === 'websocket' && !this.webSocket) {
      throw new TypeError('transport "websocket" needs a WebSocket class: there is no global WebSocket here; pass `WebSocket` (e.g. from the ws package)');
    }
    if (!['websocket', 'sse', 'auto'].includes(this.requested)) {
      throw new TypeError(`unknown transport ${JSON.stringify(this.requested)}: expected websocket, sse or auto`);
    }
    this.kind = this.requested === 'sse' || !this.webSocket ? 'sse' : 'websocket';

    const client = this;
    this.host = {
      httpBase: this.httpBase,
      userId: this.userId,
      userName: this.userName,
      heartbeatTimeoutMs: this.heartbeatTimeoutMs,
      fetch: this.fetchFn,
      resolveToken: () => client.resolveToken(),
      newBackoff: () => new Backoff(client.backoffOptions),
      deliver: (channel, event) => client.deliver(channel, event),
      reset: (channel, info) => client.onReset(channel, info),
      subscribed: (channel, info) => client.onSubscribed(channel, info),
      channelError: (channel, error, permanent) => client.onChannelError(channel, error, permanent),
      error: (error) => client.emitError(error),
      stateChanged: () => client.updateState(),
    };

    if (options.autoConnect !== false) this.connect();
  }

  /** The connection state. */
  get state(): ConnectionState {
    return this.current;
  }

  /** The transport in use (`auto` resolves to one of these). */
  get transportKind(): 'websocket' | 'sse' {
    return this.kind;
  }

  /** The HTTP base URL of the server, without a trailing slash. */
  get url(): string {
    return this.httpBase;
  }

  /**
   * Connects (done by the constructor unless `autoConnect: false`). After
   * `close()`, connecting again resumes every subscription that is still
   * registered from where it stopped.
   */
  connect(): void {
    if (this.transport) return;
    this.transport = this.createTransport();
    for (const channel of this.channels.values()) this.transport.add(channel);
    this.transport.start();
    this.updateState();
  }

  /**
   * Closes every connection; the state becomes `disconnected`. Subscriptions
   * stay registered (call their unsubscribe functions to drop them), so a
   * later `connect()` resumes them.
   */
  close(): void {
    const transport = this.transport;
    this.transport = null;
    this.clearRefresh();
    transport?.stop();
    for (const channel of this.channels.values()) channel.live = false;
    this.updateState();
  }

  /**
   * Subscribes to a collection (`'*'` for all), narrowed by an optional filter
   * or record. Returns the function that unsubscribes.
   */
  subscribe<T extends JsonObject = JsonObject>(collection: string, options: SubscribeOptions<T>): () => void {
    if (typeof collection !== 'string' || collection === '') {
      throw new TypeError('subscribe needs a collection name (or "*")');
    }
    if (!options || typeof options.onEvent !== 'function') {
      throw new TypeError('subscribe needs an `onEvent` callback');
    }
    const filter = normalizeFilter(options.filter);
    const recordId = options.recordId ?? null;
    const since = options.since ?? null;
    const sincePositions = parsePositions(since);
    if (since !== null && sincePositions === null && !(Number.isInteger(since) && Number(since) >= 0)) {
      throw new TypeError(`since must be a non-negative integer or a position token like "12,0,40", got ${since}`);
    }
    const echo = options.echo === true;
    const key = stableStringify([collection, recordId, filter, echo]);
    const member: Member = { options: options as unknown as SubscribeOptions<JsonObject> };

    let channel: Channel | undefined;
    if (since === null) {
      channel = [...this.channels.values()].find((c) => c.shareable && c.key === key);
    }
    if (channel) {
      channel.members.add(member);
      if (channel.live && channel.lastInfo) {
        const info = { ...channel.lastInfo, resumed: false, since: null };
        queueMicrotask(() => {
          if (channel?.members.has(member)) safeCall(this.reporter, member.options.onSubscribed, info);
        });
      }
    } else {
      channel = {
        id: this.nextChannelId++,
        key,
        shareable: since === null,
        collection,
        recordId,
        filter,
        echo,
        lastSeq: typeof since === 'number' ? since : null,
        positions: sincePositions,
        baselineSeq: null,
        live: false,
        lastInfo: null,
        members: new Set([member]),
      };
      this.channels.set(channel.id, channel);
      this.transport?.add(channel);
    }

    const joined = channel;
    let active = true;
    return () => {
      if (!active) return;
      active = false;
      joined.members.delete(member);
      if (joined.members.size === 0 && this.channels.get(joined.id) === joined) {
        this.channels.delete(joined.id);
        this.transport?.remove(joined);
      }
    };
  }

  /**
   * Presence joins and leaves: `channel` is a collection name (who is
   * subscribed to it) or `null` (who is connected at all). Returns the
   * function that stops listening. See also `getPresence`.
   */
  onPresence(channel: string | null, callback: (event: PresenceEvent) => void, options: Omit<SubscribeOptions, 'onEvent' | 'filter' | 'recordId' | 'since'> = {}): () => void {
    return this.subscribe('presence', {
      ...options,
      filter: presenceFilter(channel),
      onEvent: (event) => callback(event as unknown as PresenceEvent),
    });
  }

  /** Who is online (`GET /api/v1/presence`), cluster-wide; optionally in one channel. */
  async getPresence(channel?: string | null): Promise<PresenceSnapshot> {
    const query = channel ? `?channel=${encodeURIComponent(channel)}` : '';
    const body = await this.request('GET', `/api/v1/presence${query}`);
    return body as PresenceSnapshot;
  }

  /** Publishes one event (`POST /api/v1/publish`); resolves to its seq. */
  publish<T extends JsonObject>(event: PublishEvent<T>): Promise<number>;
  /** Publishes a batch, all or nothing; resolves to the seqs in order. */
  publish<T extends JsonObject>(events: PublishEvent<T>[]): Promise<number[]>;
  async publish(events: PublishEvent | PublishEvent[]): Promise<number | number[]> {
    const body = (await this.request('POST', '/api/v1/publish', events)) as { seq?: number; seqs?: number[] };
    if (Array.isArray(events)) {
      if (!Array.isArray(body.seqs)) throw new StromError('protocol', 'publish answered without `seqs`');
      return body.seqs;
    }
    if (typeof body.seq !== 'number') throw new StromError('protocol', 'publish answered without `seq`');
    return body.seq;
  }

  /**
   * Sends a message on a channel (a `broadcast` event; see the server's
   * Channels section) and resolves to its seq. Over an open WebSocket it uses
   * the `publish` action (the connection's rate and size limits apply, and
   * its own subscriptions do not get the message back unless they asked for
   * `echo`); otherwise `POST /api/v1/broadcast`.
   */
  async broadcast(channel: string, data: JsonObject = {}): Promise<number> {
    if (typeof channel !== 'string' || channel === '') throw new TypeError('broadcast needs a channel name');
    const overSocket = this.transport?.broadcast?.(channel, data);
    if (overSocket) return overSocket;
    const body = (await this.request('POST', '/api/v1/broadcast', { channel, data })) as { seq?: number };
    if (typeof body.seq !== 'number') throw new StromError('protocol', 'broadcast answered without `seq`');
    return body.seq;
  }

  /**
   * Replaces the token. Open WebSocket connections present it with the `auth`
   * action (which also refreshes one about to expire); SSE streams reopen
   * with it and resume. Resolves once the server accepted it.
   */
  async setToken(token: TokenSource | null): Promise<void> {
    this.token = token;
    this.clearRefresh();
    if (!this.transport) return;
    const resolved = await this.resolveToken();
    await this.transport?.authenticate(resolved);
  }

  /** Listens to connection state changes; returns the function that stops. */
  onStateChange(listener: Listener<ConnectionState>): () => void {
    this.stateListeners.add(listener);
    return () => this.stateListeners.delete(listener);
  }

  /**
   * Listens to errors not tied to one subscription: the reason the server
   * gave for closing (token expired, too slow, shutdown), a failing token
   * function, exceptions thrown by callbacks.
   */
  onError(listener: Listener<Error>): () => void {
    this.errorListeners.add(listener);
    return () => this.errorListeners.delete(listener);
  }

  // --- internals -----------------------------------------------------------

  private readonly reporter = (error: Error) => this.emitError(error);

  private createTransport(): Transport {
    if (this.kind === 'websocket' && this.webSocket) {
      const fallback = this.requested === 'auto' ? () => this.fallBackToSse() : undefined;
      return new WsTransport(this.host, fallback ? { WebSocket: this.webSocket, onUnavailable: fallback } : { WebSocket: this.webSocket });
    }
    this.kind = 'sse';
    return new SseTransport(this.host);
  }

  /** `auto`: WebSocket never connected but HTTP works, so use SSE. */
  private fallBackToSse(): void {
    if (!this.transport || this.transport.kind !== 'websocket') return;
    this.transport.stop();
    this.kind = 'sse';
    this.transport = new SseTransport(this.host);
    for (const channel of this.channels.values()) this.transport.add(channel);
    this.transport.start();
    this.updateState();
  }

  private async request(method: string, path: string, body?: unknown): Promise<unknown> {
    const token = await this.resolveToken();
    const headers: Record<string, string> = { accept: 'application/json' };
    if (body !== undefined) headers['content-type'] = 'application/json';
    if (token) headers.authorization = `Bearer ${token}`;
    let response: Response;
    try {
      response = await this.fetchFn(`${this.httpBase}${path}`, {
        method,
        headers,
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      });
    } catch (error) {
      throw new StromError('network', `${method} ${path} failed: ${error instanceof Error ? error.message : String(error)}`, { cause: error });
    }
    const text = await response.text();
    let parsed: unknown = null;
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch {
      // not JSON
    }
    if (!response.ok) throw errorFromBody(parsed, { status: response.status, text });
    return parsed;
  }

  /** The current token; a token function is called every time. */
  private async resolveToken(): Promise<string | null> {
    const source = this.token;
    if (source === null) return null;
    if (typeof source === 'string') return source;
    let token: string;
    try {
      token = await source();
    } catch (error) {
      throw new StromError('unauthenticated', `the token function failed: ${error instanceof Error ? error.message : String(error)}`, { cause: error });
    }
    if (this.token === source) this.scheduleRefresh(token);
    return token;
  }

  /**
   * With a token function, fetches the next token shortly before this one
   * expires (its `exp` claim) and presents it, so the server never closes
   * the connection for an expired token.
   */
  private scheduleRefresh(token: string): void {
    this.clearRefresh();
    const exp = jwtExpiry(token);
    if (exp === null || !this.transport) return;
    const delay = Math.max(0, exp - Date.now() - this.refreshMarginMs);
    const source = this.token;
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      if (this.token !== source || !this.transport) return;
      if (delay >= MAX_TIMER_MS) {
        this.scheduleRefresh(token);
        return;
      }
      this.resolveToken()
        .then((fresh) => this.transport?.authenticate(fresh))
        .catch((error: unknown) => this.emitError(error instanceof Error ? error : new Error(String(error))));
    }, Math.min(delay, MAX_TIMER_MS));
    // Never keep a Node process alive just for this.
    (this.refreshTimer as { unref?: () => void }).unref?.();
  }

  private clearRefresh(): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
  }

  private deliver(channel: Channel, event: StromEvent): void {
    const seq = typeof event.seq === 'number' ? event.seq : 0;
    // seq 0 (presence) is not part of the log: never a duplicate, never a position.
    if (seq > 0 && channel.collection === '*' && typeof event.partition === 'number') {
      // Each stream counts its own seqs: one position per stream.
      const positions = (channel.positions ??= []);
      if (seq <= (positions[event.partition] ?? 0)) return;
      positions[event.partition] = seq;
    } else if (seq > 0) {
      if (channel.lastSeq !== null && seq <= channel.lastSeq) return;
      channel.lastSeq = seq;
    }
    for (const member of [...channel.members]) safeCall(this.reporter, member.options.onEvent, event);
  }

  private onReset(channel: Channel, info: ResetInfo): void {
    for (const member of [...channel.members]) safeCall(this.reporter, member.options.onReset, info);
  }

  private onSubscribed(channel: Channel, info: SubscribedInfo): void {
    channel.live = true;
    channel.lastInfo = info;
    for (const member of [...channel.members]) safeCall(this.reporter, member.options.onSubscribed, info);
    this.updateState();
  }

  private onChannelError(channel: Channel, error: Error, permanent: boolean): void {
    if (permanent && this.channels.get(channel.id) === channel) {
      this.channels.delete(channel.id);
      this.transport?.remove(channel);
    }
    const members = [...channel.members];
    if (members.every((m) => !m.options.onError)) {
      this.emitError(error);
      return;
    }
    for (const member of members) safeCall(this.reporter, member.options.onError, error);
  }

  private emitError(error: Error): void {
    if (this.errorListeners.size === 0) {
      // Nobody listens. The client recovers from its own errors (reconnects),
      // so only an exception thrown by application code is printed.
      if (!(error instanceof StromError)) console.error('[strom-client] a callback threw', error);
      return;
    }
    for (const listener of [...this.errorListeners]) {
      try {
        listener(error);
      } catch (thrown) {
        console.error('[strom-client] an onError listener threw', thrown);
      }
    }
  }

  private updateState(): void {
    const next: ConnectionState = this.transport ? this.transport.state() : 'disconnected';
    if (next === this.current) return;
    this.current = next;
    for (const listener of [...this.stateListeners]) safeCall(this.reporter, listener, next);
  }
}

/** `ws://host/x/` → `http://host/x`; http(s) URLs as they are, without a trailing slash. */
function httpBase(url: string): string {
  const parsed = new URL(url);
  if (parsed.protocol === 'ws:') parsed.protocol = 'http:';
  else if (parsed.protocol === 'wss:') parsed.protocol = 'https:';
  else if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw new TypeError(`url must be http(s):// or ws(s)://, got ${url}`);
  }
  parsed.search = '';
  parsed.hash = '';
  return parsed.toString().replace(/\/+$/, '');
}

/** The `exp` of a JWT in ms, or null when the token is not a JWT with one. */
export function jwtExpiry(token: string): number | null {
  const parts = token.split('.');
  if (parts.length !== 3 || !parts[1]) return null;
  try {
    const base64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const padded = base64 + '='.repeat((4 - (base64.length % 4)) % 4);
    const json = decodeBase64(padded);
    const claims = JSON.parse(json) as { exp?: unknown };
    return typeof claims.exp === 'number' ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

function decodeBase64(text: string): string {
  const binary = atob(text);
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}
