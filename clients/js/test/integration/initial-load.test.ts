// @vitest-environment jsdom
// The race-free initial load against the real strom binary: events are
// published while load() runs, and load() returns only once the client has
// received them, with rows read before them (and one row newer than its
// event). subscribeAndLoad, the React hook and the Vue composable must all
// end with the held events applied on top of the loaded rows.

import { mount } from '@vue/test-utils';
import { createElement } from 'react';
import { type Root, createRoot } from 'react-dom/client';
import { afterAll, afterEach, beforeAll, expect, test } from 'vitest';
import { defineComponent, h } from 'vue';

import { type JsonObject, type StromClient, applyLiveEvent, subscribeAndLoad } from '../../src/index.js';
import { useLiveQuery as useLiveQueryReact } from '../../src/react.js';
import { useLiveQuery as useLiveQueryVue } from '../../src/vue.js';
import { testClients } from '../helpers/clients.js';
import { collector } from '../helpers/collect.js';
import { type StromHandle, killAll, publishRaw, startStrom, uniqueCollection, until } from '../helpers/servers.js';

// Updates arrive from the network, outside act(): let React schedule them.
(globalThis as { IS_REACT_ACT_ENVIRONMENT?: boolean }).IS_REACT_ACT_ENVIRONMENT = false;

let server: StromHandle;
const { client, cleanups, closeAll } = testClients(() => server.baseUrl);

beforeAll(async () => {
  // A short history, so that a reconnect after a few events gets a reset.
  server = await startStrom({ args: ['--history-max-events', '3'] });
});

afterEach(() => {
  closeAll();
});

afterAll(async () => {
  await killAll();
});

/**
 * A load() that races events: it reads its rows, then (as other writers
 * would) publishes four events, and returns only once the client has
 * received all of them. `witness` listens on the same client with the same
 * filter, so it shares the subscription and sees each event at the moment
 * the load's subscription does.
 */
function racingLoad(c: StromClient, collection: string) {
  const witness = collector();
  cleanups.push(c.subscribe(collection, { filter: { open: true }, onEvent: witness.onEvent }));
  let calls = 0;
  const load = async (): Promise<JsonObject[]> => {
    calls += 1;
    const rows = [
      { id: 'a', open: true, v: 1, title: 'A' },
      { id: 'b', open: true, v: 1, title: 'B' },
      { id: 'd', open: true, v: 3, title: 'D, newer than its event' },
    ];
    const publish = (type: string, data: JsonObject) => publishRaw(server.baseUrl, { type, collection, record_id: data.id, data });
    await publish('record.updated', { id: 'a', open: true, v: 2, title: 'A2' });
    await publish('record.created', { id: 'c', open: true, v: 1, title: 'C' });
    await publish('record.deleted', { id: 'b', open: true, v: 1 });
    await publish('record.updated', { id: 'd', open: true, v: 2, title: 'D, older' });
    await witness.waitFor(4);
    return rows;
  };
  return { load, calls: () => calls };
}

const expected = ['a:A2', 'd:D, newer than its event', 'c:C'];
const show = (records: readonly JsonObject[]) => records.map((r) => `${r.id}:${r.title}`);

test('subscribeAndLoad: events published during the load end up on top of the loaded rows', async () => {
  const c = client();
  const collection = uniqueCollection('orders');
  const race = racingLoad(c, collection);
  let records: JsonObject[] | null = null;
  cleanups.push(subscribeAndLoad(c, collection, {
    filter: { open: true },
    version: 'v',
    load: race.load,
    onLoaded: (loaded) => { records = loaded; },
    onEvent: (event) => { records = applyLiveEvent(records ?? [], event, { version: 'v' }); },
  }));
  await until('the load', () => records);
  expect(show(records!)).toEqual(expected);

  // Then live.
  await publishRaw(server.baseUrl, { type: 'record.created', collection, record_id: 'e', data: { id: 'e', open: true, v: 1, title: 'E' } });
  await until('the live event', () => records!.length === 4);
  expect(show(records!)).toEqual([...expected, 'e:E']);
  expect(race.calls()).toBe(1);
});

test('React useLiveQuery with load: the rendered list has the racing events applied', async () => {
  const c = client();
  const collection = uniqueCollection('orders');
  const race = racingLoad(c, collection);
  const container = document.createElement('div');
  document.body.append(container);
  const root: Root = createRoot(container);
  cleanups.push(() => {
    root.unmount();
    container.remove();
  });
  function Orders() {
    const orders = useLiveQueryReact<JsonObject>(c, collection, { open: true }, [], { version: 'v', load: race.load });
    return createElement('ul', null, orders.map((o) => createElement('li', { key: String(o.id) }, `${o.id}:${o.title}`)));
  }
  root.render(createElement(Orders));
  const items = () => [...container.querySelectorAll('li')].map((li) => li.textContent);
  await until('the loaded list', () => items().length === 3);
  expect(items()).toEqual(expected);
  await publishRaw(server.baseUrl, {
    type: 'record.updated', collection, record_id: 'c', data: { id: 'c', open: false, v: 2 }, old_data: { id: 'c', open: true, v: 1 },
  });
  await until('c to leave the list', () => items().length === 2);
  expect(items()).toEqual(expected.slice(0, 2));
});

test('Vue useLiveQuery with load: the rendered list has the racing events applied', async () => {
  const c = client();
  const collection = uniqueCollection('orders');
  const race = racingLoad(c, collection);
  const wrapper = mount(defineComponent({
    setup() {
      const orders = useLiveQueryVue<JsonObject>(c, collection, { open: true }, [], { version: 'v', load: race.load });
      return () => h('ul', orders.value.map((o) => h('li', { key: String(o.id) }, `${o.id}:${o.title}`)));
    },
  }));
  cleanups.push(() => wrapper.unmount());
  const items = () => wrapper.findAll('li').map((li) => li.text());
  await until('the loaded list', () => items().length === 3);
  expect(items()).toEqual(expected);
});

test('after a reset (the server no longer has the missed events) the list is loaded again', async () => {
  const c = client();
  const collection = uniqueCollection('orders');
  const db = new Map<string, JsonObject>();
  const publish = async (id: string) => {
    db.set(id, { id });
    return publishRaw(server.baseUrl, { type: 'record.created', collection, record_id: id, data: { id } });
  };
  let loads = 0;
  const resets: unknown[] = [];
  let records: JsonObject[] = [];
  cleanups.push(subscribeAndLoad(c, collection, {
    load: () => {
      loads += 1;
      return [...db.values()];
    },
    onLoaded: (loaded) => { records = loaded; },
    onEvent: (event) => { records = applyLiveEvent(records, event); },
    onReset: (info) => resets.push(info),
  }));
  await until('the first load', () => loads === 1);
  await publish('r1');
  await until('r1', () => records.length === 1);

  // Offline while more is published than the server keeps.
  c.close();
  for (const id of ['r2', 'r3', 'r4', 'r5', 'r6']) await publish(id);
  c.connect();
  await until('all six after the reload', () => records.length === 6);
  expect(records.map((r) => r.id).sort()).toEqual(['r1', 'r2', 'r3', 'r4', 'r5', 'r6']);
  expect(resets).toHaveLength(1);
  expect(loads).toBe(2);
});
