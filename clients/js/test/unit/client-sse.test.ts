// StromClient's SSE transport against a fake fetch whose response bodies the
// test writes: request shape, parsing across chunks, resume and errors.

import { afterEach, beforeEach, expect, test, vi } from 'vitest';

import { StromClient, StromError, type StromEvent } from '../../src/index.js';

interface FakeRequest {
  url: URL;
  headers: Record<string, string>;
  /** Writes raw SSE text to the response body. */
  write(text: string): void;
  end(): void;
  aborted: () => boolean;
}

let requests: FakeRequest[] = [];
let nextStatus: { status: number; body: string } | null = null;

const fakeFetch = (async (input: string | URL, init: RequestInit = {}) => {
  const url = new URL(String(input));
  const headers = init.headers as Record<string, string>;
  if (nextStatus) {
    const { status, body } = nextStatus;
    nextStatus = null;
    return new Response(body, { status, headers: { 'content-type': 'application/json' } });
  }
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  const body = new ReadableStream<Uint8Array>({ start(c) { controller = c; } });
  const encoder = new TextEncoder();
  let open = true;
  init.signal?.addEventListener('abort', () => {
    if (open) controller.error(Object.assign(new Error('aborted'), { name: 'AbortError' }));
    open = false;
  });
  requests.push({
    url,
    headers,
    write: (text) => controller.enqueue(encoder.encode(text)),
    end: () => { open = false; controller.close(); },
    aborted: () => init.signal?.aborted === true,
  });
  return new Response(body, { status: 200, headers: { 'content-type': 'text/event-stream' } });
}) as typeof fetch;

function sseClient(options: Partial<ConstructorParameters<typeof StromClient>[0]> = {}) {
  return new StromClient({ url: 'http://strom.test', transport: 'sse', fetch: fakeFetch, backoff: { baseMs: 1_000, maxMs: 4_000 }, ...options });
}

