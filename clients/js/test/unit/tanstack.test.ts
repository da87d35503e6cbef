// strom-client/tanstack: the pure cache update, and syncQueryCache driving a
// real QueryClient (query-core) from a StromClient on a fake socket.

import { QueryClient, QueryObserver } from '@tanstack/query-core';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';

import { type EventType, type JsonObject, type StromEvent, StromClient } from '../../src/index.js';
import { type CacheStrategy, cacheUpdate, syncQueryCache } from '../../src/tanstack.js';
import { FakeSocket } from '../helpers/fake-socket.js';

let seq = 0;
function event(type: EventType, data: JsonObject, extra: Partial<StromEvent> = {}): StromEvent {
  seq += 1;
  return { type, collection: 'posts', record_id: String(data.id ?? ''), data, old_data: null, timestamp: 't', seq, ...extra };
}

const a = { id: 'a', title: 'A', tags: ['x'] };
const b = { id: 'b', title: 'B' };

describe('cacheUpdate', () => {
  test('merge (default): merges into the record with that id, adds new ones at the end', () => {
    expect(cacheUpdate([a, b], event('record.updated', { id: 'a', title: 'A2' }), {})).toEqual({ data: [{ id: 'a', title: 'A2', tags: ['x'] }, b] });
    expect(cacheUpdate([a], event('record.created', b), {})).toEqual({ data: [a, b] });
    expect(cacheUpdate([a], event('record.updated', b), {})).toEqual({ data: [a, b] }); // entered the filter
  });

  test('replace: replaces the record', () => {
    expect(cacheUpdate([a, b], event('record.updated', { id: 'a', title: 'A2' }), { updateType: 'replace' })).toEqual({ data: [{ id: 'a', title: 'A2' }, b] });
  });

  test('append: adds created records, replaces known ones, ignores updates of others', () => {
    const rule = { updateType: 'append' as const };
    expect(cacheUpdate([a], event('record.created', b), rule)).toEqual({ data: [a, b] });
    expect(cacheUpdate([a], event('record.updated', b), rule)).toBeNull();
    expect(cacheUpdate([a], event('record.updated', { id: 'a', title: 'A2' }), rule)).toEqual({ data: [{ id: 'a', title: 'A2' }] });
  });

  test('remove: any created or updated event takes the record out', () => {
    const rule = { updateType: 'remove' as const };
    expect(cacheUpdate([a, b], event('record.updated', { id: 'a', done: true }), rule)).toEqual({ data: [b] });
    expect(cacheUpdate([b], event('record.created', a), rule)).toBeNull();
  });

  test('deletes and left_filter remove, whatever the updateType', () => {
    for (const updateType of ['merge', 'replace', 'append', 'remove'] as const) {
      expect(cacheUpdate([a, b], event('record.deleted', {}, { record_id: 'a' }), { updateType })).toEqual({ data: [b] });
      expect(cacheUpdate([a, b], event('record.updated', { id: 'b', title: 'B' }, { left_filter: true }), { updateType })).toEqual({ data: [a] });
    }
    expect(cacheUpdate([a], event('record.deleted', { id: 'zzz' }), {})).toBeNull();
  });

  test('a single record: updated when it is the event\'s, invalidated when it goes', () => {
    expect(cacheUpdate(a, event('record.updated', { id: 'a', title: 'A2' }), {})).toEqual({ data: { id: 'a', title: 'A2', tags: ['x'] } });
    expect(cacheUpdate(a, event('record.updated', { id: 'a', title: 'A2' }), { updateType: 'replace' })).toEqual({ data: { id: 'a', title: 'A2' } });
    expect(cacheUpdate(a, event('record.updated', b), {})).toBeNull();
    expect(cacheUpdate(a, event('record.deleted', { id: 'a' }), {})).toEqual({ invalidate: true });
    expect(cacheUpdate(a, event('record.updated', { id: 'a' }, { left_filter: true }), {})).toEqual({ invalidate: true });
  });

  test('transform and key: the cached shape is the transformed one', () => {
    const rule = {
      key: 'slug',
      transform: (data: JsonObject) => ({ slug: data.id, headline: String(data.title).toUpperCase() }),
    };
    const cached = [{ slug: 'a', headline: 'A', extra: 1 }];
    expect(cacheUpdate(cached, event('record.updated', { id: 'a', title: 'new' }), rule)).toEqual({ data: [{ slug: 'a', headline: 'NEW', extra: 1 }] });
    expect(cacheUpdate(cached, event('record.deleted', {}, { record_id: 'a' }), rule)).toEqual({ data: [] });
  });

  test('version: an older event leaves a newer cached record alone', () => {
    const rule = { version: 'v' };
    const cached = [{ id: 'a', v: 3 }];
    expect(cacheUpdate(cached, event('record.updated', { id: 'a', v: 2 }), rule)).toBeNull();
    expect(cacheUpdate(cached, event('record.deleted', { id: 'a', v: 2 }), rule)).toBeNull();
    expect(cacheUpdate({ id: 'a', v: 3 }, event('record.updated', { id: 'a', v: 2 }), rule)).toBeNull();
    expect(cacheUpdate(cached, event('record.updated', { id: 'a', v: 4 }), rule)).toEqual({ data: [{ id: 'a', v: 4 }] });
  });

  test('sort, and what is left alone', () => {
    const byTitle = (x: JsonObject, y: JsonObject) => String(x.title).localeCompare(String(y.title));
    expect(cacheUpdate([b], event('record.created', a), { sort: byTitle })).toEqual({ data: [a, b] });
    expect(cacheUpdate(undefined, event('record.created', a), {})).toBeNull(); // not loaded yet
    expect(cacheUpdate('text', event('record.created', a), {})).toBeNull();
    expect(cacheUpdate([a], event('broadcast', { id: 'a' }), {})).toBeNull();
    expect(cacheUpdate([a], event('record.created', {}, { record_id: null }), {})).toBeNull();
  });
});

