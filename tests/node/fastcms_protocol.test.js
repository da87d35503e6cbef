// End-to-end checks of strom's WebSocket protocol, driven the way the FastCMS
// browser client drives it. One strom process serves the whole file; every
// test opens its own connection and uses its own collection names.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';

import {
  RFC3339, anEvent, ofType, openClient, publish, startStrom, subscribe, uniqueCollection,
} from './harness.js';

let server;

before(async () => {
  server = await startStrom();
});

after(async () => {
  await server?.stop();
});

/** Publishes a record event and returns the seq strom assigned to it. */
function publishRecord(type, collection, record, oldData) {
  const event = { type, collection, record_id: record.id, data: record };
  if (oldData !== undefined) event.old_data = oldData;
  return publish(server.baseUrl, event);
}

/** Checks the fields every delivered event carries. */
function assertEvent(message, { type, collection, record, oldData = null, seq }) {
  assert.equal(message.type, 'event');
  const event = message.data;
  assert.equal(event.type, type);
  assert.equal(event.collection, collection);
  assert.equal(event.record_id, record.id);
  assert.deepEqual(event.data, record);
  assert.deepEqual(event.old_data ?? null, oldData);
  assert.match(event.timestamp, RFC3339);
  assert.ok(Number.isInteger(event.seq), `seq should be an integer, got ${event.seq}`);
  if (seq !== undefined) assert.equal(event.seq, seq, 'event seq should be the seq returned by publish');
  return event;
}

test('connecting yields a connected greeting', async (t) => {
  const { welcome } = await openClient(t, server.baseUrl);
  assert.equal(typeof welcome.connection_id, 'string');
  assert.ok(welcome.connection_id.length > 0, 'connection_id should not be empty');
  assert.match(welcome.server_time, RFC3339);
});

test('created, updated and deleted events reach an unfiltered subscription', async (t) => {
  const conn = await openClient(t, server.baseUrl);
  const posts = uniqueCollection('posts');

  // The client's own dispatch: `${collection}:${type}` gets the record data,
  // the bare type gets { collection, data }.
  const perCollection = [];
  const perType = [];
  for (const type of ['record.created', 'record.updated', 'record.deleted']) {
    conn.client.on(`${posts}:${type}`, (data) => perCollection.push([type, data]));
    conn.client.on(type, (payload) => perType.push([type, payload]));
  }

  const confirmed = await subscribe(conn, posts);
  assert.equal(confirmed.collection, posts);
  assert.equal(confirmed.filter ?? null, null);

  const v1 = { id: 'p1', title: 'Hello', published: true };
  const v2 = { id: 'p1', title: 'Hello again', published: true };

  const seqCreated = await publishRecord('record.created', posts, v1);
  const created = assertEvent(await conn.nextMessage(anEvent(posts)),
    { type: 'record.created', collection: posts, record: v1, seq: seqCreated });

  const seqUpdated = await publishRecord('record.updated', posts, v2, v1);
  const updated = assertEvent(await conn.nextMessage(anEvent(posts)),
    { type: 'record.updated', collection: posts, record: v2, oldData: v1, seq: seqUpdated });

  const seqDeleted = await publishRecord('record.deleted', posts, v2);
  const deleted = assertEvent(await conn.nextMessage(anEvent(posts)),
    { type: 'record.deleted', collection: posts, record: v2, seq: seqDeleted });

  assert.ok(created.seq < updated.seq && updated.seq < deleted.seq,
    `seq should increase: ${created.seq}, ${updated.seq}, ${deleted.seq}`);

  assert.deepEqual(perCollection, [
    ['record.created', v1], ['record.updated', v2], ['record.deleted', v2],
  ]);
  assert.deepEqual(perType, [
    ['record.created', { collection: posts, data: v1 }],
    ['record.updated', { collection: posts, data: v2 }],
    ['record.deleted', { collection: posts, data: v2 }],
  ]);
});

test('object filter {published: true} delivers matching events only', async (t) => {
  const conn = await openClient(t, server.baseUrl);
  const posts = uniqueCollection('posts');

  const confirmed = await subscribe(conn, posts, { published: true });
  assert.equal(confirmed.collection, posts);
  assert.deepEqual(confirmed.filter, { published: true });

  // Non-matching first, matching second: if the filter let the first one
  // through, it would be the first event received.
  const draft = { id: 'd1', title: 'Draft', published: false };
  const live = { id: 'l1', title: 'Live', published: true };
  await publishRecord('record.created', posts, draft);
  const seqLive = await publishRecord('record.created', posts, live);

  assertEvent(await conn.nextMessage(anEvent()),
    { type: 'record.created', collection: posts, record: live, seq: seqLive });
});

test('text filter "price > 100" delivers matching events only', async (t) => {
  const conn = await openClient(t, server.baseUrl);
  const products = uniqueCollection('products');

  const confirmed = await subscribe(conn, products, 'price > 100');
  assert.equal(confirmed.collection, products);
  assert.equal(confirmed.filter, 'price > 100');

  // 50 and 100 do not match (100 is the strict boundary); 150 does.
  await publishRecord('record.created', products, { id: 'cheap', price: 50 });
  await publishRecord('record.created', products, { id: 'boundary', price: 100 });
  const pricey = { id: 'pricey', price: 150 };
  const seq = await publishRecord('record.created', products, pricey);

  assertEvent(await conn.nextMessage(anEvent()),
    { type: 'record.created', collection: products, record: pricey, seq });
});

