// The WebSocket transport: strom's FastCMS protocol on /api/v1/ws/realtime.
//
// The server keeps one subscription per (collection, record) on a socket (a
// second subscribe replaces the first) and an event carries no subscription
// id. So two subscriptions that could both match one event (the same
// collection, or `*` with anything) must not share a socket, or events would
// be replaced or delivered twice without a way to tell them apart. The
// transport therefore runs "lanes": lane 0 is the one connection most apps
// ever need; a subscription that overlaps one already on every open lane gets
// a lane of its own, closed again when it empties.

import type { Backoff } from './backoff.js';
import { StromError } from './errors.js';
import {
  type Channel, type Transport, type TransportHost, type TransportState,
  channelMatches, parsePositions, position, resumePosition,
} from './internal.js';
import type { StromEvent, WebSocketFactory, WebSocketLike } from './types.js';

/** Close codes of strom's WebSocket. */
export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  TOO_BIG: 1009,
  /** The server drains (a rolling deploy): reconnect, resuming where each subscription was. */
  SERVICE_RESTART: 1012,
  IDLE: 4000,
  TOKEN_EXPIRED: 4001,
  TOO_SLOW: 4008,
} as const;

/** Failed first connects after which `auto` checks whether HTTP works without WebSocket. */
const FALLBACK_AFTER_FAILURES = 2;

/** Do two channels possibly match one event? Then they need separate sockets. */
export function channelsOverlap(a: Channel, b: Channel): boolean {
  if (a.collection === '*' || b.collection === '*') return true;
  if (a.collection !== b.collection) return false;
  return a.recordId === null || b.recordId === null || a.recordId === b.recordId;
}

type Pending =
  | { kind: 'subscribe'; channel: Channel; since: number | string | null }
  | { kind: 'unsubscribe' }
  | { kind: 'auth'; resolve: () => void; reject: (error: Error) => void }
  | { kind: 'publish'; resolve: (seq: number) => void; reject: (error: Error) => void };

interface SubState {
  /** `subscribed` arrived: events for it may come. */
  confirmed: boolean;
  /** The server's subscription id, from `subscribed`. */
  serverId: number | null;
  /** A `subscribe` for it is in flight. */
  pending: boolean;
  /** The server refused it (for a reason that may pass); retried on reconnect and after `auth`. */
  failed: boolean;
}

export interface WsTransportOptions {
  WebSocket: WebSocketFactory;
  /** Called when WebSocket never connects but HTTP does (for `transport: 'auto'`). */
  onUnavailable?: () => void;
}

export class WsTransport implements Transport {
  readonly kind = 'websocket';
  private readonly lanes: Lane[] = [];
  private running = false;
  private nextLaneId = 0;

  constructor(readonly host: TransportHost, private readonly options: WsTransportOptions) {}

  start(): void {
    if (this.running) return;
    this.running = true;
    this.primary().connect();
  }

  stop(): void {
    this.running = false;
    for (const lane of this.lanes.splice(0)) lane.close();
  }

  add(channel: Channel): void {
    let lane = this.lanes.find((l) => l.accepts(channel));
    if (!lane) {
      lane = this.newLane();
      if (this.running) lane.connect();
    }
    lane.add(channel);
  }

  remove(channel: Channel): void {
    const lane = this.lanes.find((l) => l.has(channel));
    if (!lane) return;
    lane.remove(channel);
    if (lane !== this.lanes[0] && lane.isEmpty()) {
      lane.close();
      this.lanes.splice(this.lanes.indexOf(lane), 1);
      this.host.stateChanged();
    }
  }

  async authenticate(token: string | null): Promise<void> {
    if (token === null) return;
    await Promise.all(this.lanes.map((lane) => lane.authenticate(token)));
  }

  /** Sends a channel message over the main socket, or returns null when it is not open. */
  broadcast(channel: string, data: Record<string, unknown>): Promise<number> | null {
    const primary = this.lanes[0];
    return primary ? primary.broadcast(channel, data) : null;
  }

