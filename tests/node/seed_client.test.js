// The seed's own JavaScript client against strom, unmodified.
//
// Requirement: "the seed's JavaScript client must work against strom
// unmodified". The client is the `class FastCMSRealtime { ... }` of the
// "Vanilla JavaScript" section of seed 000_a90ef41470009790.txt. Its source
// is NOT copied into this repository: the test reads the seed at run time,
// cuts the class out of it (brace matching that understands strings,
// template literals, comments and regex literals) and evaluates it as
// written, with `ws`'s WebSocket standing in for the browser's.
//
// The seed is looked up in $STROM_SEEDS_DIR, else in ../../../shared/seeds
// relative to this file (the shared/ folder beside the repository). Without
// it every test here is skipped, saying why.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';

import { MESSAGE_TIMEOUT_MS, publish, startStrom, uniqueCollection } from './harness.js';

const SEED_FILE = '000_a90ef41470009790.txt';
const CLASS_NAME = 'FastCMSRealtime';

const seedsDir = process.env.STROM_SEEDS_DIR
  ? path.resolve(process.env.STROM_SEEDS_DIR)
  : fileURLToPath(new URL('../../../shared/seeds', import.meta.url));
const seedPath = path.join(seedsDir, SEED_FILE);
const skipReason = existsSync(seedPath)
  ? null
  : `seed ${SEED_FILE} not found at ${seedPath} (set STROM_SEEDS_DIR to the folder holding it)`;

// --- extracting the class from the seed ----------------------------------

/**
 * The source of `class FastCMSRealtime { ... }` in the seed's "Vanilla
 * JavaScript" code block, from the `class` keyword to its matching brace.
 */
