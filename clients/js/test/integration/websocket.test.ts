// The WebSocket transport against the real strom binary (in-memory bus).

import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import WebSocket from 'ws';

import { type ConnectionState, StromClient, StromError, applyLiveEvent, type JsonObject } from '../../src/index.js';
import { collector } from '../helpers/collect.js';
import { signJwt } from '../helpers/jwt.js';
import { type StromHandle, freePort, killAll, publishRaw, startStrom, uniqueCollection, until } from '../helpers/servers.js';

let server: StromHandle;
const clients: StromClient[] = [];

function client(options: Partial<ConstructorParameters<typeof StromClient>[0]> = {}): StromClient {
  const c = new StromClient({ url: server.baseUrl, WebSocket, transport: 'websocket', backoff: { baseMs: 50, maxMs: 500 }, ...options });
  clients.push(c);
  return c;
}

/** Subscribes and resolves once the server confirmed the subscription. */
async function subscribed(c: StromClient, collection: string, options: Omit<Parameters<StromClient['subscribe']>[1], 'onSubscribed'>): Promise<() => void> {
  let live = false;
  const stop = c.subscribe(collection, { ...options, onSubscribed: () => { live = true; } });
  await until(`subscribed to ${collection}`, () => live);
  return stop;
}

beforeAll(async () => {
  server = await startStrom({ args: ['--ws-ping-interval', '100ms', '--ws-idle-timeout', '500ms'] });
});

afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});

afterAll(async () => {
  await killAll();
});

