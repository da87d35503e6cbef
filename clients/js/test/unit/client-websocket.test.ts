// StromClient's WebSocket protocol handling, against a fake socket and fake
// timers: what it sends, how it routes, how it reconnects and resumes.

import { afterEach, beforeEach, describe, expect, test, vi } from 'vitest';

import WsWebSocket from 'ws';

import {
  type ConnectionState, type ResetInfo, StromClient, StromError, type StromEvent, type SubscribedInfo, type WebSocketFactory,
} from '../../src/index.js';
import { FakeSocket } from '../helpers/fake-socket.js';

const noFetch = (() => Promise.reject(new Error('no network in unit tests'))) as typeof fetch;

function newClient(options: Partial<ConstructorParameters<typeof StromClient>[0]> = {}) {
  return new StromClient({
    url: 'http://strom.test:8000/',
    transport: 'websocket',
    WebSocket: FakeSocket,
    fetch: noFetch,
    backoff: { baseMs: 1_000, maxMs: 8_000 },
    ...options,
  });
}

/** A JWT-shaped token (unsigned; the client only reads `exp`). */
function jwt(claims: Record<string, unknown>): string {
  const part = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url');
  return `${part({ alg: 'HS256' })}.${part(claims)}.signature`;
}

const flush = () => vi.advanceTimersByTimeAsync(0);

beforeEach(() => {
  FakeSocket.reset();
  vi.useFakeTimers();
  // Full jitter draws from Math.random: pin it to the middle of the window.
  vi.spyOn(Math, 'random').mockReturnValue(0.5);
});

afterEach(() => {
  vi.useRealTimers();
  vi.restoreAllMocks();
});

describe('connecting', () => {
  test('the URL carries token, user_id and user_name; the state goes connecting -> connected', async () => {
    const client = newClient({ token: 'tok', userId: 'u 1', userName: 'Ann' });
    const states: ConnectionState[] = [client.state];
    client.onStateChange((s) => states.push(s));
    await flush();
    const socket = FakeSocket.last;
    expect(socket.url.origin).toBe('ws://strom.test:8000');
    expect(socket.url.pathname).toBe('/api/v1/ws/realtime');
    expect(Object.fromEntries(socket.url.searchParams)).toEqual({ token: 'tok', user_id: 'u 1', user_name: 'Ann' });
    socket.accept();
    expect(states).toEqual(['connecting', 'connected']);
    client.close();
    expect(states).toEqual(['connecting', 'connected', 'disconnected']);
    expect(socket.closedByClient).not.toBeNull();
  });

  test('the browser WebSocket class and the ws package\'s both fit the WebSocket option (types)', () => {
    const fromDom: WebSocketFactory | undefined = (globalThis as { WebSocket?: typeof WebSocket }).WebSocket;
    const fromWs: WebSocketFactory = WsWebSocket;
    expect(typeof fromWs).toBe('function');
    expect(fromDom === undefined || typeof fromDom === 'function').toBe(true);
  });

  test('https and wss base URLs', async () => {
    newClient({ url: 'https://example.com/strom/' });
    await flush();
    expect(FakeSocket.last.url.toString()).toBe('wss://example.com/strom/api/v1/ws/realtime');
  });

  test('autoConnect: false waits for connect()', async () => {
    const client = newClient({ autoConnect: false });
    await flush();
    expect(FakeSocket.instances).toHaveLength(0);
    expect(client.state).toBe('disconnected');
    client.connect();
    await flush();
    expect(FakeSocket.instances).toHaveLength(1);
  });

  test('no WebSocket class: "websocket" throws, "auto" uses SSE', () => {
    const original = (globalThis as { WebSocket?: unknown }).WebSocket;
    (globalThis as { WebSocket?: unknown }).WebSocket = undefined;
    try {
      expect(() => new StromClient({ url: 'http://x', transport: 'websocket', fetch: noFetch })).toThrow(/WebSocket/);
      const auto = new StromClient({ url: 'http://x', fetch: noFetch, autoConnect: false });
      expect(auto.transportKind).toBe('sse');
    } finally {
      (globalThis as { WebSocket?: unknown }).WebSocket = original;
    }
  });
});

