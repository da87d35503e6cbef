// Reconnect and resume across a server restart. Two strom nodes share one
// NATS JetStream: node A (on a fixed port) is killed, events are published
// through node B meanwhile, and A comes back on the same port. A WebSocket
// client and an SSE client, both connected to A, must receive every event
// of the outage exactly once, in order, through their filter.

import { afterAll, beforeAll, expect, test } from 'vitest';
import WebSocket from 'ws';

import { type ConnectionState, StromClient, type StromEvent, type TransportKind } from '../../src/index.js';
import {
  type NatsHandle, type StromHandle, freePort, killAll, publishRaw, startNats, startStrom, uniqueCollection, until,
} from '../helpers/servers.js';

let nats: NatsHandle;
let nodeA: StromHandle;
let nodeB: StromHandle;
let portA: number;
const clients: StromClient[] = [];

beforeAll(async () => {
  nats = await startNats();
  portA = await freePort();
  [nodeA, nodeB] = await Promise.all([
    startStrom({ port: portA, natsUrl: nats.url }),
    startStrom({ natsUrl: nats.url }),
  ]);
});

afterAll(async () => {
  for (const c of clients) c.close();
  await killAll();
});

interface Watched {
  client: StromClient;
  events: StromEvent[];
  states: ConnectionState[];
  subscribedCount: () => number;
}

async function watch(transport: TransportKind, collection: string, port = portA): Promise<Watched> {
  const client = new StromClient({
    url: `http://127.0.0.1:${port}`,
    transport,
    WebSocket,
    backoff: { baseMs: 50, maxMs: 400 },
  });
  clients.push(client);
  const events: StromEvent[] = [];
  const states: ConnectionState[] = [];
  let subscribed = 0;
  client.onStateChange((s) => states.push(s));
  client.subscribe(collection, {
    filter: 'kind = "keep"',
    onEvent: (e) => events.push(e),
    onSubscribed: () => { subscribed += 1; },
    onReset: (info) => { throw new Error(`unexpected reset ${JSON.stringify(info)}`); },
  });
  await until(`${transport} client subscribed`, () => subscribed === 1);
  return { client, events, states, subscribedCount: () => subscribed };
}

async function publishBatch(baseUrl: string, collection: string, label: string, count: number): Promise<number[]> {
  const kept: number[] = [];
  for (let i = 0; i < count; i += 1) {
    // Every other event does not match the filter and must not arrive.
    const skip = await publishRaw(baseUrl, { type: 'record.created', collection, record_id: `${label}-skip-${i}`, data: { id: `${label}-skip-${i}`, kind: 'skip' } });
    const keep = await publishRaw(baseUrl, { type: 'record.created', collection, record_id: `${label}-${i}`, data: { id: `${label}-${i}`, kind: 'keep', i } });
    expect(keep).toBeGreaterThan(skip);
    kept.push(keep);
  }
  return kept;
}

function expectExactly(watched: Watched, seqs: number[], what: string) {
  const got = watched.events.map((e) => e.seq);
  expect(got, `${what}: every event exactly once, in order`).toEqual(seqs);
  expect(watched.events.every((e) => e.data.kind === 'keep'), `${what}: only events matching the filter`).toBe(true);
}

