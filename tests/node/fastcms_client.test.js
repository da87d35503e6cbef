// Self-check of fastcms_client.js against a tiny in-process WebSocket server
// (not strom): URL building, ping -> pong, the JSON it sends and how it
// dispatches server messages. Runs without the strom binary.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { WebSocketServer } from 'ws';

import { FastCMSClient } from './fastcms_client.js';
import { createInbox, ofType } from './harness.js';

let wss;
let baseUrl;
const connections = []; // queue of { socket, url, frames } or waiting resolvers
const waitingForConnection = [];

before(async () => {
  wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((resolve) => wss.once('listening', resolve));
  baseUrl = `http://127.0.0.1:${wss.address().port}`;
  wss.on('connection', (socket, request) => {
    const conn = { socket, url: request.url, ...frameQueue(socket) };
    const waiter = waitingForConnection.shift();
    if (waiter) waiter(conn); else connections.push(conn);
  });
});

after(async () => {
  for (const client of wss.clients) client.terminate();
  await new Promise((resolve) => wss.close(resolve));
});

/** Frames the fake server receives, taken in order with nextFrame(). */
function frameQueue(socket) {
  const frames = [];
  const waiters = [];
  socket.on('message', (data) => {
    const text = data.toString();
    const waiter = waiters.shift();
    if (waiter) waiter(text); else frames.push(text);
  });
  return {
    nextFrame: () => (frames.length ? Promise.resolve(frames.shift()) : new Promise((r) => waiters.push(r))),
  };
}

/** Connects a client and returns it with the server side of its connection. */
async function connectPair(t, token = null) {
  const client = new FastCMSClient(baseUrl, token).connect();
  const inbox = createInbox(client);
  t.after(() => client.disconnect());
  const server = connections.shift() ?? await new Promise((r) => waitingForConnection.push(r));
  await client.opened();
  return { client, server, ...inbox };
}

test('builds the URL like the browser client', () => {
  assert.equal(new FastCMSClient('http://h:1').url, 'ws://h:1/api/v1/ws/realtime');
  assert.equal(new FastCMSClient('https://h').url, 'wss://h/api/v1/ws/realtime');
  assert.equal(new FastCMSClient('http://h:1', 'abc.def').url, 'ws://h:1/api/v1/ws/realtime?token=abc.def');
});

test('connects to the realtime path, with ?token= when given', async (t) => {
  const plain = await connectPair(t);
  assert.equal(plain.server.url, '/api/v1/ws/realtime');
  const withToken = await connectPair(t, 'jwt123');
  assert.equal(withToken.server.url, '/api/v1/ws/realtime?token=jwt123');
});

test('sends subscribe, unsubscribe and auth frames like the browser client', async (t) => {
  const { client, server } = await connectPair(t);
  client.subscribe('posts');
  assert.equal(await server.nextFrame(), '{"action":"subscribe","collection":"posts","filter":null}');
  client.subscribe('posts', { published: true });
  assert.equal(await server.nextFrame(), '{"action":"subscribe","collection":"posts","filter":{"published":true}}');
  client.subscribe('products', 'price > 100');
  assert.equal(await server.nextFrame(), '{"action":"subscribe","collection":"products","filter":"price > 100"}');
  client.unsubscribe('posts');
  assert.equal(await server.nextFrame(), '{"action":"unsubscribe","collection":"posts"}');
  client.auth('jwt');
  assert.equal(await server.nextFrame(), '{"action":"auth","token":"jwt"}');
});

test('answers ping with pong and does not emit it', async (t) => {
  const { client, server } = await connectPair(t);
  let pingsEmitted = 0;
  client.on('ping', () => { pingsEmitted += 1; });
  server.socket.send(JSON.stringify({ type: 'ping', data: { timestamp: new Date().toISOString() } }));
  assert.equal(await server.nextFrame(), '{"action":"pong"}');
  assert.equal(pingsEmitted, 0);
});

test('dispatches events by collection:type, by type and by message type', async (t) => {
  const { client, server, nextMessage } = await connectPair(t);
  const seen = [];
  client.on('posts:record.created', (data) => seen.push(['posts:record.created', data]));
  client.on('record.created', (payload) => seen.push(['record.created', payload]));
  client.on('event', (data) => seen.push(['event', data]));
  client.on('subscribed', (data) => seen.push(['subscribed', data]));

  const record = { id: 'p1', title: 'x' };
  const event = {
    type: 'record.created', collection: 'posts', record_id: 'p1', data: record,
    old_data: null, timestamp: new Date().toISOString(), seq: 1,
  };
  server.socket.send(JSON.stringify({ type: 'subscribed', data: { collection: 'posts', filter: null } }));
  server.socket.send(JSON.stringify({ type: 'event', data: event }));
  await nextMessage(ofType('event'));

  assert.deepEqual(seen, [
    ['subscribed', { collection: 'posts', filter: null }],
    ['posts:record.created', record],
    ['record.created', { collection: 'posts', data: record }],
    ['event', event],
  ]);
});

test('nextMessage rejects with a clear message on timeout', async (t) => {
  const { nextMessage } = await connectPair(t);
  await assert.rejects(nextMessage(ofType('never'), 50), /timed out after 50 ms waiting for a message matching type "never"/);
});
