// subscribeAndLoad against a fake socket: the order subscribe → load →
// held events, and what happens on failures, resets and reconnects.

import { beforeEach, expect, test } from 'vitest';

import { type JsonObject, type StromEvent, StromClient, applyLiveEvent, subscribeAndLoad } from '../../src/index.js';
import { FakeSocket } from '../helpers/fake-socket.js';

function newClient() {
  return new StromClient({ url: 'http://strom.test', transport: 'websocket', WebSocket: FakeSocket, backoff: { baseMs: 0, maxMs: 0 } });
}

/** A promise with its resolve and reject exposed. */
function deferred<T>() {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<T>((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}

const flush = () => new Promise((resolve) => setTimeout(resolve, 0));

/** Runs subscribeAndLoad with loads the test resolves, recording what comes out. */
function start(client: StromClient, extra: { version?: string } = {}) {
  const loads: Array<ReturnType<typeof deferred<JsonObject[]>>> = [];
  const loaded: JsonObject[][] = [];
  const live: StromEvent[] = [];
  const errors: Error[] = [];
  const resets: unknown[] = [];
  let list: JsonObject[] = [];
  const stop = subscribeAndLoad(client, 'orders', {
    filter: { open: true },
    ...extra,
    load: () => {
      const next = deferred<JsonObject[]>();
      loads.push(next);
      return next.promise;
    },
    onLoaded: (records) => {
      loaded.push(records);
      list = records;
    },
    onEvent: (event) => {
      live.push(event);
      list = applyLiveEvent(list, event, extra);
    },
    onError: (error) => errors.push(error),
    onReset: (info) => resets.push(info),
  });
  return { loads, loaded, live, errors, resets, stop, list: () => list };
}

beforeEach(() => FakeSocket.reset());

test('loads only once the subscription is live, and applies the events held meanwhile on top', async () => {
  const run = start(newClient(), { version: 'v' });
  await flush();
  const socket = FakeSocket.last;
  socket.accept();
  await flush();
  expect(socket.actions('subscribe')).toEqual([{ action: 'subscribe', collection: 'orders', filter: { open: true } }]);
  expect(run.loads).toHaveLength(0); // not before the server confirmed

  socket.confirmSubscriptions(10);
  await flush();
  expect(run.loads).toHaveLength(1);

  // Published while the load reads: held, not handed out.
  socket.event({ collection: 'orders', seq: 11, type: 'record.updated', data: { id: 'a', v: 2, title: 'A2' } });
  socket.event({ collection: 'orders', seq: 12, type: 'record.created', data: { id: 'c', v: 1, title: 'C' } });
  socket.event({ collection: 'orders', seq: 13, type: 'record.deleted', data: { id: 'b' } });
  socket.event({ collection: 'orders', seq: 14, type: 'record.updated', data: { id: 'd', v: 1, title: 'D old' } });
  expect(run.live).toEqual([]);

  // The load read a before update 11, b before its delete, d already at v2.
  run.loads[0]!.resolve([{ id: 'a', v: 1, title: 'A' }, { id: 'b', v: 1 }, { id: 'd', v: 2, title: 'D new' }]);
  await flush();
  expect(run.loaded).toEqual([[
    { id: 'a', v: 2, title: 'A2' },
    { id: 'd', v: 2, title: 'D new' },
    { id: 'c', v: 1, title: 'C' },
  ]]);

  // Afterwards events flow live.
  socket.event({ collection: 'orders', seq: 15, type: 'record.updated', data: { id: 'c', v: 2, title: 'C2' }, left_filter: true });
  expect(run.live.map((e) => e.seq)).toEqual([15]);
  expect(run.list().map((r) => r.id)).toEqual(['a', 'd']);
  expect(run.errors).toEqual([]);
});

test('a failed load is reported and the held events are handed out', async () => {
  const run = start(newClient());
  await flush();
  const socket = FakeSocket.last;
  socket.accept();
  socket.confirmSubscriptions();
  await flush();
  socket.event({ collection: 'orders', seq: 1, type: 'record.created', data: { id: 'a' } });
  run.loads[0]!.reject(new Error('api down'));
  await flush();
  expect(run.errors.map((e) => e.message)).toEqual(['api down']);
  expect(run.loaded).toEqual([]);
  expect(run.live.map((e) => e.seq)).toEqual([1]);
});

test('a reset reloads (holding events again); a resumed reconnect does not; stop ends it', async () => {
  const run = start(newClient());
  await flush();
  let socket = FakeSocket.last;
  socket.accept();
  socket.confirmSubscriptions();
  await flush();
  run.loads[0]!.resolve([{ id: 'a' }]);
  await flush();
  socket.event({ collection: 'orders', seq: 5, type: 'record.created', data: { id: 'b' } });
  expect(run.list().map((r) => r.id)).toEqual(['a', 'b']);

  // Reconnect: it resumes after seq 5, so nothing to reload.
  socket.drop(1006);
  await flush();
  socket = FakeSocket.last;
  socket.accept();
  await flush();
  expect(socket.actions('subscribe')[0]).toMatchObject({ since: 5 });
  socket.confirmSubscriptions();
  await flush();
  expect(run.loads).toHaveLength(1);

  // The server no longer has what followed seq 5: reset, reload.
  socket.message('reset', { collection: 'orders', subscription_id: 1, since: 5, first_available_seq: 40 });
  await flush();
  expect(run.resets).toEqual([{ collection: 'orders', since: 5, firstAvailableSeq: 40 }]);
  expect(run.loads).toHaveLength(2);
  socket.event({ collection: 'orders', seq: 41, type: 'record.updated', data: { id: 'z', title: 'replayed' } });
  expect(run.live.map((e) => e.seq)).toEqual([5]); // held
  run.loads[1]!.resolve([{ id: 'x' }]);
  await flush();
  expect(run.list()).toEqual([{ id: 'x' }, { id: 'z', title: 'replayed' }]);

  // Stopped during a load: the result is dropped and the subscription ends.
  socket.message('reset', { collection: 'orders', subscription_id: 1, since: 41, first_available_seq: 50 });
  await flush();
  run.stop();
  run.loads[2]!.resolve([{ id: 'late' }]);
  await flush();
  expect(run.loaded).toHaveLength(2);
  expect(socket.actions('unsubscribe')).toEqual([{ action: 'unsubscribe', collection: 'orders' }]);
});

test('a resubscription that cannot resume loads again, dropping the result of the load it replaces', async () => {
  const run = start(newClient());
  await flush();
  let socket = FakeSocket.last;
  socket.accept();
  socket.confirmSubscriptions(); // head_seq 0 and no event yet: no position to resume from
  await flush();
  expect(run.loads).toHaveLength(1);
  socket.drop(1006);
  await flush();
  socket = FakeSocket.last;
  socket.accept();
  socket.confirmSubscriptions();
  await flush();
  expect(run.loads).toHaveLength(2);
  run.loads[0]!.resolve([{ id: 'stale' }]);
  run.loads[1]!.resolve([{ id: 'fresh' }]);
  await flush();
  expect(run.loaded).toEqual([[{ id: 'fresh' }]]);
});