describe('subscriptions', () => {
  test('subscribe actions are sent once connected, with filter, record_id and since', async () => {
    const client = newClient();
    client.subscribe('posts', { filter: { published: true }, onEvent: () => {} });
    client.subscribe('products', { filter: 'price > 100', since: 41, onEvent: () => {} });
    client.subscribe('comments', { recordId: 'c1', onEvent: () => {} });
    await flush();
    const socket = FakeSocket.last;
    expect(socket.sent).toEqual([]);
    socket.accept();
    expect(socket.actions('subscribe')).toEqual([
      { action: 'subscribe', collection: 'posts', filter: { published: true } },
      { action: 'subscribe', collection: 'products', filter: 'price > 100', since: 41 },
      { action: 'subscribe', collection: 'comments', record_id: 'c1' },
    ]);
  });

  test('events reach the subscription of their collection (and record)', async () => {
    const client = newClient();
    const posts: StromEvent[] = [];
    const comment: StromEvent[] = [];
    client.subscribe('posts', { onEvent: (e) => posts.push(e) });
    client.subscribe('comments', { recordId: 'c1', onEvent: (e) => comment.push(e) });
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    socket.confirmSubscriptions();
    socket.event({ collection: 'posts', seq: 1, data: { id: 'p1' } });
    socket.event({ collection: 'comments', seq: 2, data: { id: 'c1' } });
    socket.event({ collection: 'other', seq: 3, data: { id: 'o' } });
    expect(posts.map((e) => e.seq)).toEqual([1]);
    expect(comment.map((e) => e.seq)).toEqual([2]);
    expect(posts[0]).toMatchObject({ type: 'record.created', collection: 'posts', record_id: 'p1', data: { id: 'p1' } });
  });

  test('ping is answered with pong', async () => {
    newClient();
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    socket.message('ping', { timestamp: '2025-01-01T00:00:00Z' });
    socket.message('ping', { timestamp: '2025-01-01T00:00:30Z' });
    expect(socket.actions('pong')).toEqual([{ action: 'pong' }, { action: 'pong' }]);
  });

  test('a seq at or below the last one is a duplicate and dropped; presence (seq 0) never is', async () => {
    const client = newClient();
    const got: number[] = [];
    client.subscribe('*', { onEvent: (e) => got.push(e.seq) });
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    socket.confirmSubscriptions();
    socket.event({ collection: 'a', seq: 5, data: { id: 'x' } });
    socket.event({ collection: 'a', seq: 5, data: { id: 'x' } });
    socket.event({ collection: 'a', seq: 4, data: { id: 'x' } });
    socket.event({ collection: 'presence', type: 'user.joined', seq: 0, data: { user_id: 'u' } });
    socket.event({ collection: 'presence', type: 'user.left', seq: 0, data: { user_id: 'u' } });
    socket.event({ collection: 'a', seq: 6, data: { id: 'y' } });
    expect(got).toEqual([5, 0, 0, 6]);
  });

  test('unsubscribe sends the action once, and events stop', async () => {
    const client = newClient();
    const got: number[] = [];
    const stop = client.subscribe('posts', { recordId: 'p1', onEvent: (e) => got.push(e.seq) });
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    socket.confirmSubscriptions();
    stop();
    stop();
    expect(socket.actions('unsubscribe')).toEqual([{ action: 'unsubscribe', collection: 'posts', record_id: 'p1' }]);
    socket.event({ collection: 'posts', seq: 1, data: { id: 'p1' } });
    expect(got).toEqual([]);
  });

  test('events still in flight for a dropped subscription do not reach the one that replaces it', async () => {
    const client = newClient();
    const a: number[] = [];
    const b: number[] = [];
    const stopA = client.subscribe('posts', { filter: 'x = 1', onEvent: (e) => a.push(e.seq) });
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    socket.confirmSubscriptions();
    stopA();
    client.subscribe('posts', { filter: 'x = 2', onEvent: (e) => b.push(e.seq) });
    expect(FakeSocket.instances).toHaveLength(1); // the same socket: A is gone
    expect(socket.sent.slice(-2)).toEqual([
      { action: 'unsubscribe', collection: 'posts' },
      { action: 'subscribe', collection: 'posts', filter: 'x = 2' },
    ]);
    socket.event({ collection: 'posts', seq: 1, data: { id: 'for-a', x: 1 } }); // written before the unsubscribe
    socket.message('unsubscribed', { collection: 'posts' });
    socket.confirmSubscriptions();
    socket.event({ collection: 'posts', seq: 2, data: { id: 'for-b', x: 2 } });
    expect(a).toEqual([]);
    expect(b).toEqual([2]);
  });

  test('identical subscriptions share one server subscription', async () => {
    const client = newClient();
    const a: number[] = [];
    const b: number[] = [];
    const stopA = client.subscribe('posts', { filter: { x: 1, y: 2 }, onEvent: (e) => a.push(e.seq) });
    const stopB = client.subscribe('posts', { filter: { y: 2, x: 1 }, onEvent: (e) => b.push(e.seq) });
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    socket.confirmSubscriptions();
    expect(socket.actions('subscribe')).toHaveLength(1);
    expect(FakeSocket.instances).toHaveLength(1);
    socket.event({ collection: 'posts', seq: 1, data: { id: 'p' } });
    expect([a, b]).toEqual([[1], [1]]);
    stopA();
    expect(socket.actions('unsubscribe')).toHaveLength(0);
    socket.event({ collection: 'posts', seq: 2, data: { id: 'p' } });
    expect([a, b]).toEqual([[1], [1, 2]]);
    stopB();
    expect(socket.actions('unsubscribe')).toHaveLength(1);
  });

  test('overlapping subscriptions get their own socket (the server would replace or double them)', async () => {
    const client = newClient();
    const cheap: number[] = [];
    const pricey: number[] = [];
    const all: number[] = [];
    client.subscribe('products', { filter: 'price < 10', onEvent: (e) => cheap.push(e.seq) });
    client.subscribe('products', { filter: 'price > 100', onEvent: (e) => pricey.push(e.seq) });
    client.subscribe('*', { onEvent: (e) => all.push(e.seq) });
    client.subscribe('posts', { recordId: 'p1', onEvent: () => {} });
    client.subscribe('posts', { recordId: 'p2', onEvent: () => {} }); // no overlap with p1
    await flush();
    expect(FakeSocket.instances).toHaveLength(3);
    for (const socket of FakeSocket.instances) {
      socket.accept();
      socket.confirmSubscriptions();
    }
    const [first, second, third] = FakeSocket.instances as [FakeSocket, FakeSocket, FakeSocket];
    expect(first.actions('subscribe').map((a) => [a.collection, a.record_id])).toEqual([['products', undefined], ['posts', 'p1'], ['posts', 'p2']]);
    expect(second.actions('subscribe').map((a) => a.collection)).toEqual(['products']);
    expect(third.actions('subscribe').map((a) => a.collection)).toEqual(['*']);
    // Each socket's events go to its own subscription.
    first.event({ collection: 'products', seq: 1, data: { id: 'a', price: 5 } });
    second.event({ collection: 'products', seq: 2, data: { id: 'b', price: 500 } });
    third.event({ collection: 'products', seq: 1, data: { id: 'a', price: 5 } });
    third.event({ collection: 'products', seq: 2, data: { id: 'b', price: 500 } });
    expect([cheap, pricey, all]).toEqual([[1], [2], [1, 2]]);
    expect(client.state).toBe('connected');
  });

  test('an extra socket closes when its last subscription goes', async () => {
    const client = newClient();
    client.subscribe('products', { filter: 'price < 10', onEvent: () => {} });
    const stop = client.subscribe('products', { filter: 'price > 100', onEvent: () => {} });
    await flush();
    const [, extra] = FakeSocket.instances as [FakeSocket, FakeSocket];
    extra.accept();
    extra.confirmSubscriptions();
    stop();
    expect(extra.closedByClient).not.toBeNull();
  });

  test('a callback that throws does not stop the others; the error is reported', async () => {
    const client = newClient();
    const errors: Error[] = [];
    client.onError((e) => errors.push(e));
    const got: number[] = [];
    client.subscribe('posts', { filter: 'a = 1', onEvent: () => { throw new Error('boom'); } });
    client.subscribe('posts', { filter: 'a = 1', onEvent: (e) => got.push(e.seq) });
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    socket.confirmSubscriptions();
    socket.event({ collection: 'posts', seq: 1, data: { id: 'x' } });
    expect(got).toEqual([1]);
    expect(errors.map((e) => e.message)).toEqual(['boom']);
  });

  test('argument checks', () => {
    const client = newClient({ autoConnect: false });
    expect(() => client.subscribe('', { onEvent: () => {} })).toThrow(TypeError);
    expect(() => client.subscribe('posts', {} as never)).toThrow(TypeError);
    expect(() => client.subscribe('posts', { since: -1, onEvent: () => {} })).toThrow(TypeError);
    expect(() => newClient({ url: 'ftp://x' })).toThrow(TypeError);
  });
});

