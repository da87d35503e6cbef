// A WebSocket stand-in for unit tests: records what the client sends and
// lets the test play the server.

import type { WebSocketLike } from '../../src/index.js';

export class FakeSocket implements WebSocketLike {
  static instances: FakeSocket[] = [];
  static reset(): void {
    FakeSocket.instances = [];
  }
  static get last(): FakeSocket {
    const socket = FakeSocket.instances[FakeSocket.instances.length - 1];
    if (!socket) throw new Error('no socket was opened');
    return socket;
  }

  readyState = 0;
  readonly url: URL;
  readonly sent: Record<string, unknown>[] = [];
  closedByClient: { code?: number; reason?: string } | null = null;
  onopen: ((event: unknown) => void) | null = null;
  onmessage: ((event: { data: unknown }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;

  constructor(url: string) {
    this.url = new URL(url);
    FakeSocket.instances.push(this);
  }

  send(data: string): void {
    if (this.readyState !== 1) throw new Error('not open');
    this.sent.push(JSON.parse(data) as Record<string, unknown>);
  }

  close(code?: number, reason?: string): void {
    this.closedByClient = { code, reason };
    this.readyState = 3;
  }

  // --- the server's side ---

  /** Opens and greets, as strom does on connect. */
  accept(): void {
    this.readyState = 1;
    this.onopen?.({});
    this.message('connected', { connection_id: 'c1', server_time: new Date().toISOString() });
  }

  message(type: string, data: unknown): void {
    this.onmessage?.({ data: JSON.stringify({ type, data }) });
  }

  event(event: Record<string, unknown>): void {
    this.message('event', {
      type: 'record.created',
      record_id: String((event.data as Record<string, unknown> | undefined)?.id ?? ''),
      old_data: null,
      timestamp: '2025-01-01T00:00:00Z',
      ...event,
    });
  }

  /** Drops the connection from the server's side. */
  drop(code = 1006, reason = ''): void {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  /** The actions sent so far with this name. */
  actions(name: string): Record<string, unknown>[] {
    return this.sent.filter((a) => a.action === name);
  }

  /** Answers every `subscribe` not yet answered, in order. */
  confirmSubscriptions(headSeq = 0): void {
    for (const action of this.actions('subscribe')) {
      if ((action as { answered?: boolean }).answered) continue;
      Object.defineProperty(action, 'answered', { value: true, enumerable: false });
      this.message('subscribed', {
        collection: action.collection,
        filter: action.filter ?? null,
        subscription_id: ++this.nextId,
        head_seq: headSeq,
      });
    }
  }

  private nextId = 0;
}
