// Starts the real strom binary and nats-server for the integration and
// browser tests. Nothing waits on a fixed sleep: every wait is for a concrete
// line, exit or condition, with a timeout. Every process started here is
// killed when the test file ends (killAll in afterAll) and, as a safety net,
// when the test process exits for any reason.

import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const STARTUP_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 5_000;

// From strings: under the jsdom environment the global URL is jsdom's, which
// Node's fileURLToPath does not take.
const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../..');

export function stromBin(): string {
  const bin = process.env.STROM_BIN ? path.resolve(process.env.STROM_BIN) : path.join(repoRoot, 'target/debug/strom');
  if (!existsSync(bin)) throw new Error(`strom binary not found at ${bin}: build it or set STROM_BIN`);
  return bin;
}

export function natsServerBin(): string {
  const bin = process.env.STROM_NATS_SERVER
    ? path.resolve(process.env.STROM_NATS_SERVER)
    : path.join(repoRoot, '.tools/nats/bin/nats-server');
  if (!existsSync(bin)) throw new Error(`nats-server not found at ${bin}: run scripts/test once or set STROM_NATS_SERVER`);
  return bin;
}

// --- process bookkeeping ------------------------------------------------------

const running = new Set<ChildProcess>();
const tempDirs = new Set<string>();

process.once('exit', () => {
  for (const child of running) child.kill('SIGKILL');
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
});

/** Kills every process this module started and still runs; removes temp dirs. */
export async function killAll(): Promise<void> {
  await Promise.all([...running].map((child) => stopChild(child, 'SIGKILL')));
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
  tempDirs.clear();
}

function track(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  running.add(child);
  return new Promise((resolve) => {
    child.once('exit', (code, signal) => {
      running.delete(child);
      resolve({ code, signal });
    });
  });
}

async function stopChild(child: ChildProcess, signal: NodeJS.Signals): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
  await exited;
  clearTimeout(timer);
}

export function makeTempDir(label: string): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), `strom-js-${label}-`));
  tempDirs.add(dir);
  return dir;
}

/** A TCP port that was free a moment ago (for restarting a server on the same port). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** Resolves with the first match of `pattern` in the lines of `stream`. */
function waitForLine(
  child: ChildProcess,
  stream: NodeJS.ReadableStream,
  pattern: RegExp,
  exited: Promise<unknown>,
  describe: () => string,
): Promise<RegExpExecArray> {
  const lines = readline.createInterface({ input: stream });
  return new Promise((resolve, reject) => {
    let settled = false;
    const finish = (error: Error | null, match?: RegExpExecArray) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (error) {
        child.kill('SIGKILL');
        reject(error);
      } else {
        resolve(match!);
      }
    };
    const timer = setTimeout(() => finish(new Error(`no line matching ${pattern} within ${STARTUP_TIMEOUT_MS} ms\n${describe()}`)), STARTUP_TIMEOUT_MS);
    child.once('error', (error) => finish(error));
    void exited.then(() => finish(new Error(`exited before printing a line matching ${pattern}\n${describe()}`)));
    lines.on('line', (line) => {
      const match = pattern.exec(line);
      if (match) finish(null, match);
    });
  });
}

// --- nats-server ----------------------------------------------------------------

export interface NatsHandle {
  url: string;
  stop(): Promise<void>;
}

export async function startNats(): Promise<NatsHandle> {
  const dir = makeTempDir('nats');
  const child = spawn(natsServerBin(), ['-js', '-a', '127.0.0.1', '-p', '-1', '-sd', dir], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const exited = track(child);
  let log = '';
  child.stderr!.on('data', (chunk) => { log = (log + chunk).slice(-8192); });
  const describe = () => `--- nats-server log ---\n${log}`;
  const [listening] = await Promise.all([
    waitForLine(child, child.stderr!, /Listening for client connections on 127\.0\.0\.1:(\d+)/, exited, describe),
    waitForLine(child, child.stderr!, /Server is ready/, exited, describe),
  ]);
  return {
    url: `nats://127.0.0.1:${listening[1]}`,
    stop: () => stopChild(child, 'SIGTERM'),
  };
}

// --- strom ----------------------------------------------------------------------

export interface StromHandle {
  baseUrl: string;
  port: number;
  /** SIGTERM: clean shutdown (WebSocket close 1001, SSE `error` event). */
  stop(): Promise<void>;
  /** SIGKILL: the process dies without a goodbye. */
  kill(): Promise<void>;
  /** The last lines of its log, for failure messages. */
  log(): string;
}

export interface StromOptions {
  /** Default 0: any free port. */
  port?: number;
  natsUrl?: string;
  args?: string[];
  env?: Record<string, string>;
}

export async function startStrom(options: StromOptions = {}): Promise<StromHandle> {
  const args = ['serve', '--listen', `127.0.0.1:${options.port ?? 0}`];
  if (options.natsUrl) args.push('--nats-url', options.natsUrl);
  args.push(...(options.args ?? []));
  const child = spawn(stromBin(), args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, STROM_LOG: process.env.STROM_LOG ?? 'warn', ...options.env },
  });
  const exited = track(child);
  let log = '';
  child.stderr!.on('data', (chunk) => { log = (log + chunk).slice(-8192); });
  const describe = () => `--- strom ${args.join(' ')} stderr ---\n${log}`;
  const match = await waitForLine(child, child.stdout!, /listening on http:\/\/127\.0\.0\.1:(\d+)\b/, exited, describe);
  const port = Number(match[1]);
  return {
    baseUrl: `http://127.0.0.1:${port}`,
    port,
    stop: () => stopChild(child, 'SIGTERM'),
    kill: () => stopChild(child, 'SIGKILL'),
    log: describe,
  };
}

// --- helpers ----------------------------------------------------------------------

/** POST /api/v1/publish straight over HTTP (not through the client under test). */
export async function publishRaw(baseUrl: string, event: unknown, token?: string): Promise<number> {
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(`${baseUrl}/api/v1/publish`, { method: 'POST', headers, body: JSON.stringify(event) });
  const text = await response.text();
  if (!response.ok) throw new Error(`publish -> HTTP ${response.status}: ${text}`);
  return (JSON.parse(text) as { seq: number }).seq;
}

/** Waits until `check` returns a truthy value (polling), or fails with `what`. */
export async function until<T>(what: string, check: () => T | Promise<T>, timeoutMs = 15_000): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown = null;
  for (;;) {
    try {
      const value = await check();
      if (value) return value as NonNullable<T>;
    } catch (error) {
      lastError = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastError ? `: ${String(lastError)}` : ''}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** A collection name no other test uses. */
export function uniqueCollection(label: string): string {
  return `${label}_${Math.random().toString(16).slice(2, 10)}`;
}
