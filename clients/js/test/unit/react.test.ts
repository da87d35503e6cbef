// @vitest-environment happy-dom
// The React hooks, rendered with react-dom into happy-dom, driven through a
// StromClient on a fake socket.

import { act, createElement, useState } from 'react';
import { type Root, createRoot } from 'react-dom/client';
import { afterEach, beforeEach, expect, test } from 'vitest';

import { type Filter, type JsonObject, StromClient } from '../../src/index.js';
import {
  type RealtimeContextValue, RealtimeProvider, useLiveQuery, usePresence, useRealtime, useRealtimeContext,
} from '../../src/react.js';
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

test('RealtimeProvider shares its client: hooks without a client use it, the context carries state and controls', async () => {
  const client = newClient();
  let context!: RealtimeContextValue;
  const received: unknown[] = [];
  function App() {
    context = useRealtimeContext();
    const state = useRealtime();
    const posts = useLiveQuery<JsonObject>('posts', null, []);
    const online = usePresence(null);
    return createElement('p', null, `${state}|${context.isConnected}|${context.enabled}|${posts.map((p) => p.id).join(',')}|${online.length}`);
  }
  await act(async () => root.render(createElement(RealtimeProvider, { client }, createElement(App))));
  await tick();
  expect(context.client).toBe(client);
  const { subscribe, send, connect, disconnect } = context;
  let socket = FakeSocket.last;
  await act(async () => {
    socket.accept();
    socket.confirmSubscriptions();
  });
  await tick();
  expect(container.textContent).toBe('connected|true|true||0');
  // The functions stay the same across state changes (safe as effect dependencies).
  expect([context.subscribe, context.send, context.connect, context.disconnect]).toEqual([subscribe, send, connect, disconnect]);
  expect(socket.actions('subscribe').map((a) => a.collection).sort()).toEqual(['posts', 'presence']);
  await act(async () => socket.event({ collection: 'posts', seq: 3, type: 'record.created', data: { id: 'p1' } }));
  expect(container.textContent).toBe('connected|true|true|p1|0');

  // subscribe with a plain callback; send over the socket's publish action.
  let stop!: () => void;
  await act(async () => { stop = context.subscribe('chat.room', (event) => received.push(event.data)); });
  await act(async () => socket.confirmSubscriptions());
  await act(async () => socket.event({ collection: 'chat.room', seq: 4, type: 'broadcast', record_id: null, data: { text: 'hi' } }));
  expect(received).toEqual([{ text: 'hi' }]);
  stop();
  socket.message('unsubscribed', { collection: 'chat.room' }); // replies come in order
  let sent!: Promise<number>;
  act(() => { sent = context.send('chat.room', { text: 'yo' }); });
  expect(socket.actions('publish')).toEqual([{ action: 'publish', channel: 'chat.room', data: { text: 'yo' }, ack: true }]);
  socket.message('ack', { channel: 'chat.room', seq: 5 });
  await expect(sent).resolves.toBe(5);

  // disconnect() switches realtime off; connect() back on, resuming where it stopped.
  await act(async () => context.disconnect());
  expect(container.textContent).toBe('disconnected|false|false|p1|0');
  expect(socket.closedByClient).not.toBeNull();
  await act(async () => context.connect());
  await tick();
  expect(FakeSocket.instances).toHaveLength(2);
  socket = FakeSocket.last;
  await act(async () => {
    socket.accept();
    socket.confirmSubscriptions();
  });
  await tick();
  expect(container.textContent).toBe('connected|true|true|p1|0');
  expect(socket.actions('subscribe').find((a) => a.collection === 'posts')).toMatchObject({ since: 3 });
});

test('the enabled prop closes and reopens the client; a provider with options owns its client', async () => {
  function Badge() {
    const { connectionState, enabled } = useRealtimeContext();
    return createElement('p', null, `${connectionState}|${enabled}`);
  }
  const client = new StromClient({ url: 'http://strom.test', transport: 'websocket', WebSocket: FakeSocket, fetch: fakeFetch, autoConnect: false });
  const render = (enabled: boolean) => act(async () => root.render(createElement(RealtimeProvider, { client, enabled }, createElement(Badge))));
  await render(false);
  expect(container.textContent).toBe('disconnected|false');
  expect(FakeSocket.instances).toHaveLength(0);
  await render(true);
  await tick();
  expect(FakeSocket.instances).toHaveLength(1);
  await act(async () => FakeSocket.last.accept());
  expect(container.textContent).toBe('connected|true');
  await render(false);
  expect(container.textContent).toBe('disconnected|false');
  expect(FakeSocket.last.closedByClient).not.toBeNull();
  act(() => root.unmount());
  root = createRoot(container);

  // options: the provider creates the client, connects it, and closes it when unmounted.
  const options = { url: 'http://strom.test', transport: 'websocket' as const, WebSocket: FakeSocket, fetch: fakeFetch };
  await act(async () => root.render(createElement(RealtimeProvider, { options }, createElement(Badge))));
  await tick();
  const owned = FakeSocket.last;
  await act(async () => owned.accept());
  expect(container.textContent).toBe('connected|true');
  act(() => root.unmount());
  expect(owned.closedByClient).not.toBeNull();
  root = createRoot(container);
});

test('hooks without a client outside a provider say what is missing', async () => {
  const errors: unknown[] = [];
  function Lonely() {
    try {
      useRealtime();
    } catch (error) {
      errors.push(error);
    }
    return null;
  }
  await act(async () => root.render(createElement(Lonely)));
  expect(String(errors[0])).toMatch(/useRealtime needs a client/);
});

test('useLiveQuery with load: shows the initial records, then the loaded ones with the held events applied', async () => {
  const client = newClient();
  let finishLoad!: (rows: JsonObject[]) => void;
  let loads = 0;
  function Orders() {
    const orders = useLiveQuery<JsonObject>(client, 'orders', { open: true }, [], {
      version: 'v',
      load: () => {
        loads += 1;
        return new Promise((resolve) => { finishLoad = resolve; });
      },
    });
    return createElement('p', null, orders.map((o) => `${o.id}@${o.v}`).join(','));
  }
  await act(async () => root.render(createElement(Orders)));
  await tick();
  const socket = FakeSocket.last;
  await act(async () => socket.accept());
  expect(loads).toBe(0);
  await act(async () => socket.confirmSubscriptions(7));
  expect(loads).toBe(1);
  await act(async () => {
    socket.event({ collection: 'orders', seq: 8, type: 'record.updated', data: { id: 'a', v: 2 } });
    socket.event({ collection: 'orders', seq: 9, type: 'record.updated', data: { id: 'b', v: 1 } });
  });
  expect(container.textContent).toBe('');
  await act(async () => finishLoad([{ id: 'a', v: 1 }, { id: 'b', v: 2 }]));
  expect(container.textContent).toBe('a@2,b@2');
  await act(async () => socket.event({ collection: 'orders', seq: 10, type: 'record.updated', data: { id: 'b', v: 1 } }));
  expect(container.textContent).toBe('a@2,b@2'); // an older version never overwrites
  await act(async () => socket.event({ collection: 'orders', seq: 11, type: 'record.created', data: { id: 'c', v: 1 } }));
  expect(container.textContent).toBe('a@2,b@2,c@1');
});