  state(): TransportState {
    const [primary, ...others] = this.lanes;
    if (!primary) return 'connecting';
    const phase = primary.phase();
    if (phase === 'connected' && others.some((l) => l.phase() === 'reconnecting')) return 'reconnecting';
    return phase;
  }

  /** For tests and diagnostics: how many sockets this transport runs. */
  get laneCount(): number {
    return this.lanes.length;
  }

  /** @internal */
  unavailable(): void {
    this.options.onUnavailable?.();
  }

  /** @internal */
  get factory(): WebSocketFactory {
    return this.options.WebSocket;
  }

  /** @internal */
  get fallbackEnabled(): boolean {
    return this.options.onUnavailable !== undefined;
  }

  private primary(): Lane {
    return this.lanes[0] ?? this.newLane();
  }

  private newLane(): Lane {
    const lane = new Lane(this, this.nextLaneId++);
    this.lanes.push(lane);
    return lane;
  }
}

type LaneStatus = 'idle' | 'connecting' | 'open' | 'waiting' | 'closed';

class Lane {
  private readonly host: TransportHost;
  private readonly subs = new Map<Channel, SubState>();
  private readonly byServerId = new Map<number, Channel>();
  private pending: Pending[] = [];
  private socket: WebSocketLike | null = null;
  private status: LaneStatus = 'idle';
  private everOpened = false;
  private failuresBeforeOpen = 0;
  private readonly backoff: Backoff;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private heartbeatTimer: ReturnType<typeof setTimeout> | null = null;
  /** The `error` message that came just before a close: the close's reason. */
  private lastError: StromError | null = null;

  constructor(private readonly transport: WsTransport, readonly id: number) {
    this.host = transport.host;
    this.backoff = this.host.newBackoff();
  }

  phase(): TransportState {
    if (this.status === 'open') return 'connected';
    return this.everOpened ? 'reconnecting' : 'connecting';
  }

  accepts(channel: Channel): boolean {
    for (const other of this.subs.keys()) if (channelsOverlap(other, channel)) return false;
    return true;
  }

  has(channel: Channel): boolean {
    return this.subs.has(channel);
  }

  isEmpty(): boolean {
    return this.subs.size === 0;
  }

  add(channel: Channel): void {
    this.subs.set(channel, { confirmed: false, serverId: null, pending: false, failed: false });
    if (this.status === 'open') this.sendSubscribe(channel);
  }

  remove(channel: Channel): void {
    const state = this.subs.get(channel);
    if (!state) return;
    this.subs.delete(channel);
    if (state.serverId !== null) this.byServerId.delete(state.serverId);
    channel.live = false;
    if (this.status === 'open' && (state.confirmed || state.pending)) {
      const action: Record<string, unknown> = { action: 'unsubscribe', collection: channel.collection };
      if (channel.recordId !== null) action.record_id = channel.recordId;
      this.send(action, { kind: 'unsubscribe' });
    }
  }

  authenticate(token: string): Promise<void> {
    if (this.status !== 'open') return Promise.resolve(); // the next connect uses the new token
    return new Promise<void>((resolve, reject) => {
      this.send({ action: 'auth', token }, { kind: 'auth', resolve, reject });
    }).then(() => {
      // What was refused before may be allowed now.
      for (const [channel, state] of this.subs) {
        if (state.failed && !state.pending) this.sendSubscribe(channel);
      }
    });
  }

  /** The `publish` action, always with `ack` so that every one gets exactly one reply. */
  broadcast(channel: string, data: Record<string, unknown>): Promise<number> | null {
    if (this.status !== 'open') return null;
    return new Promise<number>((resolve, reject) => {
      this.send({ action: 'publish', channel, data, ack: true }, { kind: 'publish', resolve, reject });
    });
  }