test('an update moving a record out of the filter arrives with left_filter', async (t) => {
  const conn = await openClient(t, server.baseUrl);
  const posts = uniqueCollection('posts');
  await subscribe(conn, posts, { published: true });

  const live = { id: 'p1', title: 'Live', published: true };
  const unpublished = { id: 'p1', title: 'Live', published: false };

  const seqCreated = await publishRecord('record.created', posts, live);
  const created = assertEvent(await conn.nextMessage(anEvent()),
    { type: 'record.created', collection: posts, record: live, seq: seqCreated });
  assert.notEqual(created.left_filter, true, 'a matching event must not be marked left_filter');

  const seqLeft = await publishRecord('record.updated', posts, unpublished, live);
  const left = assertEvent(await conn.nextMessage(anEvent()),
    { type: 'record.updated', collection: posts, record: unpublished, oldData: live, seq: seqLeft });
  assert.equal(left.left_filter, true);

  // Once out, further non-matching updates stay silent: the next event
  // received is the matching marker published after one.
  const edited = { id: 'p1', title: 'Still a draft', published: false };
  await publishRecord('record.updated', posts, edited, unpublished);
  const marker = { id: 'p2', title: 'Marker', published: true };
  const seqMarker = await publishRecord('record.created', posts, marker);
  const next = assertEvent(await conn.nextMessage(anEvent()),
    { type: 'record.created', collection: posts, record: marker, seq: seqMarker });
  assert.notEqual(next.left_filter, true);
});

test('after unsubscribe, events for that collection stop', async (t) => {
  const conn = await openClient(t, server.baseUrl);
  const posts = uniqueCollection('posts');
  const marker = uniqueCollection('marker');
  await subscribe(conn, posts);
  await subscribe(conn, marker);

  // The subscription works before unsubscribing.
  const early = { id: 'b1', title: 'Before' };
  const seqEarly = await publishRecord('record.created', posts, early);
  assertEvent(await conn.nextMessage(anEvent()),
    { type: 'record.created', collection: posts, record: early, seq: seqEarly });

  conn.client.unsubscribe(posts);
  const gone = await conn.nextMessage(ofType('unsubscribed'));
  assert.deepEqual(gone.data, { collection: posts });

  // An event on the dropped collection, then one on the marker collection:
  // the first event received must be the marker's.
  await publishRecord('record.created', posts, { id: 'a1', title: 'After' });
  const markerRecord = { id: 'm1', title: 'Marker' };
  const seqMarker = await publishRecord('record.created', marker, markerRecord);
  assertEvent(await conn.nextMessage(anEvent()),
    { type: 'record.created', collection: marker, record: markerRecord, seq: seqMarker });
});

test('unknown action and malformed JSON give errors and the connection stays usable', async (t) => {
  const conn = await openClient(t, server.baseUrl);

  conn.client.send({ action: 'frobnicate', collection: 'x' });
  const unknown = await conn.nextMessage(ofType('error'));
  assert.equal(typeof unknown.data.message, 'string');
  assert.ok(unknown.data.message.length > 0, 'error message should not be empty');

  conn.client.sendRaw('{"action": "subscribe", "collection": ');
  const malformed = await conn.nextMessage(ofType('error'));
  assert.equal(typeof malformed.data.message, 'string');
  assert.ok(malformed.data.message.length > 0, 'error message should not be empty');

  // Still connected and serving: subscribe and receive an event.
  const posts = uniqueCollection('posts');
  const confirmed = await subscribe(conn, posts);
  assert.equal(confirmed.collection, posts);
  const record = { id: 'ok1', title: 'Still alive' };
  const seq = await publishRecord('record.created', posts, record);
  assertEvent(await conn.nextMessage(anEvent()),
    { type: 'record.created', collection: posts, record, seq });
});

test('a "*" subscription receives events from every collection', async (t) => {
  const conn = await openClient(t, server.baseUrl);
  const posts = uniqueCollection('posts');
  const comments = uniqueCollection('comments');

  const confirmed = await subscribe(conn, '*');
  assert.equal(confirmed.collection, '*');

  const post = { id: 'p1', title: 'Post' };
  const comment = { id: 'c1', post_id: 'p1', body: 'Nice' };
  const seqPost = await publishRecord('record.created', posts, post);
  const seqComment = await publishRecord('record.created', comments, comment);

  // Other tests' events would also reach "*", so look only at ours.
  const first = assertEvent(await conn.nextMessage(anEvent(posts, comments)),
    { type: 'record.created', collection: posts, record: post, seq: seqPost });
  const second = assertEvent(await conn.nextMessage(anEvent(posts, comments)),
    { type: 'record.created', collection: comments, record: comment, seq: seqComment });
  assert.ok(first.seq < second.seq);
});

test('the browser client pattern of subscribing on every "connected" gets one copy of each event', async (t) => {
  // FastCMSRealtime emits 'connected' both when the socket opens and when the
  // server's greeting arrives; its documented usage subscribes in that
  // handler, so the same subscribe is sent twice. Events must not double up.
  const conn = await openClient(t, server.baseUrl);
  const posts = uniqueCollection('posts');
  const marker = uniqueCollection('marker');

  await subscribe(conn, posts, { published: true });
  await subscribe(conn, posts, { published: true });
  await subscribe(conn, marker);

  const live = { id: 'p1', title: 'Live', published: true };
  const seq = await publishRecord('record.created', posts, live);
  const markerRecord = { id: 'm1' };
  const seqMarker = await publishRecord('record.created', marker, markerRecord);

  assertEvent(await conn.nextMessage(anEvent()),
    { type: 'record.created', collection: posts, record: live, seq });
  // A duplicate delivery would arrive before the marker.
  assertEvent(await conn.nextMessage(anEvent()),
    { type: 'record.created', collection: marker, record: markerRecord, seq: seqMarker });
});