describe('syncQueryCache', () => {
  let queryClient: QueryClient;
  let client: StromClient;
  const stops: Array<() => void> = [];
  const flush = () => new Promise((resolve) => setTimeout(resolve, 0));

  function deferred<T>() {
    let resolve!: (value: T) => void;
    const promise = new Promise<T>((res) => { resolve = res; });
    return { promise, resolve };
  }

  /** An active query (one observer) whose fetches the test resolves. */
  function observe(queryKey: unknown[]) {
    const fetches: Array<ReturnType<typeof deferred<unknown>>> = [];
    const observer = new QueryObserver(queryClient, {
      queryKey,
      queryFn: () => {
        const next = deferred<unknown>();
        fetches.push(next);
        return next.promise;
      },
      staleTime: Infinity,
      retry: false,
    });
    stops.push(observer.subscribe(() => {}));
    return fetches;
  }

  async function live(strategies: CacheStrategy<object>[]) {
    stops.push(syncQueryCache(client, queryClient, strategies));
    await flush();
    FakeSocket.last.accept();
    FakeSocket.last.confirmSubscriptions(100);
    await flush();
    return FakeSocket.last;
  }

  beforeEach(() => {
    FakeSocket.reset();
    queryClient = new QueryClient();
    client = new StromClient({ url: 'http://strom.test', transport: 'websocket', WebSocket: FakeSocket, backoff: { baseMs: 0, maxMs: 0 } });
  });

  afterEach(() => {
    for (const stop of stops.splice(0)) stop();
    client.close();
    queryClient.clear();
  });

  test('events update the lists and records under a key; untouched data is not rewritten', async () => {
    queryClient.setQueryData(['posts', 'list', { published: true }], [a, b]);
    queryClient.setQueryData(['posts', 'detail', 'a'], a);
    queryClient.setQueryData(['posts', 'detail', 'b'], b);
    queryClient.setQueryData(['comments'], [{ id: 'a' }]);
    const socket = await live([{ collection: 'posts', queryKey: ['posts'], filter: { published: true } }]);
    expect(socket.actions('subscribe')).toEqual([{ action: 'subscribe', collection: 'posts', filter: { published: true } }]);
    const before = queryClient.getQueryState(['posts', 'detail', 'b'])!.dataUpdatedAt;

    socket.event({ collection: 'posts', seq: 101, type: 'record.updated', data: { id: 'a', title: 'A2' } });
    socket.event({ collection: 'posts', seq: 102, type: 'record.created', data: { id: 'c', title: 'C' } });
    expect(queryClient.getQueryData(['posts', 'list', { published: true }])).toEqual([{ ...a, title: 'A2' }, b, { id: 'c', title: 'C' }]);
    expect(queryClient.getQueryData(['posts', 'detail', 'a'])).toEqual({ ...a, title: 'A2' });
    expect(queryClient.getQueryState(['posts', 'detail', 'b'])!.dataUpdatedAt).toBe(before);
    expect(queryClient.getQueryData(['comments'])).toEqual([{ id: 'a' }]);

    socket.event({ collection: 'posts', seq: 103, type: 'record.updated', data: { id: 'b', title: 'B', published: false }, left_filter: true });
    expect(queryClient.getQueryData(['posts', 'list', { published: true }])).toEqual([{ ...a, title: 'A2' }, { id: 'c', title: 'C' }]);
  });

  test('a function queryKey routes each event (null skips it); exact matches one key', async () => {
    queryClient.setQueryData(['board', 'red'], [{ id: 'r1', n: 0 }]);
    queryClient.setQueryData(['board', 'blue'], [{ id: 'b1', n: 0 }]);
    queryClient.setQueryData(['board', 'blue', 'archive'], [{ id: 'b1', n: 0 }]);
    const socket = await live([{
      collection: 'cards',
      queryKey: (e) => (e.data.color ? ['board', e.data.color as string] : null),
      exact: true,
      updateType: 'replace',
    }]);
    socket.event({ collection: 'cards', seq: 101, type: 'record.updated', data: { id: 'b1', n: 1, color: 'blue' } });
    socket.event({ collection: 'cards', seq: 102, type: 'record.updated', data: { id: 'r1', n: 1 } });
    expect(queryClient.getQueryData(['board', 'blue'])).toEqual([{ id: 'b1', n: 1, color: 'blue' }]);
    expect(queryClient.getQueryData(['board', 'blue', 'archive'])).toEqual([{ id: 'b1', n: 0 }]);
    expect(queryClient.getQueryData(['board', 'red'])).toEqual([{ id: 'r1', n: 0 }]);
  });

  test('a typed strategy: transform to an interface type, sorted', async () => {
    interface Card { key: string; label: string }
    const strategy: CacheStrategy<Card> = {
      collection: 'cards',
      queryKey: ['cards'],
      key: 'key',
      transform: (data) => ({ key: String(data.id), label: String(data.name) }),
      sort: (x, y) => x.label.localeCompare(y.label),
    };
    queryClient.setQueryData<Card[]>(['cards'], [{ key: 'k2', label: 'beta' }]);
    const socket = await live([strategy]);
    socket.event({ collection: 'cards', seq: 101, type: 'record.created', data: { id: 'k1', name: 'alpha' } });
    expect(queryClient.getQueryData(['cards'])).toEqual([{ key: 'k1', label: 'alpha' }, { key: 'k2', label: 'beta' }]);
  });

  test('an event that arrives while a query fetches is applied again on the fetched data', async () => {
    const socket = await live([{ collection: 'posts', queryKey: ['posts'] }]);
    const fetches = observe(['posts']);
    await flush();
    expect(fetches).toHaveLength(1);
    socket.event({ collection: 'posts', seq: 101, type: 'record.updated', data: { id: 'a', title: 'A2' } });
    socket.event({ collection: 'posts', seq: 102, type: 'record.deleted', data: { id: 'b' } });
    // The response was read before those events.
    fetches[0]!.resolve([a, b]);
    await flush();
    expect(queryClient.getQueryData(['posts'])).toEqual([{ ...a, title: 'A2' }]);

    // Later fetches start from a clean slate: old events are not re-applied.
    void queryClient.refetchQueries({ queryKey: ['posts'] });
    await flush();
    fetches[1]!.resolve([a, b, { id: 'd' }]);
    await flush();
    expect(queryClient.getQueryData(['posts'])).toEqual([a, b, { id: 'd' }]);
  });

  test('queries are refetched when the subscription goes live without resuming and after a reset, not after a resume', async () => {
    const fetches = observe(['posts']);
    await flush();
    fetches[0]!.resolve([a]);
    await flush();
    // Fetched before the subscription was live: refetched once it is.
    let socket = await live([{ collection: 'posts', queryKey: ['posts'] }]);
    expect(fetches).toHaveLength(2);
    fetches[1]!.resolve([a, b]);
    await flush();

    // A reconnect resumes (head_seq 100): nothing was missed.
    socket.drop(1006);
    await flush();
    socket = FakeSocket.last;
    socket.accept();
    socket.confirmSubscriptions();
    await flush();
    expect(socket.actions('subscribe')[0]).toMatchObject({ since: 100 });
    expect(fetches).toHaveLength(2);

    // Events were lost: refetch.
    socket.message('reset', { collection: 'posts', subscription_id: 1, since: 100, first_available_seq: 200 });
    await flush();
    expect(fetches).toHaveLength(3);
    fetches[2]!.resolve([b]);
    await flush();
    expect(queryClient.getQueryData(['posts'])).toEqual([b]);
  });

  test('a deleted single record invalidates its query; stopping ends the sync', async () => {
    const fetches = observe(['posts', 'a']);
    await flush();
    fetches[0]!.resolve(a);
    await flush();
    const stop = syncQueryCache(client, queryClient, [{ collection: 'posts', queryKey: ['posts'], invalidateKey: ['nothing'] }]);
    await flush();
    const socket = FakeSocket.last;
    socket.accept();
    socket.confirmSubscriptions(100);
    await flush();
    expect(fetches).toHaveLength(1); // invalidateKey matches no query
    socket.event({ collection: 'posts', seq: 101, type: 'record.deleted', data: { id: 'a' } });
    await flush();
    expect(fetches).toHaveLength(2);
    fetches[1]!.resolve({ id: 'a', title: 'restored' });
    await flush();

    stop();
    expect(socket.actions('unsubscribe')).toEqual([{ action: 'unsubscribe', collection: 'posts' }]);
    socket.event({ collection: 'posts', seq: 102, type: 'record.updated', data: { id: 'a', title: 'after stop' } });
    expect(queryClient.getQueryData(['posts', 'a'])).toEqual({ id: 'a', title: 'restored' });
  });
});