  connect(): void {
    if (this.status === 'closed' || this.status === 'connecting' || this.status === 'open') return;
    this.status = 'connecting';
    this.host.stateChanged();
    this.host.resolveToken().then(
      (token) => {
        if (this.status !== 'connecting') return;
        this.open(token);
      },
      (error: unknown) => {
        if (this.status !== 'connecting') return;
        this.host.error(error instanceof StromError ? error : new StromError('unauthenticated', `no token: ${describe(error)}`, { cause: error }));
        this.retry();
      },
    );
  }

  close(): void {
    this.status = 'closed';
    this.clearTimers();
    const socket = this.detach();
    if (socket) safeClose(socket, CloseCode.NORMAL, 'client closed');
    this.failPending(new StromError('unavailable', 'the client was closed'));
    for (const channel of this.subs.keys()) channel.live = false;
  }

  private open(token: string | null): void {
    const url = new URL(`${this.host.httpBase}/api/v1/ws/realtime`);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    if (token) url.searchParams.set('token', token);
    if (this.host.userId !== undefined) url.searchParams.set('user_id', this.host.userId);
    if (this.host.userName !== undefined) url.searchParams.set('user_name', this.host.userName);
    let socket: WebSocketLike;
    try {
      socket = new this.transport.factory(url.toString());
    } catch (error) {
      this.host.error(new StromError('network', `cannot open a WebSocket: ${describe(error)}`, { cause: error }));
      this.retry();
      return;
    }
    this.socket = socket;
    this.lastError = null;
    socket.onopen = () => this.armHeartbeat();
    socket.onmessage = (event: { data: unknown }) => {
      if (this.socket !== socket) return;
      this.armHeartbeat();
      this.onText(decode(event.data));
    };
    socket.onerror = () => {
      // The close event follows and carries what there is to know.
    };
    socket.onclose = (event: { code: number; reason: string }) => {
      if (this.socket !== socket) return;
      this.onClosed(event.code, event.reason);
    };
    this.armHeartbeat();
  }

  private onText(text: string): void {
    let message: { type?: unknown; data?: unknown };
    try {
      message = JSON.parse(text) as { type?: unknown; data?: unknown };
    } catch {
      this.host.error(new StromError('protocol', `the server sent a message that is not JSON: ${text.slice(0, 200)}`));
      return;
    }
    const data = (message.data && typeof message.data === 'object' ? message.data : {}) as Record<string, unknown>;
    switch (message.type) {
      case 'connected':
        this.onConnected();
        break;
      case 'event':
        this.onEvent(data as unknown as StromEvent);
        break;
      case 'ping':
        this.send({ action: 'pong' });
        break;
      case 'subscribed':
        this.onSubscribed(data);
        break;
      case 'unsubscribed':
        this.takePending('unsubscribe');
        break;
      case 'authenticated': {
        const pending = this.takePending('auth');
        if (pending?.kind === 'auth') pending.resolve();
        break;
      }
      case 'ack': {
        const pending = this.takePending('publish');
        if (pending?.kind === 'publish') pending.resolve(Number(data.seq));
        break;
      }
      case 'reset':
        this.onReset(data);
        break;
      case 'error':
        this.onError(data);
        break;
      default:
        // Newer servers may send more; ignore what this client does not know.
        break;
    }
  }

  private onConnected(): void {
    this.status = 'open';
    this.everOpened = true;
    this.failuresBeforeOpen = 0;
    this.backoff.reset();
    for (const channel of this.subs.keys()) this.sendSubscribe(channel);
    this.host.stateChanged();
  }

  private sendSubscribe(channel: Channel): void {
    const state = this.subs.get(channel);
    if (!state) return;
    const since = resumePosition(channel);
    const action: Record<string, unknown> = { action: 'subscribe', collection: channel.collection };
    if (channel.filter !== null) action.filter = channel.filter;
    if (channel.recordId !== null) action.record_id = channel.recordId;
    if (since !== null) action.since = since;
    if (channel.echo) action.echo = true;
    state.pending = true;
    state.failed = false;
    this.send(action, { kind: 'subscribe', channel, since });
  }

