// TanStack Query integration (`strom-client/tanstack`): keeps the data a
// QueryClient has cached in step with strom events. It only uses the
// QueryClient's public API and imports nothing but types from
// @tanstack/query-core, so it works with the QueryClient of react-query,
// vue-query, solid-query and the others alike.

import type { InvalidateQueryFilters, Query, QueryClient, QueryKey } from '@tanstack/query-core';

import type { StromClient } from './client.js';
import { eventKey, isNewerThanEvent, recordKey } from './live-query.js';
import type { Filter, JsonObject, StromEvent } from './types.js';

/**
 * How a created or updated record lands in a cached list (deletes and
 * `left_filter` always remove it):
 *
 * | updateType | record in the list | record not in the list |
 * | --- | --- | --- |
 * | `merge` (default) | shallow-merged into it | added at the end |
 * | `replace` | replaced | added at the end |
 * | `append` | replaced | added at the end if created; an update is ignored |
 * | `remove` | removed | nothing |
 *
 * `append` suits a page of recent items (an edit of an older one does not
 * pull it in); `remove` a list that events take records out of (e.g. a
 * strategy on `status = "done"` feeding a list of open tasks).
 */
export type UpdateType = 'merge' | 'replace' | 'append' | 'remove';

/**
 * Which cached queries one collection's events update, and how. `T` is the
 * cached record type (what `transform` returns).
 */
export interface CacheStrategy<T extends object = JsonObject> {
  /** The strom collection (or channel) to subscribe to. */
  collection: string;
  /**
   * The queries to update: a key (matched as a prefix, like TanStack's own
   * filters, unless `exact`), or a function of the event returning one, or
   * null to skip the event. Lists and single records under the key are both
   * kept current: a list by record id, a record when its id is the event's.
   */
  queryKey: QueryKey | ((event: StromEvent) => QueryKey | null | undefined);
  /** Match `queryKey` exactly instead of as a prefix. */
  exact?: boolean;
  /** See `UpdateType` (default `merge`). */
  updateType?: UpdateType;
  /** Turns an event's data into the cached shape (e.g. renames fields). */
  transform?(data: JsonObject, event: StromEvent): T;
  /**
   * The subscription's filter, applied by the server: only matching records
   * reach the cache, and a record that stops matching (`left_filter`) leaves
   * the cached lists.
   */
  filter?: Filter | null;
  /** The field identifying a record in the cached data (default `'id'`). */
  key?: string;
  /** A version or `updated_at` field: an event never overwrites a newer cached record. */
  version?: string;
  /** Keeps cached lists sorted after each change. */
  sort?(a: T, b: T): number;
  /**
   * The queries to refetch when events may have been missed: when the
   * subscription goes live without resuming (a query fetched before may lack
   * an event published in between) and after a reset. Default: `queryKey`
   * when it is an array; with a function `queryKey`, every query.
   */
  invalidateKey?: QueryKey;
}

export interface SyncQueryCacheOptions {
  /** A subscription the server refused (e.g. a bad filter). */
  onError?: (error: Error) => void;
}

/**
 * What one event does to one query's cached data: `{ data }` to write,
 * `{ invalidate: true }` when a single cached record was removed (the query
 * refetches it), or null for no change.
 */
export type CacheUpdate = { data: unknown } | { invalidate: true } | null;

type Rule = Pick<CacheStrategy<object>, 'updateType' | 'transform' | 'key' | 'version' | 'sort'>;

/**
 * The pure part: the change `event` makes to a query's `data` under `rule`.
 * Data that is neither a list nor the event's record is left alone, and so
 * is a query without data yet.
 */