describe('reconnecting and resuming', () => {
  test('after a drop: full-jitter backoff, then every subscription resumes from its last seq', async () => {
    const client = newClient();
    const states: ConnectionState[] = [];
    client.onStateChange((s) => states.push(s));
    const got: number[] = [];
    const infos: SubscribedInfo[] = [];
    client.subscribe('posts', { onEvent: (e) => got.push(e.seq), onSubscribed: (i) => infos.push(i) });
    client.subscribe('quiet', { onEvent: () => {} });
    client.subscribe('presence', { filter: 'channel = null', onEvent: () => {} });
    await flush();
    let socket = FakeSocket.last;
    socket.accept();
    socket.confirmSubscriptions(0);
    socket.event({ collection: 'posts', seq: 7, data: { id: 'a' } });
    socket.event({ collection: 'posts', seq: 9, data: { id: 'b' } });
    socket.event({ collection: 'presence', type: 'user.joined', seq: 0, data: { user_id: 'u' } });

    socket.drop(1006);
    expect(client.state).toBe('reconnecting');
    // Retry 1: random 0.5 of a 1000 ms window.
    await vi.advanceTimersByTimeAsync(499);
    expect(FakeSocket.instances).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(FakeSocket.instances).toHaveLength(2);
    // That attempt fails too: retry 2 waits 0.5 of 2000 ms.
    FakeSocket.last.drop(1006);
    await vi.advanceTimersByTimeAsync(999);
    expect(FakeSocket.instances).toHaveLength(2);
    await vi.advanceTimersByTimeAsync(1);
    expect(FakeSocket.instances).toHaveLength(3);

    socket = FakeSocket.last;
    socket.accept();
    expect(socket.actions('subscribe')).toEqual([
      { action: 'subscribe', collection: 'posts', since: 9 },
      // Never received anything and the server's head was 0: no position.
      { action: 'subscribe', collection: 'quiet' },
      // Presence events (seq 0) do not make a position either.
      { action: 'subscribe', collection: 'presence', filter: 'channel = null' },
    ]);
    socket.confirmSubscriptions();
    expect(infos.map((i) => [i.resumed, i.since])).toEqual([[false, null], [true, 9]]);
    socket.event({ collection: 'posts', seq: 9, data: { id: 'b' } }); // a duplicate
    socket.event({ collection: 'posts', seq: 12, data: { id: 'c' } });
    expect(got).toEqual([7, 9, 12]);
    expect(states).toEqual(['connected', 'reconnecting', 'connected']);

    // Connected again: the backoff starts over.
    socket.drop(1006);
    await vi.advanceTimersByTimeAsync(500);
    expect(FakeSocket.instances).toHaveLength(4);
  });

  test('`*` over several NATS streams keeps one position per stream and resumes from the token', async () => {
    const client = newClient();
    const got: string[] = [];
    client.subscribe('*', { onEvent: (e) => got.push(`${e.partition}:${e.seq}`) });
    await flush();
    let socket = FakeSocket.last;
    socket.accept();
    socket.message('subscribed', { collection: '*', filter: null, subscription_id: 1, head_seq: 0, head_position: '5,0,7' });
    socket.event({ collection: 'a', seq: 6, partition: 0, data: { id: 'a6' } });
    // A lower seq in another stream is no duplicate; one at or below its stream's position is.
    socket.event({ collection: 'b', seq: 1, partition: 1, data: { id: 'b1' } });
    socket.event({ collection: 'c', seq: 7, partition: 2, data: { id: 'c7' } });
    socket.event({ collection: 'c', seq: 8, partition: 2, data: { id: 'c8' } });
    expect(got).toEqual(['0:6', '1:1', '2:8']);

    socket.drop(1006);
    await vi.advanceTimersByTimeAsync(500);
    socket = FakeSocket.last;
    socket.accept();
    expect(socket.actions('subscribe')).toEqual([{ action: 'subscribe', collection: '*', since: '6,1,8' }]);
  });

  test('`since` takes a position token, and refuses what is neither a seq nor a token', async () => {
    const client = newClient();
    client.subscribe('*', { since: '3,0,9', onEvent: () => {} });
    await flush();
    FakeSocket.last.accept();
    expect(FakeSocket.last.actions('subscribe')).toEqual([{ action: 'subscribe', collection: '*', since: '3,0,9' }]);
    expect(() => client.subscribe('*', { since: '3,x', onEvent: () => {} })).toThrow(TypeError);
  });

  test('a subscription that never received an event resumes from the head seq of its subscribe', async () => {
    const client = newClient();
    client.subscribe('quiet', { onEvent: () => {} });
    await flush();
    FakeSocket.last.accept();
    FakeSocket.last.confirmSubscriptions(42);
    FakeSocket.last.drop(1001);
    await vi.advanceTimersByTimeAsync(500);
    FakeSocket.last.accept();
    expect(FakeSocket.last.actions('subscribe')).toEqual([{ action: 'subscribe', collection: 'quiet', since: 42 }]);
  });

  test('the server reason before a close is reported (close 4008 "too slow")', async () => {
    const client = newClient();
    const errors: StromError[] = [];
    client.onError((e) => errors.push(e as StromError));
    client.subscribe('posts', { onEvent: () => {} });
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    socket.confirmSubscriptions();
    socket.message('error', { code: 'resource_exhausted', message: 'too slow: reconnect and resume from the last seq received' });
    socket.drop(4008, 'too slow');
    expect(errors).toHaveLength(1);
    expect(errors[0]).toMatchObject({ code: 'resource_exhausted', closeCode: 4008 });
    await vi.advanceTimersByTimeAsync(500);
    expect(FakeSocket.instances).toHaveLength(2);
  });

  test('close() stops reconnecting; connect() resumes the registered subscriptions', async () => {
    const client = newClient();
    client.subscribe('posts', { onEvent: () => {} });
    await flush();
    FakeSocket.last.accept();
    FakeSocket.last.confirmSubscriptions();
    FakeSocket.last.event({ collection: 'posts', seq: 3, data: { id: 'a' } });
    client.close();
    expect(client.state).toBe('disconnected');
    await vi.advanceTimersByTimeAsync(60_000);
    expect(FakeSocket.instances).toHaveLength(1);
    client.connect();
    await flush();
    FakeSocket.last.accept();
    expect(FakeSocket.last.actions('subscribe')).toEqual([{ action: 'subscribe', collection: 'posts', since: 3 }]);
  });

  test('a socket silent past heartbeatTimeoutMs is replaced', async () => {
    newClient({ heartbeatTimeoutMs: 5_000 });
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    await vi.advanceTimersByTimeAsync(4_000);
    socket.message('ping', {});
    await vi.advanceTimersByTimeAsync(4_000);
    expect(socket.closedByClient).toBeNull();
    await vi.advanceTimersByTimeAsync(1_000);
    expect(socket.closedByClient).not.toBeNull();
    await vi.advanceTimersByTimeAsync(500);
    expect(FakeSocket.instances).toHaveLength(2);
  });

  test('reset goes to the subscription it names', async () => {
    const client = newClient();
    const resets: Array<[string, ResetInfo]> = [];
    client.subscribe('a', { since: 1, onEvent: () => {}, onReset: (i) => resets.push(['a', i]) });
    client.subscribe('b', { since: 1, onEvent: () => {}, onReset: (i) => resets.push(['b', i]) });
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    socket.confirmSubscriptions(); // ids 1 (a) and 2 (b)
    socket.message('reset', { collection: 'b', subscription_id: 2, since: 1, first_available_seq: 500 });
    expect(resets).toEqual([['b', { collection: 'b', since: 1, firstAvailableSeq: 500 }]]);
  });
});