function extractSeedClass(text) {
  const section = text.search(/^#+\s*Vanilla JavaScript\s*$/m);
  assert.ok(section !== -1, `seed ${SEED_FILE} has no "Vanilla JavaScript" section`);
  const fence = text.indexOf('```', section);
  assert.ok(fence !== -1, 'the "Vanilla JavaScript" section has no code block');
  const blockStart = text.indexOf('\n', fence) + 1;
  const blockEnd = text.indexOf('\n```', blockStart);
  assert.ok(blockEnd !== -1, 'the "Vanilla JavaScript" code block is not closed');
  const block = text.slice(blockStart, blockEnd);

  const header = new RegExp(`\\bclass\\s+${CLASS_NAME}\\s*\\{`).exec(block);
  assert.ok(header, `no "class ${CLASS_NAME} {" in the "Vanilla JavaScript" code block`);
  const open = header.index + header[0].length - 1;
  const close = matchingBrace(block, open);
  return block.slice(header.index, close + 1);
}

/**
 * Index of the `}` closing the `{` at `open` in JavaScript source `src`.
 * Braces inside strings, template literals (but not their `${...}`
 * expressions), comments and regex literals do not count.
 */
function matchingBrace(src, open) {
  assert.equal(src[open], '{');
  // One entry per open brace: 'block' for `{`, 'template' for `${`.
  const stack = [];
  // Last significant (non-space, non-comment) character, to tell a regex
  // literal from a division.
  let previous = '';
  let i = open;

  const fail = (why) => { throw new Error(`cannot match the brace at offset ${open}: ${why}`); };

  /** Skips a quoted string starting at i; returns the index after it. */
  const skipString = (at) => {
    const quote = src[at];
    for (let j = at + 1; j < src.length; j++) {
      if (src[j] === '\\') { j++; continue; }
      if (src[j] === quote) return j + 1;
      if (src[j] === '\n') fail(`unterminated string at offset ${at}`);
    }
    return fail(`unterminated string at offset ${at}`);
  };

  /**
   * Scans template text from `at` (just after "`" or after the `}` ending an
   * expression). Returns { end, expression }: expression is true when it
   * stopped at `${` (end is after it), false at the closing "`".
   */
  const scanTemplate = (at) => {
    for (let j = at; j < src.length; j++) {
      if (src[j] === '\\') { j++; continue; }
      if (src[j] === '`') return { end: j + 1, expression: false };
      if (src[j] === '$' && src[j + 1] === '{') return { end: j + 2, expression: true };
    }
    return fail(`unterminated template literal at offset ${at}`);
  };

  const skipRegex = (at) => {
    let inClass = false;
    for (let j = at + 1; j < src.length; j++) {
      const c = src[j];
      if (c === '\\') { j++; continue; }
      if (c === '\n') fail(`unterminated regex literal at offset ${at}`);
      if (inClass) { if (c === ']') inClass = false; continue; }
      if (c === '[') { inClass = true; continue; }
      if (c === '/') {
        j++;
        while (j < src.length && /[a-z]/i.test(src[j])) j++;
        return j;
      }
    }
    return fail(`unterminated regex literal at offset ${at}`);
  };

  const regexCanStart = () =>
    previous === '' || '(,=:[!&|?{};+-*%<>~^'.includes(previous) || /\b(return|typeof|case|do|else|in|of|new|delete|void|throw|yield|await)$/.test(src.slice(Math.max(0, i - 8), i).trimEnd());

  while (i < src.length) {
    const c = src[i];
    if (c === '/' && src[i + 1] === '/') {
      const end = src.indexOf('\n', i);
      i = end === -1 ? src.length : end;
      continue;
    }
    if (c === '/' && src[i + 1] === '*') {
      const end = src.indexOf('*/', i + 2);
      if (end === -1) fail(`unterminated comment at offset ${i}`);
      i = end + 2;
      continue;
    }
    if (/\s/.test(c)) { i++; continue; }
    if (c === '"' || c === "'") {
      i = skipString(i);
      previous = 'x';
      continue;
    }
    if (c === '`') {
      const { end, expression } = scanTemplate(i + 1);
      if (expression) stack.push('template');
      i = end;
      previous = expression ? '{' : 'x';
      continue;
    }
    if (c === '/' && regexCanStart()) {
      i = skipRegex(i);
      previous = 'x';
      continue;
    }
    if (c === '{') {
      stack.push('block');
    } else if (c === '}') {
      const kind = stack.pop();
      if (kind === undefined) fail(`unbalanced "}" at offset ${i}`);
      if (kind === 'template') {
        // Back in the template text after its `${ ... }`.
        const { end, expression } = scanTemplate(i + 1);
        if (expression) stack.push('template');
        i = end;
        previous = expression ? '{' : 'x';
        continue;
      }
      if (stack.length === 0) return i;
    }
    previous = c;
    i++;
  }
  return fail('no matching "}" before the end of the code block');
}

// --- loading the class ----------------------------------------------------

/**
 * Evaluates the class as written. Its free names are supplied by the
 * Function's parameters: `WebSocket` (ws's, counting constructions),
 * `console` (quiet: lines are kept for failure messages) and `setTimeout`
 * (recorded, so a test can see whether a reconnect was scheduled).
 */
function loadSeedClient(source) {
  const sockets = [];
  const timers = [];
  const logs = [];
  class CountingWebSocket extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  }
  const quietConsole = {
    log: (...args) => logs.push(['log', ...args]),
    info: (...args) => logs.push(['info', ...args]),
    warn: (...args) => logs.push(['warn', ...args]),
    error: (...args) => logs.push(['error', ...args]),
    debug: (...args) => logs.push(['debug', ...args]),
  };
  const recordingSetTimeout = (callback, delay, ...rest) => {
    timers.push(delay);
    return setTimeout(callback, delay, ...rest);
  };
  const factory = new Function(
    'WebSocket', 'console', 'setTimeout',
    `${source}\nreturn ${CLASS_NAME};`,
  );
  const Client = factory(CountingWebSocket, quietConsole, recordingSetTimeout);
  return { Client, sockets, timers, logs };
}

