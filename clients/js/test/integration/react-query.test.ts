// @vitest-environment jsdom
// strom-client/tanstack with @tanstack/react-query in jsdom, against the real
// strom binary: a RealtimeProvider keeps React Query's cache in step with
// published events; a fetch that races events does not undo them; a reset
// refetches.

import { QueryClient, QueryClientProvider, useQuery } from '@tanstack/react-query';
import { createElement } from 'react';
import { type Root, createRoot } from 'react-dom/client';
import { afterAll, afterEach, beforeAll, expect, test } from 'vitest';

import type { JsonObject } from '../../src/index.js';
import { RealtimeProvider, useRealtimeContext } from '../../src/react.js';
import { type CacheStrategy, syncQueryCache } from '../../src/tanstack.js';
import { testClients } from '../helpers/clients.js';
import { collector } from '../helpers/collect.js';
import { type StromHandle, killAll, publishRaw, startStrom, uniqueCollection, until } from '../helpers/servers.js';

// Updates arrive from the network, outside act(): let React schedule them.
(globalThis as { IS_REACT_ACT_ENVIRONMENT?: boolean }).IS_REACT_ACT_ENVIRONMENT = false;

let server: StromHandle;
let container: HTMLElement;
let root: Root | null = null;
let queryClient: QueryClient;
const { client, cleanups, closeAll } = testClients(() => server.baseUrl);

beforeAll(async () => {
  // A short history, so that a client switched off for a few events gets a reset.
  server = await startStrom({ args: ['--history-max-events', '3'] });
});

afterEach(() => {
  root?.unmount();
  container?.remove();
  root = null;
  closeAll();
  queryClient?.clear();
});

afterAll(async () => {
  await killAll();
});

/** The app's own API, which the queries read: a table of orders. */
function database() {
  const rows = new Map<string, JsonObject>();
  return {
    rows,
    openOrders: async () => [...rows.values()].filter((row) => row.open),
    order: async (id: string) => rows.get(id) ?? null,
  };
}

/** Renders `element` under a QueryClientProvider (the first call creates the root). */
function render(element: ReturnType<typeof createElement>) {
  if (!root) {
    container = document.createElement('div');
    document.body.append(container);
    root = createRoot(container);
  }
  root.render(createElement(QueryClientProvider, { client: queryClient }, element));
}

const items = () => [...container.querySelectorAll('li')].map((li) => li.textContent);
const text = (id: string) => container.querySelector(`#${id}`)?.textContent;

function newQueryClient() {
  queryClient = new QueryClient({ defaultOptions: { queries: { retry: false, staleTime: Infinity } } });
  return queryClient;
}

test('a RealtimeProvider with cacheStrategies keeps the lists and records React Query shows current', async () => {
  const c = client();
  const collection = uniqueCollection('orders');
  const db = database();
  db.rows.set('o1', { id: 'o1', open: true, title: 'First', v: 1 });
  db.rows.set('o2', { id: 'o2', open: true, title: 'Second', v: 1 });
  const strategies: CacheStrategy[] = [{ collection, queryKey: ['orders'], filter: { open: true }, version: 'v' }];
  function Orders() {
    const { connectionState } = useRealtimeContext();
    const list = useQuery({ queryKey: ['orders', 'open'], queryFn: db.openOrders });
    const first = useQuery({ queryKey: ['orders', 'o1'], queryFn: () => db.order('o1') });
    return createElement('div', null,
      createElement('p', { id: 'state' }, connectionState),
      createElement('p', { id: 'first' }, String(first.data?.title ?? '')),
      createElement('ul', null, (list.data ?? []).map((o) => createElement('li', { key: String(o.id) }, `${o.id}:${o.title}`))));
  }
  render(createElement(RealtimeProvider, { client: c, queryClient: newQueryClient(), cacheStrategies: strategies }, createElement(Orders)));
  await until('connected with the list', () => text('state') === 'connected' && items().length === 2);

  const publish = (type: string, data: JsonObject, old_data: JsonObject | null = null) => {
    if (type === 'record.deleted') db.rows.delete(String(data.id));
    else db.rows.set(String(data.id), { ...db.rows.get(String(data.id)), ...data });
    return publishRaw(server.baseUrl, { type, collection, record_id: data.id, data, old_data });
  };
  await publish('record.created', { id: 'o3', open: true, title: 'Third', v: 1 });
  await until('o3 added', () => items().length === 3);
  // A partial update is merged into the cached record, in the list and in its own query.
  await publish('record.updated', { id: 'o1', open: true, title: 'First (paid)', v: 2 });
  await until('o1 merged', () => items()[0] === 'o1:First (paid)' && text('first') === 'First (paid)');
  await publish('record.updated', { id: 'o2', open: false, v: 2 }, { id: 'o2', open: true, v: 1 });
  await until('o2 left the open list', () => items().length === 2);
  await publish('record.deleted', { id: 'o3', open: true }); // filters see the deleted row
  await until('o3 removed', () => items().length === 1);
  expect(items()).toEqual(['o1:First (paid)']);
});