describe('errors', () => {
  test('a bad filter is permanent: reported, dropped, not resubscribed', async () => {
    const client = newClient();
    const errors: StromError[] = [];
    client.subscribe('posts', { filter: 'price >', onEvent: () => {}, onError: (e) => errors.push(e as StromError) });
    client.subscribe('other', { onEvent: () => {} });
    await flush();
    let socket = FakeSocket.last;
    socket.accept();
    socket.message('error', { code: 'invalid_argument', message: "invalid filter: at column 8: expected a value after '>'" });
    socket.message('subscribed', { collection: 'other', subscription_id: 1, head_seq: 0 });
    expect(errors.map((e) => e.code)).toEqual(['invalid_argument']);
    socket.drop();
    await vi.advanceTimersByTimeAsync(500);
    socket = FakeSocket.last;
    socket.accept();
    expect(socket.actions('subscribe').map((a) => a.collection)).toEqual(['other']);
  });

  test('a refusal that may pass (permission_denied) is retried after auth', async () => {
    const client = newClient({ token: 'old' });
    const errors: StromError[] = [];
    let live = 0;
    client.subscribe('secret', { onEvent: () => {}, onError: (e) => errors.push(e as StromError), onSubscribed: () => { live += 1; } });
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    socket.message('error', { code: 'permission_denied', message: 'no' });
    expect(errors.map((e) => e.code)).toEqual(['permission_denied']);
    const done = client.setToken('new');
    await flush();
    expect(socket.actions('auth')).toEqual([{ action: 'auth', token: 'new' }]);
    socket.message('authenticated', { user_id: 'u', expires_at: '2030-01-01T00:00:00Z' });
    await done;
    expect(socket.actions('subscribe')).toHaveLength(2);
    socket.confirmSubscriptions();
    expect(live).toBe(1);
  });

  test('setToken rejects when the server refuses the token', async () => {
    const client = newClient();
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    const done = client.setToken('bad');
    await flush();
    socket.message('error', { code: 'unauthenticated', message: 'invalid token' });
    await expect(done).rejects.toMatchObject({ code: 'unauthenticated', message: 'invalid token' });
  });

  test('an error nobody asked for goes to onError', async () => {
    const client = newClient();
    const errors: Error[] = [];
    client.onError((e) => errors.push(e));
    await flush();
    FakeSocket.last.accept();
    FakeSocket.last.message('error', { code: 'unavailable', message: 'shutting down' });
    FakeSocket.last.drop(1001);
    expect(errors[0]).toBeInstanceOf(StromError);
    expect(errors[0]).toMatchObject({ code: 'unavailable', closeCode: 1001 });
  });
});

