// Presence through the client: onPresence sees joins and leaves, getPresence
// returns the snapshot, on WebSocket and SSE.

import { afterAll, afterEach, beforeAll, expect, test } from 'vitest';
import WebSocket from 'ws';

import { type PresenceEvent, StromClient, type TransportKind } from '../../src/index.js';
import { type StromHandle, killAll, startStrom, uniqueCollection, until } from '../helpers/servers.js';

let server: StromHandle;
const clients: StromClient[] = [];

function client(transport: TransportKind, options: Partial<ConstructorParameters<typeof StromClient>[0]> = {}): StromClient {
  const c = new StromClient({ url: server.baseUrl, WebSocket, transport, backoff: { baseMs: 50, maxMs: 500 }, ...options });
  clients.push(c);
  return c;
}

/** An observer of presence in `channel`, live once this resolves. */
async function observe(transport: TransportKind, channel: string | null) {
  const observer = client(transport);
  const events: PresenceEvent[] = [];
  let live = false;
  observer.onPresence(channel, (e) => events.push(e), { onSubscribed: () => { live = true; } });
  await until('presence subscription live', () => live);
  const find = (type: string, user: string) => events.find((e) => e.type === type && e.data.user_id === user);
  return { observer, events, find };
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

for (const transport of ['websocket', 'sse'] as const) {
  test(`onPresence(null) sees a user connect and leave (${transport})`, async () => {
    const { find } = await observe(transport, null);
    const user = `bob-${transport}`;
    const bob = client(transport, { userId: user, userName: 'Bob' });
    // SSE has no connection without a subscription: give it one.
    const stop = bob.subscribe(uniqueCollection('anything'), { onEvent: () => {} });

    const joined = await until('user.joined', () => find('user.joined', user));
    expect(joined).toMatchObject({ type: 'user.joined', collection: 'presence', seq: 0 });
    expect(joined.data).toMatchObject({ user_id: user, user_name: 'Bob', channel: null });
    expect(joined.data.connections).toBeGreaterThanOrEqual(1);

    const snapshot = await bob.getPresence();
    expect(snapshot.channel).toBeNull();
    expect(snapshot.users.map((u) => u.user_id)).toContain(user);
    expect(snapshot.count).toBe(snapshot.users.length);

    stop();
    bob.close();
    const left = await until('user.left', () => find('user.left', user));
    expect(left.data.user_id).toBe(user);
  });
}

test('onPresence(channel) sees a user subscribe to that collection', async () => {
  const room = uniqueCollection('room');
  const { find, events } = await observe('websocket', room);
  const carol = client('websocket', { userId: 'carol', userName: 'Carol' });
  await until('carol connected', () => carol.state === 'connected');
  // Connecting alone is not being in the channel.
  const stop = carol.subscribe(room, { onEvent: () => {} });
  const joined = await until('carol joined the room', () => find('user.joined', 'carol'));
  expect(joined.data.channel).toBe(room);
  expect(events.every((e) => e.data.channel === room)).toBe(true);

  const snapshot = await carol.getPresence(room);
  expect(snapshot).toMatchObject({ channel: room, count: 1 });
  expect(snapshot.users[0]).toMatchObject({ user_id: 'carol', user_name: 'Carol' });

  stop();
  await until('carol left the room', () => find('user.left', 'carol'));
});