test('a fetch that races events: the events published during it are applied on top of its response', async () => {
  const c = client();
  const collection = uniqueCollection('orders');
  const strategies: CacheStrategy[] = [{ collection, queryKey: ['orders'], filter: { open: true }, updateType: 'replace' }];
  // The sync and a witness share one subscription: when the witness has an
  // event, the sync has applied it.
  const witness = collector();
  let live = false;
  cleanups.push(syncQueryCache(c, newQueryClient(), strategies));
  cleanups.push(c.subscribe(collection, { filter: { open: true }, onEvent: witness.onEvent, onSubscribed: () => { live = true; } }));
  await until('the subscription', () => live);

  let fetches = 0;
  const queryFn = async () => {
    fetches += 1;
    const rows = [{ id: 'a', open: true, title: 'A' }, { id: 'b', open: true, title: 'B' }];
    const publish = (type: string, data: JsonObject) => publishRaw(server.baseUrl, { type, collection, record_id: data.id, data });
    await publish('record.updated', { id: 'a', open: true, title: 'A2' });
    await publish('record.deleted', { id: 'b', open: true });
    await publish('record.created', { id: 'c', open: true, title: 'C' });
    await witness.waitFor(3);
    return rows; // read before those events
  };
  function Orders() {
    const { data } = useQuery({ queryKey: ['orders'], queryFn });
    return createElement('ul', null, (data ?? []).map((o) => createElement('li', { key: String(o.id) }, `${o.id}:${o.title}`)));
  }
  render(createElement(Orders));
  await until('the list', () => items().length > 0);
  expect(items()).toEqual(['a:A2', 'c:C']);
  expect(fetches).toBe(1);
});

test('switched off with enabled={false} past the server\'s history, then on: the reset refetches', async () => {
  const c = client();
  const collection = uniqueCollection('orders');
  const db = database();
  db.rows.set('n0', { id: 'n0', open: true });
  const strategies: CacheStrategy[] = [{ collection, queryKey: ['orders'], filter: { open: true } }];
  function Orders() {
    const { connectionState } = useRealtimeContext();
    const { data } = useQuery({ queryKey: ['orders'], queryFn: db.openOrders });
    return createElement('div', null,
      createElement('p', { id: 'state' }, connectionState),
      createElement('ul', null, (data ?? []).map((o) => createElement('li', { key: String(o.id) }, String(o.id)))));
  }
  const qc = newQueryClient();
  const app = (enabled: boolean) => createElement(RealtimeProvider, { client: c, enabled, queryClient: qc, cacheStrategies: strategies }, createElement(Orders));
  render(app(true));
  await until('connected', () => text('state') === 'connected' && items().length === 1);
  const publish = (id: string) => {
    db.rows.set(id, { id, open: true });
    return publishRaw(server.baseUrl, { type: 'record.created', collection, record_id: id, data: { id, open: true } });
  };
  await publish('n1');
  await until('n1', () => items().length === 2);

  render(app(false));
  await until('disconnected', () => text('state') === 'disconnected');
  for (const id of ['n2', 'n3', 'n4', 'n5', 'n6', 'n7']) await publish(id);
  expect(items()).toHaveLength(2);

  render(app(true));
  // Only the last three events are still on the server: the rest comes from the refetch.
  await until('all eight', () => items().length === 8);
  expect(items().sort()).toEqual(['n0', 'n1', 'n2', 'n3', 'n4', 'n5', 'n6', 'n7']);
  expect(text('state')).toBe('connected');
});