describe('tokens', () => {
  test('a token function is called for every connection; after 4001 the new token is used', async () => {
    let n = 0;
    const client = newClient({ token: () => `t${++n}` });
    const errors: StromError[] = [];
    client.onError((e) => errors.push(e as StromError));
    await flush();
    expect(FakeSocket.last.url.searchParams.get('token')).toBe('t1');
    FakeSocket.last.accept();
    FakeSocket.last.message('error', { code: 'unauthenticated', message: 'the token expired' });
    FakeSocket.last.drop(4001, 'the token expired');
    expect(errors[0]).toMatchObject({ code: 'unauthenticated', closeCode: 4001 });
    await vi.advanceTimersByTimeAsync(500);
    expect(FakeSocket.last.url.searchParams.get('token')).toBe('t2');
  });

  test('with a token function, a token is refreshed with auth before its exp', async () => {
    vi.setSystemTime(new Date('2030-01-01T00:00:00Z'));
    const now = Math.floor(Date.now() / 1000);
    let n = 0;
    const tokens: string[] = [];
    newClient({
      token: async () => {
        n += 1;
        const token = jwt({ sub: 'u', n, exp: now + 120 * n });
        tokens.push(token);
        return token;
      },
      tokenRefreshMarginMs: 30_000,
      heartbeatTimeoutMs: 0, // no pings in this test
    });
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    // The first token expires at +120 s: refreshed at +90 s.
    await vi.advanceTimersByTimeAsync(89_000);
    expect(socket.actions('auth')).toHaveLength(0);
    await vi.advanceTimersByTimeAsync(1_000);
    expect(socket.actions('auth')).toEqual([{ action: 'auth', token: tokens[1] }]);
    socket.message('authenticated', { user_id: 'u' });
    // The second expires at +240 s: refreshed at +210 s.
    await vi.advanceTimersByTimeAsync(119_000);
    expect(socket.actions('auth')).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(1_000);
    expect(socket.actions('auth')).toHaveLength(2);
  });

  test('a failing token function is reported and retried with backoff', async () => {
    let fail = true;
    const client = newClient({ token: () => { if (fail) throw new Error('auth server down'); return 'ok'; } });
    const errors: Error[] = [];
    client.onError((e) => errors.push(e));
    await flush();
    expect(FakeSocket.instances).toHaveLength(0);
    expect(errors[0]?.message).toMatch(/auth server down/);
    fail = false;
    await vi.advanceTimersByTimeAsync(500);
    expect(FakeSocket.last.url.searchParams.get('token')).toBe('ok');
  });
});

