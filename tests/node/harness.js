// Test harness: starts the strom binary, opens FastCMS-style clients and
// publishes events over REST. No fixed sleeps anywhere: everything waits on
// a concrete signal (a stdout line, a message, a process exit) with a timeout.

import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

import { FastCMSClient } from './fastcms_client.js';

const STARTUP_TIMEOUT_MS = 15_000;
const STOP_TIMEOUT_MS = 5_000;
export const MESSAGE_TIMEOUT_MS = 5_000;

/** Path of the strom binary: $STROM_BIN, else ../../target/debug/strom. */
export function stromBin() {
  return process.env.STROM_BIN
    ? path.resolve(process.env.STROM_BIN)
    : fileURLToPath(new URL('../../target/debug/strom', import.meta.url));
}

/**
 * Starts `strom serve --listen 127.0.0.1:0` and resolves, once it prints
 * `listening on http://127.0.0.1:PORT`, to { baseUrl, port, stop }.
 */
export async function startStrom() {
  const bin = stromBin();
  if (!existsSync(bin)) {
    throw new Error(`strom binary not found at ${bin}: build it first or set STROM_BIN`);
  }

  const child = spawn(bin, ['serve', '--listen', '127.0.0.1:0'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  // Safety net: never leave the server behind, even if this process exits
  // abruptly or is interrupted (the signal is re-raised after the kill).
  const killOnExit = () => child.kill('SIGKILL');
  const killOnSignal = (signal) => { killOnExit(); process.kill(process.pid, signal); };
  process.once('exit', killOnExit);
  process.once('SIGINT', killOnSignal);
  process.once('SIGTERM', killOnSignal);

  // Keep the last few KiB of stderr for error messages; keep draining it.
  let stderrTail = '';
  child.stderr.on('data', (chunk) => { stderrTail = (stderrTail + chunk).slice(-8192); });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));

  // The readline interface keeps draining stdout for the server's lifetime.
  const lines = readline.createInterface({ input: child.stdout });

  const port = await new Promise((resolve, reject) => {
    let settled = false;
    const fail = (why) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.kill('SIGKILL');
      reject(new Error(`strom did not start (${bin}): ${why}\n--- stderr ---\n${stderrTail}`));
    };
    const timer = setTimeout(() => fail(`no "listening on" line within ${STARTUP_TIMEOUT_MS} ms`), STARTUP_TIMEOUT_MS);
    child.once('error', (err) => fail(err.message));
    exited.then(({ code, signal }) => fail(`exited early with code ${code}, signal ${signal}`));
    lines.on('line', (line) => {
      const match = /listening on http:\/\/127\.0\.0\.1:(\d+)\b/.exec(line);
      if (match && !settled) {
        settled = true;
        clearTimeout(timer);
        resolve(Number(match[1]));
      }
    });
  });

  async function stop() {
    process.off('exit', killOnExit);
    process.off('SIGINT', killOnSignal);
    process.off('SIGTERM', killOnSignal);
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
    await exited;
    clearTimeout(timer);
    lines.close();
  }

  return { baseUrl: `http://127.0.0.1:${port}`, port, stop };
}

/**
 * Buffers every message a client receives and lets a test take them out in
 * arrival order: nextMessage(predicate, timeoutMs) resolves with the earliest
 * not-yet-taken message that satisfies predicate (which removes it from the
 * buffer), waiting for one if none has arrived yet. It rejects on timeout or
 * when the connection closes first.
 */
export function createInbox(client) {
  const buffered = [];
  const waiters = [];
  let closed = null;

  client.onMessage((message) => {
    const index = waiters.findIndex((w) => w.predicate(message));
    if (index === -1) {
      buffered.push(message);
      return;
    }
    const [waiter] = waiters.splice(index, 1);
    clearTimeout(waiter.timer);
    waiter.resolve(message);
  });

  client.on('disconnected', ({ code, reason }) => {
    closed = `connection closed (code ${code}${reason ? `, reason "${reason}"` : ''})`;
    for (const waiter of waiters.splice(0)) {
      clearTimeout(waiter.timer);
      waiter.reject(new Error(`${closed} while waiting for a message matching ${describe(waiter.predicate)}`));
    }
  });

  function nextMessage(predicate, timeoutMs = MESSAGE_TIMEOUT_MS) {
    const index = buffered.findIndex(predicate);
    if (index !== -1) return Promise.resolve(buffered.splice(index, 1)[0]);
    if (closed) {
      return Promise.reject(new Error(`${closed} before a message matching ${describe(predicate)}`));
    }
    return new Promise((resolve, reject) => {
      const waiter = { predicate, resolve, reject };
      waiter.timer = setTimeout(() => {
        waiters.splice(waiters.indexOf(waiter), 1);
        const seen = buffered.slice(-10).map((m) => JSON.stringify(m)).join('\n  ') || '(none)';
        reject(new Error(
          `timed out after ${timeoutMs} ms waiting for a message matching ${describe(predicate)}\n` +
          `other messages received and not taken:\n  ${seen}`,
        ));
      }, timeoutMs);
      waiters.push(waiter);
    });
  }

  return { nextMessage };
}

function describe(predicate) {
  return predicate.label ?? predicate.toString();
}

/** Predicate: a server message of the given type (and optional extra check). */
export function ofType(type, check = () => true) {
  const predicate = (m) => m.type === type && check(m.data);
  predicate.label = `type "${type}"${check.length ? ` where ${check.toString()}` : ''}`;
  return predicate;
}

/** Predicate: any `event` message, optionally limited to some collections. */
export function anEvent(...collections) {
  const predicate = (m) => m.type === 'event' && (collections.length === 0 || collections.includes(m.data?.collection));
  predicate.label = collections.length ? `an event on ${collections.join(' or ')}` : 'any event';
  return predicate;
}

/**
 * Opens a FastCMS client against baseUrl, waits for the server's `connected`
 * greeting and closes the client when test context t ends.
 * Resolves to { client, nextMessage, welcome } (welcome = the greeting's data).
 */
export async function openClient(t, baseUrl, token = null) {
  const client = new FastCMSClient(baseUrl, token);
  const { nextMessage } = createInbox(client);
  client.connect();
  t.after(() => client.disconnect());
  await client.opened();
  const welcome = (await nextMessage(ofType('connected'))).data;
  return { client, nextMessage, welcome };
}

/** Subscribes and waits for the matching `subscribed` confirmation's data. */
export async function subscribe({ client, nextMessage }, collection, filter = null) {
  client.subscribe(collection, filter);
  return (await nextMessage(ofType('subscribed', (d) => d.collection === collection))).data;
}

/** POST /api/v1/publish; asserts HTTP 200 and resolves to the returned seq. */
export async function publish(baseUrl, event) {
  const response = await fetch(`${baseUrl}/api/v1/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(event),
  });
  const text = await response.text();
  if (response.status !== 200) {
    throw new Error(`publish ${JSON.stringify(event)} -> HTTP ${response.status}: ${text}`);
  }
  const body = JSON.parse(text);
  if (!Number.isInteger(body.seq)) {
    throw new Error(`publish response has no integer "seq": ${text}`);
  }
  return body.seq;
}

/** A collection name no other test uses (letters, digits, underscores). */
export function uniqueCollection(label) {
  return `${label}_${randomBytes(4).toString('hex')}`;
}

/** RFC 3339 date-time, e.g. 2024-05-01T12:00:00.123Z or ...+02:00. */
export const RFC3339 = /^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/;