let seedSource = null;
let server = null;

before(async () => {
  if (skipReason) return;
  seedSource = extractSeedClass(readFileSync(seedPath, 'utf8'));
  server = await startStrom();
});

after(async () => {
  await server?.stop();
});

// --- helpers ----------------------------------------------------------------

/**
 * Resolves with the first value recorded by `seen` (see record()) for which
 * `predicate` holds, whether it came already or comes later.
 */
function waitFor(seen, predicate, what, timeoutMs = MESSAGE_TIMEOUT_MS) {
  const index = seen.values.findIndex(predicate);
  if (index !== -1) return Promise.resolve(seen.values[index]);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      seen.waiters.delete(waiter);
      reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; seen: ${JSON.stringify(seen.values)}`));
    }, timeoutMs);
    const waiter = (value) => {
      if (!predicate(value)) return;
      clearTimeout(timer);
      seen.waiters.delete(waiter);
      resolve(value);
    };
    seen.waiters.add(waiter);
  });
}

/** Records every value a listener of the client receives. */
function record(client, event) {
  const seen = { values: [], waiters: new Set() };
  client.on(event, (value) => {
    seen.values.push(value);
    for (const waiter of [...seen.waiters]) waiter(value);
  });
  return seen;
}

function publishRecord(type, collection, data, oldData) {
  const event = { type, collection, record_id: data.id, data };
  if (oldData !== undefined) event.old_data = oldData;
  return publish(server.baseUrl, event);
}

/** Resolves once the server no longer lists connection `name` in its stats. */
async function connectionGone(name, timeoutMs = MESSAGE_TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const stats = await (await fetch(`${server.baseUrl}/api/v1/stats`)).json();
    if (!(name in stats.subscriptions)) return;
    if (Date.now() > deadline) {
      throw new Error(`the server still lists connection ${name} ${timeoutMs} ms after the client closed`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

// --- tests ------------------------------------------------------------------

test('the seed client subscribes, with and without a filter, and receives events once', async (t) => {
  if (skipReason) { t.skip(skipReason); return; }
  const { Client, sockets } = loadSeedClient(seedSource);
  const posts = uniqueCollection('posts');
  const comments = uniqueCollection('comments');

  // As in the seed's usage example.
  const realtime = new Client(server.baseUrl);
  realtime
    .connect()
    .on('connected', () => {
      realtime.subscribe(posts, { published: true });
      realtime.subscribe(comments);
    });
  t.after(() => realtime.disconnect());

  const connected = record(realtime, 'connected');
  const subscribed = record(realtime, 'subscribed');
  const errors = record(realtime, 'error');
  const events = record(realtime, 'event');
  const postsCreated = record(realtime, `${posts}:record.created`);
  const postsUpdated = record(realtime, `${posts}:record.updated`);
  const postsDeleted = record(realtime, `${posts}:record.deleted`);
  const commentsCreated = record(realtime, `${comments}:record.created`);
  const created = record(realtime, 'record.created');
  const updated = record(realtime, 'record.updated');
  const deleted = record(realtime, 'record.deleted');

  // 'connected' fires twice (socket open, then the server's greeting), so
  // the client sends each subscribe twice; wait for all four confirmations,
  // after which both subscriptions are in place exactly once.
  const greeting = await waitFor(connected, (data) => data !== undefined, 'the server greeting');
  assert.equal(typeof greeting.connection_id, 'string');
  const confirmedTwice = (collection) => waitFor(subscribed,
    () => subscribed.values.filter((d) => d.collection === collection).length === 2,
    `two "subscribed" confirmations for ${collection}`);
  await confirmedTwice(posts);
  await confirmedTwice(comments);
  assert.equal(connected.values.length, 2, 'connected is emitted on open and for the greeting');
  for (const confirmation of subscribed.values.filter((d) => d.collection === posts)) {
    assert.deepEqual(confirmation.filter, { published: true });
  }
  for (const confirmation of subscribed.values.filter((d) => d.collection === comments)) {
    assert.equal(confirmation.filter ?? null, null);
  }

  const draft = { id: 'd1', title: 'Draft', published: false };
  const live = { id: 'p1', title: 'Hello', published: true };
  const edited = { id: 'p1', title: 'Hello again', published: true };
  const comment = { id: 'c1', post_id: 'p1', body: 'First!' };
  const sentinel = { id: 'c2', post_id: 'p1', body: 'Last' };

  // The draft does not match the filter and is published first: had it been
  // delivered, it would be the first event received.
  await publishRecord('record.created', posts, draft);
  const seqCreated = await publishRecord('record.created', posts, live);
  const seqComment = await publishRecord('record.created', comments, comment);
  const seqUpdated = await publishRecord('record.updated', posts, edited, live);
  const seqDeleted = await publishRecord('record.deleted', posts, edited);
  // One connection receives events in seq order: once the sentinel is in,
  // everything published before it has arrived (or never will).
  const seqSentinel = await publishRecord('record.created', comments, sentinel);
  await waitFor(events, (e) => e.seq === seqSentinel, `the sentinel event (seq ${seqSentinel})`);

  assert.deepEqual(errors.values, [], 'no error messages');
  assert.deepEqual(
    events.values.map((e) => [e.seq, e.type, e.collection]),
    [
      [seqCreated, 'record.created', posts],
      [seqComment, 'record.created', comments],
      [seqUpdated, 'record.updated', posts],
      [seqDeleted, 'record.deleted', posts],
      [seqSentinel, 'record.created', comments],
    ],
    'each matching event once, in order, and the unpublished draft never',
  );
  assert.deepEqual(events.values[2].old_data, live);

  // The class's own dispatch: `${collection}:${type}` gets the record...
  assert.deepEqual(postsCreated.values, [live]);
  assert.deepEqual(postsUpdated.values, [edited]);
  assert.deepEqual(postsDeleted.values, [edited]);
  assert.deepEqual(commentsCreated.values, [comment, sentinel]);
  // ...and the bare type gets { collection, data }.
  assert.deepEqual(created.values, [
    { collection: posts, data: live },
    { collection: comments, data: comment },
    { collection: comments, data: sentinel },
  ]);
  assert.deepEqual(updated.values, [{ collection: posts, data: edited }]);
  assert.deepEqual(deleted.values, [{ collection: posts, data: edited }]);

  assert.equal(sockets.length, 1, 'one WebSocket for the whole test');
});

test('disconnect() closes cleanly and the seed client does not reconnect', async (t) => {
  if (skipReason) { t.skip(skipReason); return; }
  const { Client, sockets, timers } = loadSeedClient(seedSource);

  const realtime = new Client(server.baseUrl).connect();
  const connected = record(realtime, 'connected');
  const disconnected = record(realtime, 'disconnected');
  const greeting = await waitFor(connected, (data) => data !== undefined, 'the server greeting');
  assert.equal(sockets.length, 1);
  const socket = sockets[0];
  const closed = new Promise((resolve) => socket.addEventListener('close', resolve, { once: true }));

  realtime.disconnect();
  const close = await closed;
  await waitFor(disconnected, () => true, 'the "disconnected" callback');

  assert.equal(close.wasClean, true, `the close should be clean (code ${close.code})`);
  assert.equal(socket.readyState, WebSocket.CLOSED);
  assert.equal(disconnected.values.length, 1);
  // The class decides synchronously in onclose whether to reconnect, by
  // scheduling a timer; none was scheduled and no second socket exists.
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(timers, [], 'no reconnect timer was scheduled');
  assert.equal(sockets.length, 1, 'no second WebSocket was opened');
  assert.equal(realtime.reconnectAttempts, 0);

  // The server has let go of the connection too.
  await connectionGone(greeting.connection_id);
});
