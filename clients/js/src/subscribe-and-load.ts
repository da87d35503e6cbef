// The race-free initial load: subscribe first, hold the live events while
// the app loads its records, then apply the held events on top.
//
// Loading first and subscribing after loses whatever is published in between;
// subscribing and loading at the same time may apply an event to a list that
// the load then replaces with older rows. Holding the events until the load
// is done avoids both: every event after the subscription went live is
// applied, in order, after the rows it may postdate.

import type { StromClient } from './client.js';
import { type LiveQueryOptions, applyLiveEvents } from './live-query.js';
import type { Filter, JsonObject, ResetInfo, StromEvent } from './types.js';

export interface SubscribeAndLoadOptions<T extends JsonObject = JsonObject> extends LiveQueryOptions<T> {
  filter?: Filter | null;
  /** Only this record's events. */
  recordId?: string | null;
  /**
   * Reads the current records, e.g. from your API. It is called once the
   * subscription is live (never before: an event published between the read
   * and the subscription would be lost), and again after a reset or a
   * resubscription that could not resume.
   */
  load: () => Promise<readonly T[]> | readonly T[];
  /** The loaded records, with the events held during the load applied. */
  onLoaded: (records: T[]) => void;
  /** A live event after the load: apply it (e.g. with `applyLiveEvent`). */
  onEvent: (event: StromEvent<T>) => void;
  /** The server no longer had every event: `load` runs again after this. */
  onReset?: (info: ResetInfo) => void;
  /** A failed `load` (the held events then go to `onEvent`), or a refused subscription. */
  onError?: (error: Error) => void;
}

/**
 * Subscribes, then loads, then applies the events that arrived meanwhile:
 *
 * ```ts
 * let orders: Order[] = [];
 * const stop = subscribeAndLoad<Order>(client, 'orders', {
 *   filter: { status: 'open' },
 *   version: 'updated_at',
 *   load: () => fetch('/api/orders?status=open').then((r) => r.json()),
 *   onLoaded: (records) => { orders = records; render(); },
 *   onEvent: (event) => { orders = applyLiveEvent(orders, event, { version: 'updated_at' }); render(); },
 * });
 * ```
 *
 * Updates and deletes apply by record id (`key`); with `version`, a held
 * event never overwrites a newer loaded row. Returns the function that stops.
 */
export function subscribeAndLoad<T extends JsonObject = JsonObject>(
  client: StromClient,
  collection: string,
  options: SubscribeAndLoadOptions<T>,
): () => void {
  if (typeof options?.load !== 'function') throw new TypeError('subscribeAndLoad needs a `load` function');
  const applyOptions: LiveQueryOptions<T> = {
    ...(options.key ? { key: options.key } : {}),
    ...(options.sort ? { sort: options.sort } : {}),
    ...(options.version ? { version: options.version } : {}),
  };
  // Events held while a load runs; null once the records are out and events flow.
  let held: StromEvent<T>[] | null = [];
  let attempt = 0;
  let stopped = false;

  const report = (error: unknown) => {
    const failure = error instanceof Error ? error : new Error(String(error));
    if (options.onError) options.onError(failure);
    else console.error('[strom-client] load failed', failure);
  };

  const load = () => {
    const current = ++attempt;
    // Events before this point are already in what this load reads.
    held = [];
    Promise.resolve()
      .then(() => options.load())
      .then(
        (rows) => {
          if (stopped || current !== attempt || !held) return;
          const records = applyLiveEvents(rows.slice(), held, applyOptions);
          held = null;
          options.onLoaded(records);
        },
        (error: unknown) => {
          if (stopped || current !== attempt || !held) return;
          const pending = held;
          held = null;
          report(error);
          for (const event of pending) options.onEvent(event);
        },
      );
  };

  const unsubscribe = client.subscribe<T>(collection, {
    filter: options.filter ?? null,
    recordId: options.recordId ?? null,
    onEvent: (event) => {
      if (held) held.push(event);
      else options.onEvent(event);
    },
    // A resumed subscription missed nothing; any other (re)start needs a load.
    onSubscribed: (info) => {
      if (!info.resumed) load();
    },
    onReset: (info) => {
      options.onReset?.(info);
      load();
    },
    ...(options.onError ? { onError: options.onError } : {}),
  });

  return () => {
    stopped = true;
    unsubscribe();
  };
}
