import type { StromEvent } from '../../src/index.js';
import { until } from './servers.js';

/** Records the events a subscription receives; `waitFor(n)` awaits the n-th. */
export function collector() {
  const events: StromEvent[] = [];
  return {
    events,
    onEvent: (event: StromEvent) => {
      events.push(event);
    },
    async waitFor(count: number, timeoutMs = 10_000): Promise<StromEvent[]> {
      await until(`${count} events (have ${events.length}: ${events.map((e) => e.seq).join(',')})`, () => events.length >= count, timeoutMs);
      return events;
    },
    ids(): unknown[] {
      return events.map((e) => e.data.id ?? e.record_id);
    },
  };
}