describe('subscriptions over WebSocket', () => {
  test('object and text filters on the same collection each get only their matches', async () => {
    const c = client();
    const products = uniqueCollection('products');
    const cheap = collector();
    const pricey = collector();
    await subscribed(c, products, { filter: { tier: 'cheap' }, onEvent: cheap.onEvent });
    await subscribed(c, products, { filter: 'price > 100', onEvent: pricey.onEvent });

    await publishRaw(server.baseUrl, { type: 'record.created', collection: products, record_id: 'a', data: { id: 'a', tier: 'cheap', price: 5 } });
    await publishRaw(server.baseUrl, { type: 'record.created', collection: products, record_id: 'b', data: { id: 'b', tier: 'lux', price: 500 } });
    await publishRaw(server.baseUrl, { type: 'record.created', collection: products, record_id: 'c', data: { id: 'c', tier: 'cheap', price: 150 } });

    await cheap.waitFor(2);
    await pricey.waitFor(2);
    expect(cheap.ids()).toEqual(['a', 'c']);
    expect(pricey.ids()).toEqual(['b', 'c']);
    const event = cheap.events[0]!;
    expect(event).toMatchObject({ type: 'record.created', collection: products, record_id: 'a', old_data: null });
    expect(event.seq).toBeGreaterThan(0);
    expect(event.timestamp).toMatch(/^\d{4}-\d{2}-\d{2}T/);
  });

  test('a record subscription, a collection subscription and "*" each get an event exactly once', async () => {
    const c = client();
    const posts = uniqueCollection('posts');
    const one = collector();
    const all = collector();
    const everything = collector();
    await subscribed(c, posts, { recordId: 'p1', onEvent: one.onEvent });
    await subscribed(c, posts, { onEvent: all.onEvent });
    await subscribed(c, '*', { onEvent: (e) => { if (e.collection === posts) everything.onEvent(e); } });

    await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'p2', data: { id: 'p2' } });
    await publishRaw(server.baseUrl, { type: 'record.updated', collection: posts, record_id: 'p1', data: { id: 'p1' } });
    await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'p3', data: { id: 'p3' } });

    await all.waitFor(3);
    await everything.waitFor(3);
    await one.waitFor(1);
    expect(all.ids()).toEqual(['p2', 'p1', 'p3']);
    expect(everything.ids()).toEqual(['p2', 'p1', 'p3']);
    expect(one.ids()).toEqual(['p1']);
  });

  test('two identical subscriptions share one server subscription and both get events', async () => {
    const c = client();
    const posts = uniqueCollection('posts');
    const first = collector();
    const second = collector();
    await subscribed(c, posts, { filter: { published: true }, onEvent: first.onEvent });
    await subscribed(c, posts, { filter: { published: true }, onEvent: second.onEvent });
    await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'x', data: { id: 'x', published: true } });
    await first.waitFor(1);
    await second.waitFor(1);
    const stats = await (await fetch(`${server.baseUrl}/api/v1/stats`)).json() as { subscriptions: Record<string, string[]> };
    const mine = Object.values(stats.subscriptions).flat().filter((name) => name === posts);
    expect(mine).toHaveLength(1);
  });

  test('an update leaving the filter arrives with left_filter and removes the record from a live list', async () => {
    const c = client();
    const posts = uniqueCollection('posts');
    let list: JsonObject[] = [];
    const seen = collector();
    await subscribed(c, posts, {
      filter: { published: true },
      onEvent: (e) => { seen.onEvent(e); list = applyLiveEvent(list, e); },
    });
    const live = { id: 'p1', title: 'Live', published: true };
    await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'p1', data: live });
    await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'p2', data: { id: 'p2', published: true } });
    await seen.waitFor(2);
    expect(list.map((r) => r.id)).toEqual(['p1', 'p2']);
    await publishRaw(server.baseUrl, { type: 'record.updated', collection: posts, record_id: 'p1', data: { ...live, published: false }, old_data: live });
    await seen.waitFor(3);
    expect(seen.events[2]!.left_filter).toBe(true);
    expect(list.map((r) => r.id)).toEqual(['p2']);
  });

  test('after unsubscribe no more events arrive', async () => {
    const c = client();
    const posts = uniqueCollection('posts');
    const marker = uniqueCollection('marker');
    const gone = collector();
    const stays = collector();
    const stop = await subscribed(c, posts, { onEvent: gone.onEvent });
    await subscribed(c, marker, { onEvent: stays.onEvent });
    await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'a', data: { id: 'a' } });
    await gone.waitFor(1);
    stop();
    stop(); // idempotent
    await until('the server dropped the subscription', async () => {
      const stats = await (await fetch(`${server.baseUrl}/api/v1/stats`)).json() as { subscriptions: Record<string, string[]> };
      return !Object.values(stats.subscriptions).flat().includes(posts);
    });
    await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'b', data: { id: 'b' } });
    await publishRaw(server.baseUrl, { type: 'record.created', collection: marker, record_id: 'm', data: { id: 'm' } });
    await stays.waitFor(1);
    expect(gone.ids()).toEqual(['a']);
  });

  test('since replays retained events first, then goes on live', async () => {
    const posts = uniqueCollection('posts');
    const s1 = await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'a', data: { id: 'a' } });
    const s2 = await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'b', data: { id: 'b' } });
    const s3 = await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'c', data: { id: 'c' } });
    const c = client();
    const got = collector();
    await subscribed(c, posts, { since: s1, onEvent: got.onEvent });
    const s4 = await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'd', data: { id: 'd' } });
    await got.waitFor(3);
    expect(got.events.map((e) => e.seq)).toEqual([s2, s3, s4]);
  });

  test('a bad filter is reported to that subscription only', async () => {
    const c = client();
    const posts = uniqueCollection('posts');
    const errors: Error[] = [];
    c.subscribe(posts, { filter: 'price >', onEvent: () => {}, onError: (e) => errors.push(e) });
    const good = collector();
    await subscribed(c, posts, { filter: 'price > 1', onEvent: good.onEvent });
    await until('the error', () => errors.length === 1);
    expect(errors[0]).toBeInstanceOf(StromError);
    expect((errors[0] as StromError).code).toBe('invalid_argument');
    expect(errors[0]!.message).toMatch(/column/);
    await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'a', data: { id: 'a', price: 2 } });
    await good.waitFor(1);
  });

  test('the client answers pings, so the idle timeout never closes it', async () => {
    const c = client();
    const posts = uniqueCollection('posts');
    const got = collector();
    await subscribed(c, posts, { onEvent: got.onEvent });
    const states: ConnectionState[] = [];
    c.onStateChange((s) => states.push(s));
    // The server pings every 100 ms and closes a connection silent for 500 ms:
    // let three idle timeouts pass.
    await sleep(1_600);
    await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'a', data: { id: 'a' } });
    await got.waitFor(1);
    expect(states).toEqual([]);
    expect(c.state).toBe('connected');
  });

  test('publish: one event, a batch, and a refused batch', async () => {
    const c = client();
    const posts = uniqueCollection('posts');
    const seq = await c.publish({ type: 'record.created', collection: posts, record_id: 'a', data: { id: 'a' } });
    expect(seq).toBeGreaterThan(0);
    const seqs = await c.publish([
      { type: 'record.created', collection: posts, record_id: 'b', data: { id: 'b' } },
      { type: 'record.deleted', collection: posts, record_id: 'a', data: { id: 'a' } },
    ]);
    expect(seqs).toHaveLength(2);
    expect(seqs[0]).toBeGreaterThan(seq);
    const refused = await c.publish([
      { type: 'record.created', collection: posts, data: {} },
      { type: 'record.nope' as 'record.created', collection: posts, data: {} },
    ]).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(StromError);
    expect(refused).toMatchObject({ code: 'invalid_argument', status: 400 });
    expect((refused as Error).message).toMatch(/\[1\]/);
  });
});

