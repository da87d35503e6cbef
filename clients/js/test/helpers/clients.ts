// WebSocket clients of a test file's strom, closed after each test together
// with whatever the test registered to undo (subscriptions, mounts).

import WebSocket from 'ws';

import { StromClient } from '../../src/index.js';

export interface TestClients {
  /** A new client of `url()`, quick to reconnect. */
  client(): StromClient;
  /** What to undo after the test, before the clients close. */
  readonly cleanups: Array<() => void>;
  /** Runs the cleanups, then closes every client (call it in `afterEach`). */
  closeAll(): void;
}

export function testClients(url: () => string): TestClients {
  const clients: StromClient[] = [];
  const cleanups: Array<() => void> = [];
  return {
    client() {
      const c = new StromClient({ url: url(), WebSocket, transport: 'websocket', backoff: { baseMs: 50, maxMs: 500 } });
      clients.push(c);
      return c;
    },
    cleanups,
    closeAll() {
      for (const cleanup of cleanups.splice(0)) cleanup();
      for (const c of clients.splice(0)) c.close();
    },
  };
}