  private onSubscribed(data: Record<string, unknown>): void {
    const pending = this.takePending('subscribe');
    if (pending?.kind !== 'subscribe') return;
    const { channel, since } = pending;
    const state = this.subs.get(channel);
    if (!state) return; // unsubscribed meanwhile; its `unsubscribe` follows
    state.pending = false;
    state.confirmed = true;
    if (state.serverId !== null) this.byServerId.delete(state.serverId);
    const serverId = typeof data.subscription_id === 'number' ? data.subscription_id : null;
    state.serverId = serverId;
    if (serverId !== null) this.byServerId.set(serverId, channel);
    const headSeq = typeof data.head_seq === 'number' ? data.head_seq : null;
    if (channel.lastSeq === null && channel.baselineSeq === null && headSeq !== null && headSeq > 0) {
      channel.baselineSeq = headSeq;
    }
    // `*` over several NATS streams: where it went live, one seq per stream.
    channel.positions ??= parsePositions(data.head_position);
    this.host.subscribed(channel, { collection: channel.collection, resumed: since !== null, since, headSeq });
  }

  private onEvent(event: StromEvent): void {
    if (!event || typeof event.collection !== 'string') return;
    for (const [channel, state] of this.subs) {
      // Lanes hold no overlapping channels, so at most one matches. Only a
      // confirmed subscription takes events: until its `subscribed` arrives,
      // what comes is still for the one it follows on this socket (the
      // server sends everything in order).
      if (channelMatches(channel, event)) {
        if (state.confirmed) this.host.deliver(channel, event);
        return;
      }
    }
  }

  private onReset(data: Record<string, unknown>): void {
    const id = typeof data.subscription_id === 'number' ? data.subscription_id : null;
    const channel = id === null ? undefined : this.byServerId.get(id);
    if (!channel) return;
    this.host.reset(channel, {
      collection: typeof data.collection === 'string' ? data.collection : channel.collection,
      since: position(data.since),
      firstAvailableSeq: position(data.first_available_seq),
    });
  }

  private onError(data: Record<string, unknown>): void {
    const error = new StromError(
      typeof data.code === 'string' ? data.code : 'internal',
      typeof data.message === 'string' ? data.message : 'error',
    );
    const pending = this.pending.shift();
    if (!pending) {
      // Not a reply: it says why the server is about to close (token expired,
      // too slow, shutting down, idle).
      this.lastError = error;
      return;
    }
    switch (pending.kind) {
      case 'subscribe': {
        const state = this.subs.get(pending.channel);
        if (!state) return;
        state.pending = false;
        // A bad filter or collection name will not get better; anything
        // else (rights, limits) may, after `auth` or on another connection.
        // A permanent error makes the client remove the channel (through
        // `WsTransport.remove`).
        const permanent = error.code === 'invalid_argument';
        state.failed = !permanent;
        this.host.channelError(pending.channel, error, permanent);
        break;
      }
      case 'auth':
      case 'publish':
        pending.reject(error);
        break;
      case 'unsubscribe':
        break; // "not subscribed": already gone, which is what was wanted
    }
  }

  private takePending(kind: Pending['kind']): Pending | undefined {
    const pending = this.pending.shift();
    if (pending && pending.kind !== kind) {
      this.host.error(new StromError('protocol', `expected a reply to ${pending.kind}, got one to ${kind}`));
    }
    return pending;
  }

  private send(action: Record<string, unknown>, pending?: Pending): void {
    const socket = this.socket;
    if (!socket || this.status !== 'open') {
      if (pending?.kind === 'auth') pending.resolve(); // the next connect carries the token
      if (pending?.kind === 'publish') pending.reject(new StromError('unavailable', 'not connected'));
      return;
    }
    try {
      socket.send(JSON.stringify(action));
      if (pending) this.pending.push(pending);
    } catch (error) {
      if (pending?.kind === 'auth' || pending?.kind === 'publish') {
        pending.reject(new StromError('network', describe(error), { cause: error }));
      }
      this.abandon();
    }
  }