describe('tokens', () => {
  const secret = 'a-test-secret-that-is-long-enough-for-hs256';
  let authServer: StromHandle;
  let port: number;
  const token = (sub: string) => signJwt(secret, { sub, exp: Math.floor(Date.now() / 1000) + 3600 });

  beforeAll(async () => {
    port = await freePort();
    authServer = await startStrom({ port, args: ['--jwt-secret', secret] });
  });

  test('a token function is called on every connect; setToken re-authenticates with the auth action', async () => {
    let calls = 0;
    const c = new StromClient({
      url: authServer.baseUrl,
      WebSocket,
      transport: 'websocket',
      backoff: { baseMs: 50, maxMs: 300 },
      token: async () => { calls += 1; return token('alice'); },
    });
    clients.push(c);
    const posts = uniqueCollection('posts');
    const got = collector();
    let subscribedCount = 0;
    c.subscribe(posts, { onEvent: got.onEvent, onSubscribed: () => { subscribedCount += 1; } });
    await until('subscribed', () => subscribedCount === 1);
    expect(calls).toBeGreaterThanOrEqual(1);

    // A restart of the server: the client reconnects and asks for a token again.
    const before = calls;
    await authServer.stop();
    await until('reconnecting', () => c.state === 'reconnecting');
    authServer = await startStrom({ port, args: ['--jwt-secret', secret] });
    await until('resubscribed', () => subscribedCount === 2);
    expect(calls).toBeGreaterThan(before);
    await publishRaw(authServer.baseUrl, { type: 'record.created', collection: posts, record_id: 'a', data: { id: 'a' } }, signJwt(secret, { sub: 'svc', exp: Math.floor(Date.now() / 1000) + 60, strom: { publish: ['*'] } }));
    await got.waitFor(1);

    // setToken presents a new token on the open connection (the auth action)
    // and resolves once the server accepted it; a bad one is refused.
    await c.setToken(token('alice'));
    await expect(c.setToken('not-a-jwt')).rejects.toMatchObject({ code: 'unauthenticated' });
    expect(c.state).toBe('connected');
  });

  test('without a token the server refuses the subscription; setToken lets it through', async () => {
    const c = new StromClient({ url: authServer.baseUrl, WebSocket, transport: 'websocket' });
    clients.push(c);
    const posts = uniqueCollection('posts');
    const errors: StromError[] = [];
    let live = false;
    c.subscribe(posts, { onEvent: () => {}, onError: (e) => errors.push(e as StromError), onSubscribed: () => { live = true; } });
    await until('refused', () => errors.length === 1);
    expect(['unauthenticated', 'permission_denied']).toContain(errors[0]!.code);
    await c.setToken(token('bob'));
    await until('subscribed after auth', () => live);
  });

  test('a refused publish is a StromError with the HTTP status', async () => {
    const c = new StromClient({ url: authServer.baseUrl, WebSocket, token: token('carol'), autoConnect: false });
    const error = await c.publish({ type: 'record.created', collection: 'posts', data: {} }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(StromError);
    expect((error as StromError).status).toBe(403);
    expect((error as StromError).code).toBe('permission_denied');
  });
});
