// End to end in headless Chromium: the operator dashboard strom serves at
// GET / (src/edge/dashboard.html). The page polls /api/v1/stats and
// /api/v1/presence and tails strom's own SSE stream through fetch(), with the
// filter typed into #filter. Every wait is for something the page shows; the
// page's polls and stream are the only clocks.

import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { type BrowserContext, type Page, chromium } from 'playwright-core';
import { afterAll, beforeAll, expect, test } from 'vitest';
import WebSocket from 'ws';

import { type StromHandle, killAll, publishRaw, startStrom, uniqueCollection } from '../helpers/servers.js';

const chromiumPath = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const WAIT_MS = 20_000;
const OPS_TOKEN = 'dashboard-test-ops-token-0123456789';

let open: StromHandle;
let guarded: StromHandle;
let context: BrowserContext | null = null;
let userDataDir: string;
const sockets: WebSocket[] = [];

beforeAll(async () => {
  [open, guarded] = await Promise.all([
    startStrom(),
    startStrom({ args: ['--ops-token', OPS_TOKEN] }),
  ]);
  userDataDir = mkdtempSync(path.join(os.tmpdir(), 'strom-dashboard-chromium-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath,
    headless: true,
    viewport: { width: 1280, height: 800 },
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
});

afterAll(async () => {
  for (const socket of sockets) socket.terminate();
  await context?.close().catch(() => {});
  await killAll();
  if (userDataDir) rmSync(userDataDir, { recursive: true, force: true });
});

/** A page on `baseUrl`/ that records its script errors. */
async function openDashboard(baseUrl: string): Promise<{ page: Page; errors: string[] }> {
  const page = await context!.newPage();
  const errors: string[] = [];
  page.on('pageerror', (error) => errors.push(error.message));
  page.on('console', (message) => {
    // Chromium logs every non-2xx fetch; the refusals the tests provoke are expected.
    if (message.type() === 'error' && !/status of (400|401)/.test(message.text())) errors.push(message.text());
  });
  const response = await page.goto(`${baseUrl}/`);
  expect(response?.status()).toBe(200);
  expect(response?.headers()['content-type']).toContain('text/html');
  return { page, errors };
}

/** A WebSocket client of strom's own protocol, once its `connected` greeting came. */
function connectWs(baseUrl: string, query: string): Promise<WebSocket> {
  const socket = new WebSocket(`${baseUrl.replace(/^http/, 'ws')}/api/v1/ws/realtime${query}`);
  sockets.push(socket);
  return new Promise((resolve, reject) => {
    socket.once('error', reject);
    socket.once('message', (raw) => {
      const message = JSON.parse(String(raw)) as { type: string };
      if (message.type === 'connected') resolve(socket);
      else reject(new Error(`expected connected, got ${String(raw)}`));
    });
  });
}

/** Sends `action` and resolves with the next message of type `type`. */
function request(socket: WebSocket, action: unknown, type: string): Promise<Record<string, unknown>> {
  return new Promise((resolve) => {
    const onMessage = (raw: WebSocket.RawData) => {
      const message = JSON.parse(String(raw)) as Record<string, unknown>;
      if (message.type !== type) return;
      socket.off('message', onMessage);
      resolve(message);
    };
    socket.on('message', onMessage);
    socket.send(JSON.stringify(action));
  });
}

/**
 * Applies `filter` in #filter with Enter and waits until the stream of that
 * filter is live. The submit handler takes the tail out of `live` before
 * the key press returns, so `live` afterwards is the new stream's
 * `connected` frame: its subscription is in place.
 */
async function applyFilter(page: Page, filter: string): Promise<void> {
  await page.locator('#filter').fill(filter);
  await page.locator('#filter').press('Enter');
  await page.locator('#tail-state[data-state="live"]').waitFor({ timeout: WAIT_MS });
}

const tailRow = (page: Page, text: string) => page.locator('#tail > li', { hasText: text });

test('the dashboard shows connections by transport, rates and who is online', { timeout: 60_000 }, async () => {
  const collection = uniqueCollection('watched');
  const ann = await connectWs(open.baseUrl, '?user_id=ann-e2e&user_name=Ann%20E2E');
  await request(ann, { action: 'subscribe', collection }, 'subscribed');

  const { page, errors } = await openDashboard(open.baseUrl);

  // Ann's WebSocket and the page's own SSE tail, from /api/v1/stats.
  await page.waitForFunction(() => {
    const cells = (name: string) => [...document.querySelectorAll('#connections tr')]
      .find((row) => row.firstElementChild?.textContent === name)?.lastElementChild?.textContent;
    return cells('websocket') === '1' && cells('sse') === '1';
  }, null, { timeout: WAIT_MS });
  await page.locator('#connections', { hasText: collection }).waitFor({ timeout: WAIT_MS });

  // Ann, from /api/v1/presence.
  const annRow = page.locator('#online li', { hasText: 'ann-e2e' });
  await annRow.waitFor({ timeout: WAIT_MS });
  expect(await annRow.textContent()).toContain('Ann E2E');

  // Rates come from two successive polls of the counters.
  for (let n = 0; n < 3; n++) {
    await publishRaw(open.baseUrl, { type: 'record.created', collection, record_id: `r${n}`, data: { n } });
  }
  await page.waitForFunction(() => {
    const text = document.getElementById('rates')?.textContent ?? '';
    return /\d/.test(text) && !text.includes('—') && text.includes('/s');
  }, null, { timeout: WAIT_MS });
  await page.waitForFunction(() => /totals: [\d,]+ events, [\d,]+ deliveries/.test(document.getElementById('rates')?.textContent ?? ''),
    null, { timeout: WAIT_MS });

  // Ann leaves: the next presence poll no longer lists her.
  ann.close();
  await page.locator('#online li', { hasText: 'ann-e2e' }).waitFor({ state: 'detached', timeout: WAIT_MS });

  expect(errors).toEqual([]);
  await page.close();
});

test('the live tail shows exactly what the filter matches, and a filter that does not parse is shown inline', { timeout: 60_000 }, async () => {
  const collection = uniqueCollection('products');
  const { page, errors } = await openDashboard(open.baseUrl);
  await page.locator('#tail-state[data-state="live"]').waitFor({ timeout: WAIT_MS });

  await applyFilter(page, 'price > 10');
  const publish = (recordId: string, price: number) =>
    publishRaw(open.baseUrl, { type: 'record.created', collection, record_id: recordId, data: { price, name: recordId } });
  await publish('cheap-1', 5);
  const dearSeq = await publish('dear-1', 50);
  await publish('sentinel-1', 99);

  await tailRow(page, 'dear-1').waitFor({ timeout: WAIT_MS });
  await tailRow(page, 'sentinel-1').waitFor({ timeout: WAIT_MS });
  // One stream delivers in seq order: the cheap event, published before the
  // sentinel, would be here by now had the filter let it through.
  expect(await tailRow(page, 'cheap-1').count()).toBe(0);

  // Each row carries its event's JSON.
  const event = JSON.parse((await tailRow(page, 'dear-1').locator('code').textContent()) ?? '') as Record<string, unknown>;
  expect(event).toMatchObject({ type: 'record.created', collection, record_id: 'dear-1', seq: dearSeq, data: { price: 50 } });
  expect(await page.locator('#filter-error').textContent()).toBe('');

  // A filter that does not parse: strom's 400 message, next to the filter box.
  await page.locator('#filter').fill('price >');
  await page.locator('#filter').press('Enter');
  const filterError = page.locator('#filter-error', { hasText: 'column 8' });
  await filterError.waitFor({ timeout: WAIT_MS });
  expect(await filterError.textContent()).toContain('invalid filter');
  await page.locator('#tail-state[data-state="error"]').waitFor({ timeout: WAIT_MS });

  // Fixed again: the error goes and the tail is live on the new filter.
  await applyFilter(page, 'price > 60');
  expect(await page.locator('#filter-error').textContent()).toBe('');
  await publish('mid-1', 40);
  await publish('dear-2', 70);
  await tailRow(page, 'dear-2').waitFor({ timeout: WAIT_MS });
  expect(await tailRow(page, 'mid-1').count()).toBe(0);

  expect(errors).toEqual([]);
  await page.close();
});

test('a server that wants the ops token says so inline, and the token field supplies it', { timeout: 60_000 }, async () => {
  const { page, errors } = await openDashboard(guarded.baseUrl);
  const refusal = page.locator('#stats-error', { hasText: 'ops token' });
  await refusal.waitFor({ timeout: WAIT_MS });
  expect(await refusal.textContent()).toContain('401');

  await page.locator('#token').fill(OPS_TOKEN);
  await page.locator('#token').press('Enter');
  await page.waitForFunction(() => document.getElementById('stats-error')?.textContent === ''
    && /connections/.test(document.getElementById('connections')?.textContent ?? ''), null, { timeout: WAIT_MS });

  // The token lives in sessionStorage: a reload keeps it, and the stats with it.
  await page.reload();
  expect(await page.locator('#token').inputValue()).toBe(OPS_TOKEN);
  await page.locator('#connections', { hasText: 'websocket' }).waitFor({ timeout: WAIT_MS });
  expect(await page.locator('#stats-error').textContent()).toBe('');

  expect(errors).toEqual([]);
  await page.close();
});