test('every event published during an outage arrives exactly once, in order, on WebSocket and SSE', async () => {
  const collection = uniqueCollection('orders');
  const ws = await watch('websocket', collection);
  const sse = await watch('sse', collection);
  expect(ws.client.transportKind).toBe('websocket');
  expect(sse.client.transportKind).toBe('sse');

  const expected: number[] = [];
  expected.push(...await publishBatch(nodeA.baseUrl, collection, 'before', 3));
  await until('events before the outage', () => ws.events.length === 3 && sse.events.length === 3);

  // Outage 1: SIGKILL, no goodbye (the sockets just drop).
  await nodeA.kill();
  await until('both clients notice', () => ws.client.state === 'reconnecting' && sse.client.state === 'reconnecting');
  expected.push(...await publishBatch(nodeB.baseUrl, collection, 'outage1', 5));
  nodeA = await startStrom({ port: portA, natsUrl: nats.url });
  await until('both clients resubscribed', () => ws.subscribedCount() === 2 && sse.subscribedCount() === 2);
  await until('the outage events', () => ws.events.length >= 8 && sse.events.length >= 8);

  // Live again after the resume.
  expected.push(...await publishBatch(nodeA.baseUrl, collection, 'after1', 1));
  await until('the live event', () => ws.events.length >= 9 && sse.events.length >= 9);

  // Outage 2: SIGTERM, a drain (WebSocket reconnect message and close 1012, SSE reconnect event).
  await nodeA.stop();
  await until('both clients notice the shutdown', () => ws.client.state === 'reconnecting' && sse.client.state === 'reconnecting');
  expected.push(...await publishBatch(nodeB.baseUrl, collection, 'outage2', 4));
  nodeA = await startStrom({ port: portA, natsUrl: nats.url });
  expected.push(...await publishBatch(nodeB.baseUrl, collection, 'after2', 2));
  await until('every event', () => ws.events.length >= expected.length && sse.events.length >= expected.length);

  // Nothing more trickles in: a marker published last is the last event received.
  expected.push(...await publishBatch(nodeA.baseUrl, collection, 'marker', 1));
  await until('the marker', () => ws.events.length >= expected.length && sse.events.length >= expected.length);

  expectExactly(ws, expected, 'websocket');
  expectExactly(sse, expected, 'sse');
  expect(ws.states).toContain('reconnecting');
  expect(ws.client.state).toBe('connected');
  expect(sse.client.state).toBe('connected');
});

/** The partition strom puts a collection in: FNV-1a (32 bits) of its name, modulo the count. */
function partitionOf(collection: string, partitions: number): number {
  let hash = 0x811c9dc5;
  for (const byte of new TextEncoder().encode(collection)) hash = Math.imul(hash ^ byte, 0x01000193) >>> 0;
  return hash % partitions;
}

test('`*` over three NATS streams resumes exactly, one position per stream, on WebSocket and SSE', async () => {
  // Its own NATS server: the streams are STROM_EVENTS_0..2 there.
  const spread = await startNats();
  const args = ['--nats-partitions', '3'];
  const port = await freePort();
  let node = await startStrom({ port, natsUrl: spread.url, args });
  const other = await startStrom({ natsUrl: spread.url, args });
  // One collection in each stream.
  const collections: string[] = [];
  for (let i = 0; collections.length < 3; i += 1) {
    const name = uniqueCollection(`spread${i}`);
    if (!collections.some((c) => partitionOf(c, 3) === partitionOf(name, 3))) collections.push(name);
  }
  const ws = await watch('websocket', '*', port);
  const sse = await watch('sse', '*', port);
  const expected: string[] = [];
  const publish = async (baseUrl: string, label: string) => {
    for (const collection of collections) {
      const id = `${label}-${collection}`;
      await publishRaw(baseUrl, { type: 'record.created', collection, record_id: id, data: { id, kind: 'keep' } });
      expected.push(id);
    }
  };

  await publish(node.baseUrl, 'before');
  await until('events before the outage', () => ws.events.length === 3 && sse.events.length === 3);
  await node.kill();
  await until('both clients notice', () => ws.client.state === 'reconnecting' && sse.client.state === 'reconnecting');
  // Each stream's seqs are 1, 2, 3 here: one seq would be no position in all three.
  await publish(other.baseUrl, 'outage1');
  await publish(other.baseUrl, 'outage2');
  node = await startStrom({ port, natsUrl: spread.url, args });
  await publish(node.baseUrl, 'after');
  for (const watched of [ws, sse]) {
    await until('every event', () => watched.events.length >= expected.length);
    const ids = watched.events.map((e) => e.record_id);
    expect([...ids].sort(), 'every event exactly once').toEqual([...expected].sort());
    for (const collection of collections) {
      const own = watched.events.filter((e) => e.collection === collection);
      expect(own.map((e) => e.seq), `${collection} in its stream's order`).toEqual([1, 2, 3, 4]);
      expect(own.every((e) => e.partition === partitionOf(collection, 3))).toBe(true);
    }
  }
});
