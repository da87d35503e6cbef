// End to end in headless Chromium.
//
// 1. A page loads the built ESM files from dist/ with a <script type="module">
//    and renders a collection live. The test publishes, kills the strom node
//    the page talks to, publishes through a second node on the same NATS,
//    restarts the first node on the same port, and waits for the page to show
//    every event of the outage, exactly once.
// 2. A React app (test/e2e/react-app, bundled here with Vite against dist/)
//    shows orders through React Query kept current by strom-client/tanstack,
//    and through useLiveQuery with a load; it goes offline and back, and
//    sends and receives channel messages.

import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { type BrowserContext, type Page, chromium } from 'playwright-core';
import { build } from 'vite';
import { afterAll, beforeAll, expect, test } from 'vitest';
import WebSocket from 'ws';

import { type JsonObject, StromClient } from '../../src/index.js';

import {
  type NatsHandle, type StromHandle, freePort, killAll, publishRaw, startNats, startStrom, uniqueCollection,
} from '../helpers/servers.js';

const packageRoot = fileURLToPath(new URL('../../', import.meta.url));
const chromiumPath = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const screenshotPath = process.env.STROM_E2E_SCREENSHOT ?? '/tmp/strom-e2e.png';
const reactScreenshotPath = screenshotPath.replace(/(\.png)?$/, '-react.png');
const WAIT_MS = 20_000;

let nats: NatsHandle;
let nodeA: StromHandle;
let nodeB: StromHandle;
let portA: number;
let site: http.Server;
let siteUrl: string;
let context: BrowserContext | null = null;
let userDataDir: string;
let reactBuildDir: string;
/** The React app's API: GET /api/orders answers the open orders. */
const orders = new Map<string, JsonObject>();

/**
 * Bundles the React app with Vite. `strom-client` and its subpaths resolve
 * through the package's own "exports" to dist/, as they would for an app
 * that installed the package.
 */
async function buildReactApp(outDir: string): Promise<void> {
  const { exports } = JSON.parse(readFileSync(path.join(packageRoot, 'package.json'), 'utf8')) as {
    exports: Record<string, { import: string }>;
  };
  await build({
    configFile: false,
    logLevel: 'warn',
    root: path.join(packageRoot, 'test/e2e/react-app'),
    base: '/react/',
    build: {
      outDir,
      emptyOutDir: true,
      minify: false,
      reportCompressedSize: false,
      rollupOptions: {
        // React Query's "use client" lines mean nothing in a client bundle.
        onwarn(warning, warn) {
          if (warning.code !== 'MODULE_LEVEL_DIRECTIVE') warn(warning);
        },
      },
    },
    plugins: [{
      name: 'strom-client-exports',
      resolveId(id) {
        const match = /^strom-client(\/[\w-]+)?$/.exec(id);
        const entry = match ? exports[`.${match[1] ?? ''}`] : undefined;
        return entry ? path.join(packageRoot, entry.import) : null;
      },
    }],
  });
}

