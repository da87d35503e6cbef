// Channels (broadcast events) through the client: sending over the WebSocket
// `publish` action or REST, receiving on WebSocket and SSE, echo.

import { afterAll, afterEach, beforeAll, expect, test } from 'vitest';
import WebSocket from 'ws';

import { StromClient, StromError, type TransportKind } from '../../src/index.js';
import { collector } from '../helpers/collect.js';
import { type StromHandle, killAll, startStrom, uniqueCollection, until } from '../helpers/servers.js';

let server: StromHandle;
const clients: StromClient[] = [];

function client(transport: TransportKind): StromClient {
  const c = new StromClient({ url: server.baseUrl, WebSocket, transport, backoff: { baseMs: 50, maxMs: 500 } });
  clients.push(c);
  return c;
}

async function subscribed(c: StromClient, channel: string, options: Omit<Parameters<StromClient['subscribe']>[1], 'onSubscribed'>) {
  let live = false;
  const stop = c.subscribe(channel, { ...options, onSubscribed: () => { live = true; } });
  await until(`subscribed to ${channel}`, () => live);
  return stop;
}

beforeAll(async () => {
  server = await startStrom({ args: ['--client-publish-rate', '1000'] });
});

afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});

afterAll(async () => {
  await killAll();
});

test('a broadcast over the WebSocket reaches other subscribers (WebSocket and SSE), with a filter on the data', async () => {
  const room = `chat.${uniqueCollection('room')}`;
  const alice = client('websocket');
  const bob = client('websocket');
  const carol = client('sse');
  const aliceGot = collector();
  const bobGot = collector();
  const carolGot = collector();
  await subscribed(alice, room, { onEvent: aliceGot.onEvent });
  await subscribed(bob, room, { onEvent: bobGot.onEvent });
  await subscribed(carol, room, { filter: { kind: 'text' }, onEvent: carolGot.onEvent });

  const typing = await alice.broadcast(room, { kind: 'typing' });
  const hello = await alice.broadcast(room, { kind: 'text', text: 'hello' });
  expect(hello).toBeGreaterThan(typing);
  await bobGot.waitFor(2);
  await carolGot.waitFor(1);
  expect(bobGot.events.map((e) => e.data)).toEqual([{ kind: 'typing' }, { kind: 'text', text: 'hello' }]);
  expect(bobGot.events[1]).toMatchObject({ type: 'broadcast', collection: room, channel: room, record_id: null, seq: hello });
  expect(carolGot.events.map((e) => e.seq)).toEqual([hello]);

  // Alice's own messages do not come back to her connection (no echo):
  // the first event she gets is Bob's reply.
  const reply = await bob.broadcast(room, { kind: 'text', text: 'hi alice' });
  await aliceGot.waitFor(1);
  expect(aliceGot.events.map((e) => e.seq)).toEqual([reply]);
});

test('echo: true gets one\'s own messages back; SSE clients broadcast over REST', async () => {
  const room = `chat.${uniqueCollection('room')}`;
  const dave = client('websocket');
  const erin = client('sse');
  const daveGot = collector();
  await subscribed(dave, room, { echo: true, onEvent: daveGot.onEvent });
  const own = await dave.broadcast(room, { text: 'mine' });
  const viaRest = await erin.broadcast(room, { text: 'from sse' });
  await daveGot.waitFor(2);
  expect(daveGot.events.map((e) => e.seq)).toEqual([own, viaRest]);
});

test('a refused broadcast rejects with the server error', async () => {
  const frank = client('websocket');
  await until('connected', () => frank.state === 'connected');
  const error = await frank.broadcast('bad name!', { x: 1 }).catch((e: unknown) => e);
  expect(error).toBeInstanceOf(StromError);
  expect((error as StromError).code).toBe('invalid_argument');
  // The connection goes on.
  const room = `chat.${uniqueCollection('room')}`;
  expect(await frank.broadcast(room, { ok: true })).toBeGreaterThan(0);
});