describe('channels', () => {
  test('broadcast uses the publish action with ack; replies are matched in order', async () => {
    const client = newClient();
    client.subscribe('chat.room', { echo: true, onEvent: () => {} });
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    expect(socket.actions('subscribe')).toEqual([{ action: 'subscribe', collection: 'chat.room', echo: true }]);
    const first = client.broadcast('chat.room', { text: 'hi' });
    const second = client.broadcast('chat.room', { text: 'x'.repeat(10) });
    expect(socket.actions('publish')).toEqual([
      { action: 'publish', channel: 'chat.room', data: { text: 'hi' }, ack: true },
      { action: 'publish', channel: 'chat.room', data: { text: 'xxxxxxxxxx' }, ack: true },
    ]);
    socket.confirmSubscriptions();
    socket.message('ack', { channel: 'chat.room', seq: 11 });
    socket.message('error', { code: 'resource_exhausted', message: 'too many messages' });
    await expect(first).resolves.toBe(11);
    await expect(second).rejects.toMatchObject({ code: 'resource_exhausted' });
  });

  test('without an open WebSocket, broadcast goes over REST', async () => {
    const calls: Array<[string, RequestInit]> = [];
    const fetchStub = (async (url: string, init: RequestInit) => {
      calls.push([url, init]);
      return new Response(JSON.stringify({ seq: 5 }), { status: 200 });
    }) as unknown as typeof fetch;
    const client = newClient({ fetch: fetchStub, token: 'tok', autoConnect: false });
    await expect(client.broadcast('chat.room', { a: 1 })).resolves.toBe(5);
    expect(calls[0]![0]).toBe('http://strom.test:8000/api/v1/broadcast');
    expect(JSON.parse(String(calls[0]![1].body))).toEqual({ channel: 'chat.room', data: { a: 1 } });
    expect((calls[0]![1].headers as Record<string, string>).authorization).toBe('Bearer tok');
  });

  test('a publish in flight when the socket drops is rejected', async () => {
    const client = newClient();
    await flush();
    FakeSocket.last.accept();
    const pending = client.broadcast('chat.room', {});
    FakeSocket.last.drop(1006);
    await expect(pending).rejects.toBeInstanceOf(StromError);
  });
});
