// @vitest-environment happy-dom
// The React hooks, rendered with react-dom into happy-dom, driven through a
// StromClient on a fake socket.

import { act, createElement, useState } from 'react';
import { type Root, createRoot } from 'react-dom/client';
import { afterEach, beforeEach, expect, test } from 'vitest';

import { type Filter, type JsonObject, StromClient } from '../../src/index.js';
import { useLiveQuery, usePresence, useRealtime } from '../../src/react.js';
import { FakeSocket } from '../helpers/fake-socket.js';

(globalThis as { IS_REACT_ACT_ENVIRONMENT?: boolean }).IS_REACT_ACT_ENVIRONMENT = true;

let container: HTMLElement;
let root: Root;
let snapshots: Array<{ users: JsonObject[] }> = [];

const fakeFetch = (async () => {
  const body = snapshots.shift() ?? { users: [] };
  return new Response(JSON.stringify({ ...body, count: body.users.length, channel: null }), { status: 200 });
}) as unknown as typeof fetch;

function newClient() {
  return new StromClient({ url: 'http://strom.test', transport: 'websocket', WebSocket: FakeSocket, fetch: fakeFetch, backoff: { baseMs: 0, maxMs: 0 } });
}

const tick = () => act(async () => { await new Promise((resolve) => setTimeout(resolve, 0)); });

beforeEach(() => {
  FakeSocket.reset();
  snapshots = [];
  container = document.createElement('div');
  document.body.append(container);
  root = createRoot(container);
});

afterEach(() => {
  act(() => root.unmount());
  container.remove();
});

test('useRealtime follows the connection state', async () => {
  const client = newClient();
  function Status() {
    return createElement('p', null, useRealtime(client));
  }
  await act(async () => root.render(createElement(Status)));
  await tick();
  expect(container.textContent).toBe('connecting');
  await act(async () => FakeSocket.last.accept());
  expect(container.textContent).toBe('connected');
  await act(async () => FakeSocket.last.drop(1006));
  expect(container.textContent).toBe('reconnecting');
  await act(async () => client.close());
  expect(container.textContent).toBe('disconnected');
});

test('useLiveQuery keeps a list in sync and subscribes once per query', async () => {
  const client = newClient();
  const initial = [{ id: 'a', title: 'A' }];
  let rerender!: () => void;
  let setInitial!: (records: JsonObject[]) => void;
  const resets: unknown[] = [];
  function List() {
    const [, setN] = useState(0);
    const [records, setRecords] = useState<JsonObject[]>(initial);
    rerender = () => setN((n) => n + 1);
    setInitial = setRecords;
    // A new filter object on every render: compared by value.
    const filter: Filter = { published: true };
    const live = useLiveQuery(client, 'posts', filter, records, { onReset: (info) => resets.push(info) });
    return createElement('ul', null, live.map((r) => createElement('li', { key: String(r.id) }, String(r.title))));
  }
  await act(async () => root.render(createElement(List)));
  await tick();
  const socket = FakeSocket.last;
  await act(async () => {
    socket.accept();
    socket.confirmSubscriptions();
  });
  const items = () => [...container.querySelectorAll('li')].map((li) => li.textContent);
  expect(items()).toEqual(['A']);

  await act(async () => {
    socket.event({ collection: 'posts', seq: 1, type: 'record.created', data: { id: 'b', title: 'B', published: true } });
    socket.event({ collection: 'posts', seq: 2, type: 'record.updated', data: { id: 'a', title: 'A2', published: true } });
  });
  expect(items()).toEqual(['A2', 'B']);
  await act(async () => {
    socket.event({ collection: 'posts', seq: 3, type: 'record.updated', data: { id: 'c', title: 'C', published: true } });
    socket.event({ collection: 'posts', seq: 4, type: 'record.updated', data: { id: 'b', title: 'B', published: false }, left_filter: true });
    socket.event({ collection: 'posts', seq: 5, type: 'record.deleted', data: { id: 'a' } });
  });
  expect(items()).toEqual(['C']);

  await act(async () => rerender());
  await act(async () => rerender());
  expect(socket.actions('subscribe')).toEqual([{ action: 'subscribe', collection: 'posts', filter: { published: true } }]);

  await act(async () => socket.message('reset', { collection: 'posts', subscription_id: 1, since: 0, first_available_seq: 9 }));
  expect(resets).toEqual([{ collection: 'posts', since: 0, firstAvailableSeq: 9 }]);
  expect(items()).toEqual(['C']); // kept by default

  // New initial records (e.g. reloaded after the reset) replace the list.
  await act(async () => setInitial([{ id: 'z', title: 'Z' }]));
  expect(items()).toEqual(['Z']);

  act(() => root.unmount());
  expect(socket.actions('unsubscribe')).toEqual([{ action: 'unsubscribe', collection: 'posts' }]);
  root = createRoot(container);
});

test('usePresence starts from the snapshot, follows joins and leaves, reloads after a reconnect', async () => {
  const client = newClient();
  snapshots.push({ users: [{ user_id: 'ann', user_name: 'Ann', connections: 1, last_seen: 't' }] });
  function Who() {
    const users = usePresence(client, null);
    return createElement('p', null, users.map((u) => u.user_id).sort().join(','));
  }
  await act(async () => root.render(createElement(Who)));
  await tick();
  const socket = FakeSocket.last;
  await act(async () => {
    socket.accept();
    socket.confirmSubscriptions();
  });
  await tick();
  expect(socket.actions('subscribe')).toEqual([{ action: 'subscribe', collection: 'presence', filter: 'channel = null' }]);
  expect(container.textContent).toBe('ann');
  const presence = (type: string, user: string) => ({ collection: 'presence', type, seq: 0, record_id: user, data: { user_id: user, user_name: user, connections: 1, last_seen: 't', channel: null } });
  await act(async () => socket.event(presence('user.joined', 'bob')));
  expect(container.textContent).toBe('ann,bob');
  await act(async () => socket.event(presence('user.left', 'ann')));
  expect(container.textContent).toBe('bob');

  // Presence is not replayed after a reconnect: a new snapshot is loaded.
  snapshots.push({ users: [{ user_id: 'carol', user_name: null, connections: 2, last_seen: 't' }] });
  await act(async () => socket.drop(1006));
  await tick();
  await act(async () => {
    FakeSocket.last.accept();
    FakeSocket.last.confirmSubscriptions();
  });
  await tick();
  expect(container.textContent).toBe('carol');
});