/** Serves the test page, the package's dist/, the React app and its API (nothing else). */
function serveSite(): Promise<http.Server> {
  const types: Record<string, string> = { '.js': 'text/javascript', '.map': 'application/json', '.html': 'text/html' };
  const server = http.createServer((request, response) => {
    const url = new URL(request.url ?? '/', 'http://localhost');
    let file: string | null = null;
    if (url.pathname === '/api/orders') {
      response.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' });
      response.end(JSON.stringify([...orders.values()].filter((order) => order.open)));
      return;
    }
    if (url.pathname === '/') file = path.join(packageRoot, 'test/e2e/page.html');
    else if (/^\/dist\/[\w.-]+$/.test(url.pathname)) file = path.join(packageRoot, url.pathname);
    else if (url.pathname === '/react/') file = path.join(reactBuildDir, 'index.html');
    else if (/^\/react\/assets\/[\w.-]+$/.test(url.pathname)) file = path.join(reactBuildDir, url.pathname.slice('/react/'.length));
    try {
      if (!file) throw new Error('not found');
      const body = readFileSync(file);
      response.writeHead(200, { 'content-type': types[path.extname(file)] ?? 'application/octet-stream', 'cache-control': 'no-store' });
      response.end(body);
    } catch {
      response.writeHead(404, { 'content-type': 'text/plain' });
      response.end('not found');
    }
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

beforeAll(async () => {
  reactBuildDir = mkdtempSync(path.join(os.tmpdir(), 'strom-e2e-react-'));
  await buildReactApp(reactBuildDir);
  nats = await startNats();
  portA = await freePort();
  [nodeA, nodeB, site] = await Promise.all([
    startStrom({ port: portA, natsUrl: nats.url }),
    startStrom({ natsUrl: nats.url }),
    serveSite(),
  ]);
  siteUrl = `http://127.0.0.1:${(site.address() as AddressInfo).port}`;
  userDataDir = mkdtempSync(path.join(os.tmpdir(), 'strom-e2e-chromium-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath,
    headless: true,
    viewport: { width: 900, height: 560 },
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
});

afterAll(async () => {
  await context?.close().catch(() => {});
  await new Promise<void>((resolve) => (site ? site.close(() => resolve()) : resolve()));
  await killAll();
  if (userDataDir) rmSync(userDataDir, { recursive: true, force: true });
  if (reactBuildDir) rmSync(reactBuildDir, { recursive: true, force: true });
});

async function pageState(page: Page) {
  return page.evaluate(() => {
    const debug = (window as unknown as { __strom: { seqs: number[]; subscribed: number; resets: number; state: string } }).__strom;
    return {
      ...debug,
      ids: [...document.querySelectorAll('#records li')].map((li) => (li as HTMLElement).dataset.id),
      badge: document.getElementById('state')?.textContent,
    };
  });
}

test('a page renders a collection live and catches up after its server was killed and restarted', async () => {
  const page = await context!.newPage();
  const pageErrors: string[] = [];
  page.on('pageerror', (error) => pageErrors.push(error.message));
  page.on('console', (message) => { if (message.type() === 'error') pageErrors.push(message.text()); });

  const collection = uniqueCollection('orders');
  await page.goto(`${siteUrl}/?strom=${encodeURIComponent(`http://127.0.0.1:${portA}`)}&collection=${collection}`);
  await page.waitForFunction(() => {
    const debug = (window as unknown as { __strom?: { subscribed: number; state: string } }).__strom;
    return debug?.subscribed === 1 && document.getElementById('state')?.textContent === 'connected';
  }, null, { timeout: WAIT_MS });

  const expectedSeqs: number[] = [];
  const publish = async (baseUrl: string, type: string, id: string, data: Record<string, unknown>) => {
    const seq = await publishRaw(baseUrl, { type, collection, record_id: id, data: { id, ...data } });
    if (data.visible === true) expectedSeqs.push(seq);
    return seq;
  };
  const waitForIds = (ids: string[]) => page.waitForFunction(
    (wanted) => {
      const shown = [...document.querySelectorAll('#records li')].map((li) => (li as HTMLElement).dataset.id);
      return shown.length === wanted.length && wanted.every((id, i) => shown[i] === id);
    },
    ids,
    { timeout: WAIT_MS },
  );

  // Live: three records, one of them hidden by the page's filter, one updated.
  await publish(nodeA.baseUrl, 'record.created', 'o1', { title: 'First order', visible: true, phase: 'before' });
  await publish(nodeA.baseUrl, 'record.created', 'h1', { title: 'Hidden', visible: false, phase: 'before' });
  await publish(nodeA.baseUrl, 'record.created', 'o2', { title: 'Second order', visible: true, phase: 'before' });
  await publish(nodeA.baseUrl, 'record.updated', 'o1', { title: 'First order (paid)', visible: true, phase: 'before' });
  await waitForIds(['o1', 'o2']);
  await expect(page.locator('li[data-id="o1"]')).toBeDefined();
  expect(await page.locator('li[data-id="o1"]').textContent()).toContain('First order (paid)');

  // Outage: node A dies without a goodbye.
  await nodeA.kill();
  await page.waitForFunction(() => document.getElementById('state')?.textContent === 'reconnecting', null, { timeout: WAIT_MS });

  // Meanwhile, through node B on the same NATS.
  await publish(nodeB.baseUrl, 'record.created', 'o3', { title: 'Placed during the outage', visible: true, phase: 'outage' });
  await publish(nodeB.baseUrl, 'record.created', 'h2', { title: 'Hidden too', visible: false, phase: 'outage' });
  await publish(nodeB.baseUrl, 'record.created', 'o4', { title: 'Also during the outage', visible: true, phase: 'outage' });
  await publish(nodeB.baseUrl, 'record.deleted', 'o2', { title: 'Second order', visible: true, phase: 'outage' });
  await publish(nodeB.baseUrl, 'record.created', 'o5', { title: 'Last one of the outage', visible: true, phase: 'outage' });
  await publish(nodeB.baseUrl, 'record.updated', 'o3', { title: 'Placed during the outage (paid)', visible: true, phase: 'outage' });

  // Node A comes back on the same port; the page reconnects and resumes.
  nodeA = await startStrom({ port: portA, natsUrl: nats.url });
  await waitForIds(['o1', 'o3', 'o4', 'o5']);
  await page.waitForFunction(() => document.getElementById('state')?.textContent === 'connected', null, { timeout: WAIT_MS });

  // And live again afterwards.
  await publish(nodeA.baseUrl, 'record.created', 'o6', { title: 'After the restart', visible: true, phase: 'after' });
  await waitForIds(['o1', 'o3', 'o4', 'o5', 'o6']);
  expect(await page.locator('li[data-id="o3"]').textContent()).toContain('(paid)');

  const state = await pageState(page);
  expect(state.seqs, 'every event exactly once, in publish order').toEqual(expectedSeqs);
  expect(state.subscribed).toBe(2);
  expect(state.resets).toBe(0);
  expect(state.badge).toBe('connected');

  await page.screenshot({ path: screenshotPath, fullPage: true });
  // The browser logs the refused connections of the outage as console
  // errors; anything else is a failure.
  const unexpected = pageErrors.filter((message) => !/WebSocket connection to .* failed|ERR_CONNECTION_REFUSED/.test(message));
  expect(unexpected).toEqual([]);
  await page.close();
});

test('a React app: React Query kept current by a cache strategy, useLiveQuery with a load, offline and back, a channel', async () => {
  const page = await context!.newPage();
  const pageErrors: string[] = [];
  page.on('pageerror', (error) => pageErrors.push(error.message));
  page.on('console', (message) => { if (message.type() === 'error') pageErrors.push(message.text()); });

  const collection = uniqueCollection('orders');
  const server = nodeB.baseUrl;
  orders.clear();
  orders.set('o1', { id: 'o1', open: true, title: 'First order', v: 1 });
  orders.set('o2', { id: 'o2', open: true, title: 'Second order', v: 1 });
  /** Changes the app's data and publishes the change, as a backend would. */
  const change = async (type: string, data: JsonObject) => {
    const id = String(data.id);
    const old = orders.get(id) ?? null;
    if (type === 'record.deleted') orders.delete(id);
    else orders.set(id, { ...old, ...data });
    return publishRaw(server, { type, collection, record_id: id, data: type === 'record.deleted' ? old : orders.get(id), old_data: old });
  };
  const shown = (list: 'query' | 'live') => page.evaluate(
    (id) => [...document.querySelectorAll(`#${id} li`)].map((li) => li.textContent),
    list,
  );
  const waitForLists = async (expected: string[]) => {
    for (const list of ['query', 'live'] as const) {
      await page.waitForFunction(
        ({ id, wanted }) => {
          const items = [...document.querySelectorAll(`#${id} li`)].map((li) => li.textContent);
          return items.length === wanted.length && wanted.every((text, i) => items[i] === text);
        },
        { id: list, wanted: expected },
        { timeout: WAIT_MS },
      ).catch(async (error: unknown) => {
        throw new Error(`#${list} shows ${JSON.stringify(await shown(list))}, expected ${JSON.stringify(expected)}: ${String(error)}`);
      });
    }
  };
  const waitForState = (state: string) => page.waitForFunction(
    (wanted) => document.getElementById('state')?.textContent === wanted, state, { timeout: WAIT_MS },
  );

  await page.goto(`${siteUrl}/react/?strom=${encodeURIComponent(server)}&collection=${collection}`);
  await waitForState('connected');
  await waitForLists(['o1: First order (v1)', 'o2: Second order (v1)']);

  // Created, updated (merged into the cached record), left the filter, deleted.
  await change('record.created', { id: 'o3', open: true, title: 'Third order', v: 1 });
  await change('record.updated', { id: 'o1', title: 'First order (paid)', v: 2 });
  await change('record.updated', { id: 'o2', open: false, v: 2 });
  await change('record.created', { id: 'o4', open: true, title: 'Fourth order', v: 1 });
  await change('record.deleted', { id: 'o4' });
  await waitForLists(['o1: First order (paid) (v2)', 'o3: Third order (v1)']);

  // Offline: the provider closes the client; back online, it resumes.
  await page.click('#toggle');
  await waitForState('disconnected');
  await change('record.created', { id: 'o5', open: true, title: 'Placed while offline', v: 1 });
  await page.click('#toggle');
  await waitForState('connected');
  await waitForLists(['o1: First order (paid) (v2)', 'o3: Third order (v1)', 'o5: Placed while offline (v1)']);

  // The channel: a message from a service reaches the page; the page's send reaches a listener.
  const room = `chat.${collection}`;
  const listener = new StromClient({ url: server, WebSocket, transport: 'websocket' });
  try {
    const heard: string[] = [];
    let live = false;
    listener.subscribe(room, { onEvent: (event) => heard.push(String(event.data.text)), onSubscribed: () => { live = true; } });
    await expect.poll(() => live, { timeout: WAIT_MS }).toBe(true);
    await listener.broadcast(room, { text: 'hello from a service' });
    await page.waitForFunction(() => document.querySelector('#chat li')?.textContent === 'hello from a service', null, { timeout: WAIT_MS });
    await page.click('#send');
    await expect.poll(() => heard, { timeout: WAIT_MS }).toContain('hello from the page');
  } finally {
    listener.close();
  }

  await page.screenshot({ path: reactScreenshotPath, fullPage: true });
  expect(pageErrors).toEqual([]);
  await page.close();
});
