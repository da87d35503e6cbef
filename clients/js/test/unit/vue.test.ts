// @vitest-environment jsdom
// The Vue composables, mounted with @vue/test-utils into jsdom, driven
// through a StromClient on a fake socket.

import { flushPromises, mount } from '@vue/test-utils';
import { afterEach, beforeEach, expect, test } from 'vitest';
import { defineComponent, h, ref } from 'vue';

import { type JsonObject, StromClient } from '../../src/index.js';
import { realtimePlugin, useLiveQuery, usePresence, useRealtime } from '../../src/vue.js';
import { FakeSocket } from '../helpers/fake-socket.js';

let snapshots: Array<{ users: JsonObject[] }> = [];
const fakeFetch = (async () => {
  const body = snapshots.shift() ?? { users: [] };
  return new Response(JSON.stringify({ ...body, count: body.users.length, channel: null }), { status: 200 });
}) as unknown as typeof fetch;

const clients: StromClient[] = [];
function newClient() {
  const client = new StromClient({ url: 'http://strom.test', transport: 'websocket', WebSocket: FakeSocket, fetch: fakeFetch, backoff: { baseMs: 0, maxMs: 0 } });
  clients.push(client);
  return client;
}
const tick = () => flushPromises();

beforeEach(() => {
  FakeSocket.reset();
  snapshots = [];
});

afterEach(() => {
  for (const client of clients.splice(0)) client.close();
});

test('useRealtime follows the connection state', async () => {
  const client = newClient();
  const wrapper = mount(defineComponent({
    setup() {
      const state = useRealtime(client);
      return () => h('p', state.value);
    },
  }));
  await tick();
  expect(wrapper.text()).toBe('connecting');
  FakeSocket.last.accept();
  await tick();
  expect(wrapper.text()).toBe('connected');
  FakeSocket.last.drop(1006);
  await tick();
  expect(wrapper.text()).toBe('reconnecting');
  wrapper.unmount();
});

test('useLiveQuery keeps a list in sync, follows a reactive filter, and unsubscribes when unmounted', async () => {
  const client = newClient();
  const tier = ref('gold');
  const wrapper = mount(defineComponent({
    setup() {
      // The client comes from the plugin; the filter is a getter.
      const customers = useLiveQuery<JsonObject>('customers', () => ({ tier: tier.value }), [{ id: 'seed' }]);
      return () => h('ul', customers.value.map((c) => h('li', { key: String(c.id) }, String(c.id))));
    },
  }), { global: { plugins: [realtimePlugin(client)] } });
  await tick();
  const socket = FakeSocket.last;
  socket.accept();
  socket.confirmSubscriptions();
  await tick();
  const items = () => wrapper.findAll('li').map((li) => li.text());
  expect(items()).toEqual(['seed']);
  expect(socket.actions('subscribe')).toEqual([{ action: 'subscribe', collection: 'customers', filter: { tier: 'gold' } }]);

  socket.event({ collection: 'customers', seq: 1, type: 'record.created', data: { id: 'c1', tier: 'gold' } });
  socket.event({ collection: 'customers', seq: 2, type: 'record.created', data: { id: 'c2', tier: 'gold' } });
  socket.event({ collection: 'customers', seq: 3, type: 'record.updated', data: { id: 'c1', tier: 'silver' }, left_filter: true });
  await tick();
  expect(items()).toEqual(['seed', 'c2']);

  // A new filter: a new subscription, and the list starts over.
  tier.value = 'silver';
  await tick();
  expect(socket.actions('unsubscribe')).toEqual([{ action: 'unsubscribe', collection: 'customers' }]);
  expect(socket.actions('subscribe')[1]).toEqual({ action: 'subscribe', collection: 'customers', filter: { tier: 'silver' } });
  expect(items()).toEqual(['seed']);

  wrapper.unmount();
  expect(socket.actions('unsubscribe')).toHaveLength(2);
});

test('useLiveQuery with load: loads once live, applies held events on top, never overwrites a newer row', async () => {
  const client = newClient();
  let finishLoad!: (rows: JsonObject[]) => void;
  let loads = 0;
  const wrapper = mount(defineComponent({
    setup() {
      const orders = useLiveQuery<JsonObject>(client, 'orders', null, [], {
        version: 'updated_at',
        load: () => {
          loads += 1;
          return new Promise((resolve) => { finishLoad = resolve; });
        },
      });
      return () => h('p', orders.value.map((o) => `${o.id}:${o.status}`).join(','));
    },
  }));
  await tick();
  const socket = FakeSocket.last;
  socket.accept();
  await tick();
  expect(loads).toBe(0);
  socket.confirmSubscriptions(3);
  await tick();
  expect(loads).toBe(1);
  socket.event({ collection: 'orders', seq: 4, type: 'record.updated', data: { id: 'a', status: 'paid', updated_at: '2025-01-01T10:00:02Z' } });
  socket.event({ collection: 'orders', seq: 5, type: 'record.updated', data: { id: 'b', status: 'paid', updated_at: '2025-01-01T10:00:02Z' } });
  socket.event({ collection: 'orders', seq: 6, type: 'record.deleted', data: { id: 'c' } });
  finishLoad([
    { id: 'a', status: 'open', updated_at: '2025-01-01T10:00:01Z' },
    { id: 'b', status: 'shipped', updated_at: '2025-01-01T10:00:03Z' },
    { id: 'c', status: 'open', updated_at: '2025-01-01T10:00:00Z' },
  ]);
  await tick();
  expect(wrapper.text()).toBe('a:paid,b:shipped');
  wrapper.unmount();
});

test('usePresence starts from the snapshot and follows joins and leaves', async () => {
  const client = newClient();
  snapshots.push({ users: [{ user_id: 'ann', user_name: 'Ann', connections: 1, last_seen: 't' }] });
  const wrapper = mount(defineComponent({
    setup() {
      const users = usePresence('posts');
      return () => h('p', users.value.map((u) => u.user_id).sort().join(','));
    },
  }), { global: { plugins: [realtimePlugin(client)] } });
  await tick();
  const socket = FakeSocket.last;
  socket.accept();
  socket.confirmSubscriptions();
  await tick();
  expect(socket.actions('subscribe')).toEqual([{ action: 'subscribe', collection: 'presence', filter: 'channel = "posts"' }]);
  expect(wrapper.text()).toBe('ann');
  const presence = (type: string, user: string) => ({ collection: 'presence', type, seq: 0, record_id: user, data: { user_id: user, user_name: user, connections: 1, last_seen: 't', channel: 'posts' } });
  socket.event(presence('user.joined', 'bob'));
  await tick();
  expect(wrapper.text()).toBe('ann,bob');
  socket.event(presence('user.left', 'ann'));
  await tick();
  expect(wrapper.text()).toBe('bob');
  wrapper.unmount();
});

test('a composable without a client or the plugin says what is missing', () => {
  let error: unknown = null;
  mount(defineComponent({
    setup() {
      try {
        useRealtime();
      } catch (caught) {
        error = caught;
      }
      return () => h('p');
    },
  }));
  expect(String(error)).toMatch(/useRealtime needs a client/);
});