  private onClosed(code: number, reason: string): void {
    this.detach();
    const wasOpen = this.status === 'open';
    if (!wasOpen) this.failuresBeforeOpen += 1;
    const error = this.lastError
      ?? new StromError('unavailable', `connection closed (code ${code}${reason ? `: ${reason}` : ''})`, { closeCode: code });
    this.failPending(error);
    for (const [channel, state] of this.subs) {
      channel.live = false;
      state.confirmed = false;
      state.serverId = null;
      state.pending = false;
    }
    this.byServerId.clear();
    if (this.status === 'closed') return;
    if (this.lastError) {
      this.host.error(new StromError(this.lastError.code, this.lastError.message, { closeCode: code }));
    }
    this.lastError = null;
    this.retry();
  }

  /** Drops a socket that seems dead without waiting for its close event. */
  private abandon(): void {
    const socket = this.socket;
    if (!socket) return;
    safeClose(socket, CloseCode.NORMAL, 'no heartbeat');
    this.onClosed(1006, 'abandoned by the client');
  }

  private retry(): void {
    if (this.status === 'closed') return;
    this.status = 'waiting';
    this.host.stateChanged();
    if (!this.everOpened && this.transport.fallbackEnabled && this.failuresBeforeOpen >= FALLBACK_AFTER_FAILURES) {
      this.probeHttp();
    }
    const delay = this.backoff.next();
    this.clearTimers();
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (this.status === 'waiting') {
        this.status = 'idle';
        this.connect();
      }
    }, delay);
  }

  /** WebSocket fails but does plain HTTP work? Then something blocks WebSocket. */
  private probeHttp(): void {
    this.host.fetch(`${this.host.httpBase}/healthz`, { cache: 'no-store' }).then(
      (response) => {
        if (response.ok && !this.everOpened && this.status !== 'closed' && this.status !== 'open') {
          this.transport.unavailable();
        }
      },
      () => { /* the server is down, not the WebSocket: keep trying */ },
    );
  }

  private failPending(error: Error): void {
    for (const pending of this.pending.splice(0)) {
      // A channel message in flight may or may not have been published.
      if (pending.kind === 'auth' || pending.kind === 'publish') pending.reject(error);
    }
  }

  private armHeartbeat(): void {
    if (this.heartbeatTimer) clearTimeout(this.heartbeatTimer);
    this.heartbeatTimer = null;
    const timeout = this.host.heartbeatTimeoutMs;
    if (timeout > 0 && this.socket) {
      this.heartbeatTimer = setTimeout(() => {
        this.heartbeatTimer = null;
        this.abandon();
      }, timeout);
    }
  }

  private detach(): WebSocketLike | null {
    const socket = this.socket;
    this.socket = null;
    if (this.heartbeatTimer) clearTimeout(this.heartbeatTimer);
    this.heartbeatTimer = null;
    if (socket) {
      socket.onopen = null;
      socket.onmessage = null;
      socket.onclose = null;
      // Keep a no-op error handler: some implementations throw on an unhandled error.
      socket.onerror = () => {};
    }
    return socket;
  }

  private clearTimers(): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.heartbeatTimer) clearTimeout(this.heartbeatTimer);
    this.heartbeatTimer = null;
  }
}

function safeClose(socket: WebSocketLike, code: number, reason: string): void {
  try {
    socket.close(code, reason);
  } catch {
    // already closing
  }
}

const utf8 = new TextDecoder();

function decode(data: unknown): string {
  if (typeof data === 'string') return data;
  if (data instanceof ArrayBuffer) return utf8.decode(data);
  if (ArrayBuffer.isView(data)) return utf8.decode(data);
  return String(data);
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