export function cacheUpdate(data: unknown, event: StromEvent, rule: Rule): CacheUpdate {
  if (data === undefined || data === null || typeof data !== 'object') return null;
  const upsert = (event.type === 'record.created' || event.type === 'record.updated') && event.left_filter !== true;
  const gone = event.type === 'record.deleted' || event.left_filter === true;
  if (!upsert && !gone) return null;
  const key = rule.key ?? 'id';
  const mode = rule.updateType ?? 'merge';
  const record = upsert && rule.transform ? rule.transform(event.data, event) : event.data;
  const id = recordKey(record, key) ?? eventKey(event, key);
  if (id === null) return null;
  const stale = (current: unknown) => !!rule.version && isNewerThanEvent(current, event, rule.version, record);

  if (!Array.isArray(data)) {
    // A single record: only the one this event is about.
    if (recordKey(data, key) !== id || stale(data)) return null;
    if (gone || mode === 'remove') return { invalidate: true };
    if (mode === 'merge') return { data: { ...data, ...record } };
    return { data: record };
  }

  const index = data.findIndex((item) => recordKey(item, key) === id);
  if (index !== -1 && stale(data[index])) return null;
  let next: unknown[];
  if (gone || mode === 'remove') {
    if (index === -1) return null;
    next = data.filter((_, i) => i !== index);
  } else if (index !== -1) {
    next = data.slice();
    next[index] = mode === 'merge' ? { ...(data[index] as object), ...record } : record;
  } else {
    if (mode === 'append' && event.type !== 'record.created') return null;
    next = [...data, record];
  }
  if (rule.sort) next.sort(rule.sort as (a: unknown, b: unknown) => number);
  return { data: next };
}

interface Pending {
  event: StromEvent;
  strategy: CacheStrategy<object>;
}

/**
 * Keeps `queryClient`'s cached data in step with strom: each strategy
 * subscribes to its collection and applies every event to the cached queries
 * under its `queryKey`. Only queries already in the cache are touched.
 *
 * An event that arrives while a query is fetching is applied again once the
 * fetch has landed, so a response read before the event cannot undo it. When
 * events may have been missed (a reset, or a subscription that could not
 * resume), the strategy's queries are invalidated and refetch.
 *
 * Returns the function that stops (unsubscribes and stops listening).
 */
export function syncQueryCache(
  client: StromClient,
  queryClient: QueryClient,
  strategies: readonly CacheStrategy<object>[],
  options: SyncQueryCacheOptions = {},
): () => void {
  const cache = queryClient.getQueryCache();
  // Events applied while the query was fetching: re-applied on its result.
  const pending = new WeakMap<Query, Pending[]>();

  const write = (query: Query, changes: readonly Pending[]) => {
    let data: unknown = query.state.data;
    let invalidate = false;
    for (const { event, strategy } of changes) {
      const change = cacheUpdate(data, event, strategy);
      if (change && 'invalidate' in change) invalidate = true;
      else if (change) data = change.data;
    }
    // Writing unchanged data would still mark the query fresh: skip it.
    if (data !== query.state.data) queryClient.setQueryData(query.queryKey, data);
    if (invalidate) void queryClient.invalidateQueries({ queryKey: query.queryKey, exact: true });
  };

  const apply = (strategy: CacheStrategy<object>, event: StromEvent) => {
    const queryKey = typeof strategy.queryKey === 'function' ? strategy.queryKey(event) : strategy.queryKey;
    if (!queryKey) return;
    for (const query of cache.findAll({ queryKey, exact: strategy.exact ?? false })) {
      if (query.state.fetchStatus === 'fetching') {
        const list = pending.get(query) ?? [];
        list.push({ event, strategy });
        pending.set(query, list);
      }
      write(query, [{ event, strategy }]);
    }
  };

  const invalidate = (strategy: CacheStrategy<object>) => {
    let filters: InvalidateQueryFilters = {}; // a function queryKey without invalidateKey: every query
    if (strategy.invalidateKey) filters = { queryKey: strategy.invalidateKey };
    else if (typeof strategy.queryKey !== 'function') filters = { queryKey: strategy.queryKey, exact: strategy.exact ?? false };
    void queryClient.invalidateQueries(filters);
  };

  const stopListening = cache.subscribe((notice) => {
    if (notice.type !== 'updated') return;
    const list = pending.get(notice.query);
    if (!list) return;
    const { action } = notice;
    if (action.type === 'success' && !action.manual) {
      pending.delete(notice.query);
      write(notice.query, list);
    } else if (notice.query.state.fetchStatus !== 'fetching') {
      pending.delete(notice.query); // failed or cancelled: its data is the one events were applied to
    }
  });

  const unsubscribes = strategies.map((strategy) => client.subscribe(strategy.collection, {
    filter: strategy.filter ?? null,
    onEvent: (event) => apply(strategy, event),
    onSubscribed: (info) => {
      if (!info.resumed) invalidate(strategy);
    },
    onReset: () => invalidate(strategy),
    ...(options.onError ? { onError: options.onError } : {}),
  }));

  return () => {
    for (const unsubscribe of unsubscribes) unsubscribe();
    stopListening();
  };
}
