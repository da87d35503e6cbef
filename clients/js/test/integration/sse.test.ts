// The SSE transport (fetch streaming) against the real strom binary, and the
// `auto` transport falling back to it.

import { afterAll, afterEach, beforeAll, expect, test } from 'vitest';

import { StromClient, StromError, type WebSocketLike } from '../../src/index.js';
import { collector } from '../helpers/collect.js';
import { type StromHandle, killAll, publishRaw, startStrom, uniqueCollection, until } from '../helpers/servers.js';

let server: StromHandle;
const clients: StromClient[] = [];

function sseClient(options: Partial<ConstructorParameters<typeof StromClient>[0]> = {}): StromClient {
  const c = new StromClient({ url: server.baseUrl, transport: 'sse', backoff: { baseMs: 50, maxMs: 500 }, ...options });
  clients.push(c);
  return c;
}

async function subscribed(c: StromClient, collection: string, options: Omit<Parameters<StromClient['subscribe']>[1], 'onSubscribed'>): Promise<() => void> {
  let live = false;
  const stop = c.subscribe(collection, { ...options, onSubscribed: () => { live = true; } });
  await until(`subscribed to ${collection}`, () => live);
  return stop;
}

beforeAll(async () => {
  server = await startStrom();
});

afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});

afterAll(async () => {
  await killAll();
});

test('SSE streams receive events through object and text filters', async () => {
  const c = sseClient();
  expect(c.transportKind).toBe('sse');
  const posts = uniqueCollection('posts');
  const byObject = collector();
  const byText = collector();
  const byRecord = collector();
  // The object shorthand is sent as the text form SSE takes.
  await subscribed(c, posts, { filter: { published: true, author: { name: 'ann "the" dev' }, tag: ['a', 'b'] }, onEvent: byObject.onEvent });
  await subscribed(c, posts, { filter: 'views >= 10', onEvent: byText.onEvent });
  await subscribed(c, posts, { recordId: 'r2', onEvent: byRecord.onEvent });
  expect(c.state).toBe('connected');

  const publish = (id: string, data: Record<string, unknown>) =>
    publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: id, data: { id, ...data } });
  await publish('r1', { published: true, author: { name: 'ann "the" dev' }, tag: 'a', views: 1 });
  await publish('r2', { published: true, author: { name: 'bob' }, tag: 'a', views: 50 });
  await publish('r3', { published: true, author: { name: 'ann "the" dev' }, tag: 'c', views: 10 });

  await byObject.waitFor(1);
  await byText.waitFor(2);
  await byRecord.waitFor(1);
  expect(byObject.ids()).toEqual(['r1']);
  expect(byText.ids()).toEqual(['r2', 'r3']);
  expect(byRecord.ids()).toEqual(['r2']);
  expect(byText.events[0]).toMatchObject({ type: 'record.created', collection: posts, record_id: 'r2', old_data: null });
});

test('SSE on "*" and with since', async () => {
  const a = uniqueCollection('a');
  const b = uniqueCollection('b');
  const first = await publishRaw(server.baseUrl, { type: 'record.created', collection: a, record_id: '1', data: { id: '1' } });
  const second = await publishRaw(server.baseUrl, { type: 'record.created', collection: b, record_id: '2', data: { id: '2' } });
  const c = sseClient();
  const all = collector();
  await subscribed(c, '*', {
    since: first - 1,
    onEvent: (e) => { if (e.collection === a || e.collection === b) all.onEvent(e); },
  });
  const third = await publishRaw(server.baseUrl, { type: 'record.updated', collection: a, record_id: '1', data: { id: '1', v: 2 } });
  await all.waitFor(3);
  expect(all.events.map((e) => e.seq)).toEqual([first, second, third]);
});

test('a filter the server cannot parse is a permanent error for that subscription', async () => {
  const c = sseClient();
  const errors: Error[] = [];
  c.subscribe(uniqueCollection('posts'), { filter: 'price >', onEvent: () => {}, onError: (e) => errors.push(e) });
  await until('the error', () => errors.length === 1);
  expect(errors[0]).toBeInstanceOf(StromError);
  expect(errors[0]).toMatchObject({ code: 'invalid_argument', status: 400 });
  // Not retried: the connection state does not stay "connecting" for it.
  await until('connected', () => c.state === 'connected');
});

test('auto: when WebSocket cannot connect but HTTP works, the client falls back to SSE', async () => {
  // A WebSocket that always fails, like one blocked by a proxy.
  class BlockedWebSocket implements WebSocketLike {
    readyState = 0;
    onopen: ((event: unknown) => void) | null = null;
    onmessage: ((event: unknown) => void) | null = null;
    onclose: ((event: { code: number; reason: string }) => void) | null = null;
    onerror: ((event: unknown) => void) | null = null;
    constructor() {
      queueMicrotask(() => {
        this.readyState = 3;
        this.onerror?.({});
        this.onclose?.({ code: 1006, reason: '' });
      });
    }
    send(): void { throw new Error('not open'); }
    close(): void {}
  }
  const c = new StromClient({ url: server.baseUrl, transport: 'auto', WebSocket: BlockedWebSocket, backoff: { baseMs: 10, maxMs: 50 } });
  clients.push(c);
  const posts = uniqueCollection('posts');
  const got = collector();
  c.subscribe(posts, { onEvent: got.onEvent });
  await until('fell back to SSE', () => c.transportKind === 'sse' && c.state === 'connected');
  await publishRaw(server.baseUrl, { type: 'record.created', collection: posts, record_id: 'x', data: { id: 'x' } });
  await got.waitFor(1);
});