function frame(event: string, data: unknown, id?: number): string {
  return `${id !== undefined ? `id: ${id}\n` : ''}event: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
}

function recordEvent(seq: number, id: string, extra: Record<string, unknown> = {}) {
  return { type: 'record.created', collection: 'posts', record_id: id, data: { id, ...extra }, old_data: null, timestamp: '2025-01-01T00:00:00Z', seq };
}

const flush = () => vi.advanceTimersByTimeAsync(0);

beforeEach(() => {
  requests = [];
  nextStatus = null;
  vi.useFakeTimers();
  vi.spyOn(Math, 'random').mockReturnValue(0.5);
});

afterEach(() => {
  vi.useRealTimers();
  vi.restoreAllMocks();
});

test('one stream per subscription, with the text filter, identity and token', async () => {
  const client = sseClient({ token: 'tok', userId: 'u1', userName: 'Ann' });
  client.subscribe('posts', { filter: { published: true }, onEvent: () => {} });
  client.subscribe('*', { filter: 'price > 1', onEvent: () => {} });
  await flush();
  expect(requests).toHaveLength(2);
  const [posts, all] = requests as [FakeRequest, FakeRequest];
  expect(posts.url.pathname).toBe('/api/v1/realtime/posts');
  expect(Object.fromEntries(posts.url.searchParams)).toEqual({ query: 'published = true', user_id: 'u1', user_name: 'Ann' });
  expect(posts.headers).toMatchObject({ accept: 'text/event-stream', authorization: 'Bearer tok' });
  expect(all.url.pathname).toBe('/api/v1/realtime');
  expect(all.url.searchParams.get('query')).toBe('price > 1');
});

test('events split over chunks arrive; a record subscription is narrowed on the client', async () => {
  const client = sseClient();
  const got: StromEvent[] = [];
  const one: StromEvent[] = [];
  client.subscribe('posts', { onEvent: (e) => got.push(e) });
  client.subscribe('posts', { recordId: 'b', onEvent: (e) => one.push(e) });
  await flush();
  expect(client.state).toBe('connecting');
  const text = frame('connected', { connection_id: 'x' }) + ': keep-alive\n\n'
    + frame('record.created', recordEvent(1, 'a'), 1) + frame('record.created', recordEvent(2, 'b'), 2);
  for (const request of requests) {
    for (let i = 0; i < text.length; i += 5) request.write(text.slice(i, i + 5));
  }
  await flush();
  expect(client.state).toBe('connected');
  expect(got.map((e) => e.record_id)).toEqual(['a', 'b']);
  expect(one.map((e) => e.record_id)).toEqual(['b']);
});

test('a dropped stream reconnects after backoff and resumes with since', async () => {
  const client = sseClient();
  const got: number[] = [];
  const errors: Error[] = [];
  client.onError((e) => errors.push(e));
  client.subscribe('posts', { onEvent: (e) => got.push(e.seq) });
  await flush();
  const first = requests[0]!;
  first.write(frame('connected', {}) + frame('record.created', recordEvent(7, 'a'), 7) + frame('user.joined', { ...recordEvent(0, 'u'), type: 'user.joined' }));
  await flush();
  first.write(frame('error', { code: 'unavailable', message: 'the server is shutting down' }));
  first.end();
  await flush();
  expect(client.state).toBe('reconnecting');
  expect(errors[0]).toBeInstanceOf(StromError);
  expect(errors[0]).toMatchObject({ code: 'unavailable' });
  await vi.advanceTimersByTimeAsync(499);
  expect(requests).toHaveLength(1);
  await vi.advanceTimersByTimeAsync(1);
  expect(requests).toHaveLength(2);
  const second = requests[1]!;
  expect(second.url.searchParams.get('since')).toBe('7');
  second.write(frame('connected', {}) + frame('record.created', recordEvent(7, 'a'), 7) + frame('record.created', recordEvent(9, 'b'), 9));
  await flush();
  expect(got).toEqual([7, 0, 9]);
  expect(client.state).toBe('connected');
});

test('a stream ending with stream_error, repeated as the deprecated error, reports it once', async () => {
  const client = sseClient();
  const errors: Error[] = [];
  client.onError((e) => errors.push(e));
  client.subscribe('posts', { onEvent: () => {} });
  await flush();
  const body = { code: 'resource_exhausted', message: 'subscriber too slow' };
  requests[0]!.write(frame('connected', {}) + frame('stream_error', body) + frame('error', body));
  requests[0]!.end();
  await flush();
  expect(client.state).toBe('reconnecting');
  expect(errors).toHaveLength(1);
  expect(errors[0]).toMatchObject({ code: 'resource_exhausted', message: 'subscriber too slow' });
});

test('reset is passed on', async () => {
  const client = sseClient();
  const resets: unknown[] = [];
  client.subscribe('posts', { since: 3, onEvent: () => {}, onReset: (info) => resets.push(info) });
  await flush();
  expect(requests[0]!.url.searchParams.get('since')).toBe('3');
  requests[0]!.write(frame('connected', {}) + frame('reset', { since: 3, first_available_seq: 100 }));
  await flush();
  expect(resets).toEqual([{ collection: 'posts', since: 3, firstAvailableSeq: 100 }]);
});

test('HTTP 400 is permanent; 401 is retried', async () => {
  const client = sseClient();
  const errors: StromError[] = [];
  nextStatus = { status: 400, body: JSON.stringify({ error: { code: 'invalid_argument', message: 'invalid filter: at column 8' } }) };
  client.subscribe('posts', { filter: 'price >', onEvent: () => {}, onError: (e) => errors.push(e as StromError) });
  await flush();
  expect(errors).toHaveLength(1);
  expect(errors[0]).toMatchObject({ code: 'invalid_argument', status: 400, message: 'invalid filter: at column 8' });
  await vi.advanceTimersByTimeAsync(10_000);
  expect(requests).toHaveLength(0);

  nextStatus = { status: 401, body: JSON.stringify({ error: { code: 'unauthenticated', message: 'token expired' } }) };
  client.subscribe('secret', { onEvent: () => {}, onError: (e) => errors.push(e as StromError) });
  await flush();
  expect(errors[1]).toMatchObject({ code: 'unauthenticated', status: 401 });
  await vi.advanceTimersByTimeAsync(500);
  expect(requests).toHaveLength(1);
  expect(requests[0]!.url.pathname).toBe('/api/v1/realtime/secret');
});

test('setToken reopens the streams with the new token, resuming', async () => {
  const client = sseClient({ token: 'old' });
  client.subscribe('posts', { onEvent: () => {} });
  await flush();
  requests[0]!.write(frame('connected', {}) + frame('record.created', recordEvent(4, 'a'), 4));
  await flush();
  await client.setToken('new');
  await vi.advanceTimersByTimeAsync(500);
  expect(requests[0]!.aborted()).toBe(true);
  expect(requests).toHaveLength(2);
  expect(requests[1]!.headers.authorization).toBe('Bearer new');
  expect(requests[1]!.url.searchParams.get('since')).toBe('4');
});

test('unsubscribe and close abort the streams', async () => {
  const client = sseClient();
  const stop = client.subscribe('posts', { onEvent: () => {} });
  client.subscribe('other', { onEvent: () => {} });
  await flush();
  stop();
  expect(requests[0]!.aborted()).toBe(true);
  expect(requests[1]!.aborted()).toBe(false);
  client.close();
  expect(requests[1]!.aborted()).toBe(true);
  expect(client.state).toBe('disconnected');
  await vi.advanceTimersByTimeAsync(60_000);
  expect(requests).toHaveLength(2);
});
