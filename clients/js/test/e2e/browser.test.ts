// End to end in headless Chromium: a page loads the built ESM files from
// dist/ with a <script type="module"> and renders a collection live. The test
// publishes, kills the strom node the page talks to, publishes through a
// second node on the same NATS, restarts the first node on the same port,
// and waits for the page to show every event of the outage, exactly once.

import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { type BrowserContext, type Page, chromium } from 'playwright-core';
import { afterAll, beforeAll, expect, test } from 'vitest';

import {
  type NatsHandle, type StromHandle, freePort, killAll, publishRaw, startNats, startStrom, uniqueCollection,
} from '../helpers/servers.js';

const packageRoot = fileURLToPath(new URL('../../', import.meta.url));
const chromiumPath = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const screenshotPath = process.env.STROM_E2E_SCREENSHOT ?? '/tmp/strom-e2e.png';
const WAIT_MS = 20_000;

let nats: NatsHandle;
let nodeA: StromHandle;
let nodeB: StromHandle;
let portA: number;
let site: http.Server;
let siteUrl: string;
let context: BrowserContext | null = null;
let userDataDir: string;

/** Serves the test page and the package's dist/ (nothing else). */
function serveSite(): Promise<http.Server> {
  const types: Record<string, string> = { '.js': 'text/javascript', '.map': 'application/json', '.html': 'text/html' };
  const server = http.createServer((request, response) => {
    const url = new URL(request.url ?? '/', 'http://localhost');
    let file: string | null = null;
    if (url.pathname === '/') file = path.join(packageRoot, 'test/e2e/page.html');
    else if (/^\/dist\/[\w.-]+$/.test(url.pathname)) file = path.join(packageRoot, url.pathname);
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
