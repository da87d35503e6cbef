// Vue 3 composables for strom-client (`strom-client/vue`), with the meaning
// of the React hooks. Vue is an optional peer dependency: only this entry
// point imports it. Call them in a component's setup (or any effect scope):
// they stop when it is disposed.

import {
  type App, type InjectionKey, type MaybeRefOrGetter, type Ref, computed, hasInjectionContext, inject, onScopeDispose,
  ref, shallowRef, toValue, watch,
} from 'vue';

import type { StromClient } from './client.js';
import { stableStringify } from './filter.js';
import { type UseLiveQueryOptions, applyLiveEvent } from './live-query.js';
import { followPresence } from './presence.js';
import { subscribeAndLoad } from './subscribe-and-load.js';
import type { ConnectionState, Filter, JsonObject, PresenceUser, ResetInfo, StromEvent } from './types.js';

/** The key the client is provided under (`app.provide(STROM_CLIENT, client)` works too). */
export const STROM_CLIENT: InjectionKey<StromClient> = Symbol('strom-client');

/**
 * Shares one client with every composable of the app, so they can be called
 * without one: `app.use(realtimePlugin(client))`.
 */
export function realtimePlugin(client: StromClient): { install(app: App): void } {
  return { install: (app) => void app.provide(STROM_CLIENT, client) };
}

function isClient(value: unknown): value is StromClient {
  return typeof value === 'object' && value !== null && typeof (value as StromClient).subscribe === 'function';
}

/** The client passed in, else the provided one. */
function resolveClient(client: StromClient | null | undefined, name: string): StromClient {
  const resolved = client ?? (hasInjectionContext() ? inject(STROM_CLIENT, null) : null);
  if (!resolved) throw new Error(`${name} needs a client: pass one or install realtimePlugin(client)`);
  return resolved;
}

/** The connection state, as a read-only ref. (Composables return computed refs: read-only, the values not wrapped in proxies.) */
export function useRealtime(client?: StromClient | null): Readonly<Ref<ConnectionState>> {
  const resolved = resolveClient(client, 'useRealtime');
  const state = ref<ConnectionState>(resolved.state);
  onScopeDispose(resolved.onStateChange((next) => { state.value = next; }));
  return computed(() => state.value);
}

export type { UseLiveQueryOptions } from './live-query.js';

/**
 * A list of records kept in sync with a collection (see the React
 * `useLiveQuery`), as a read-only ref. `collection`, `filter` and
 * `initialRecords` may be refs or getters: a new collection or filter
 * resubscribes, new initial records replace the list.
 */
export function useLiveQuery<T extends JsonObject = JsonObject>(
  collection: MaybeRefOrGetter<string>,
  filter?: MaybeRefOrGetter<Filter | null | undefined>,
  initialRecords?: MaybeRefOrGetter<readonly T[]>,
  options?: UseLiveQueryOptions<T>,
): Readonly<Ref<T[]>>;
export function useLiveQuery<T extends JsonObject = JsonObject>(
  client: StromClient | null | undefined,
  collection: MaybeRefOrGetter<string>,
  filter?: MaybeRefOrGetter<Filter | null | undefined>,
  initialRecords?: MaybeRefOrGetter<readonly T[]>,
  options?: UseLiveQueryOptions<T>,
): Readonly<Ref<T[]>>;
export function useLiveQuery<T extends JsonObject = JsonObject>(...args: unknown[]): Readonly<Ref<T[]>> {
  const withClient = args[0] == null || isClient(args[0]);
  const [clientArg, collection, filter, initialRecords, optionsArg] = (withClient ? args : [null, ...args]) as [
    StromClient | null | undefined,
    MaybeRefOrGetter<string>,
    MaybeRefOrGetter<Filter | null | undefined>,
    MaybeRefOrGetter<readonly T[]> | undefined,
    UseLiveQueryOptions<T> | undefined,
  ];
  const client = resolveClient(clientArg, 'useLiveQuery');
  const options = optionsArg ?? {};
  const initial = () => (toValue(initialRecords) ?? []).slice() as T[];
  const records = shallowRef<T[]>(initial());
  const rules = {
    key: options.key ?? 'id',
    ...(options.sort ? { sort: options.sort } : {}),
    ...(options.version ? { version: options.version } : {}),
  };

  watch(() => toValue(initialRecords), () => { records.value = initial(); });

  const filterKey = (value: Filter | null | undefined) => (value == null ? '' : typeof value === 'string' ? value : stableStringify(value));
  let first = true;
  watch(
    () => `${toValue(collection)}\u0000${filterKey(toValue(filter))}`,
    (_key, _previous, onCleanup) => {
      if (!first) records.value = initial();
      first = false;
      const name = toValue(collection);
      const current = toValue(filter);
      // A plain copy: the client keeps the filter, and it may be reactive.
      const plainFilter = current == null || typeof current === 'string' ? current ?? null : JSON.parse(stableStringify(current)) as JsonObject;
      const onEvent = (event: StromEvent<T>) => {
        records.value = applyLiveEvent(records.value, event, rules);
        options.onEvent?.(event);
      };
      const common = {
        filter: plainFilter,
        recordId: options.recordId ?? null,
        onEvent,
        onReset: (info: ResetInfo) => options.onReset?.(info),
        onError: (error: Error) => options.onError?.(error),
      };
      const { load } = options;
      onCleanup(load
        ? subscribeAndLoad<T>(client, name, { ...common, ...rules, load, onLoaded: (loaded) => { records.value = loaded; } })
        : client.subscribe<T>(name, { ...common, since: options.since ?? null }));
    },
    { immediate: true },
  );

  return computed(() => records.value);
}

/**
 * Who is online (see the React `usePresence`), as a read-only ref.
 * `channel` may be a ref or getter: a new channel follows that one.
 */
export function usePresence(channel: MaybeRefOrGetter<string | null>): Readonly<Ref<PresenceUser[]>>;
export function usePresence(client: StromClient | null | undefined, channel: MaybeRefOrGetter<string | null>): Readonly<Ref<PresenceUser[]>>;
export function usePresence(...args: unknown[]): Readonly<Ref<PresenceUser[]>> {
  const withClient = args.length >= 2 || isClient(args[0]);
  const client = resolveClient(withClient ? (args[0] as StromClient | null | undefined) : null, 'usePresence');
  const channel = (withClient ? args[1] : args[0]) as MaybeRefOrGetter<string | null>;
  const users = shallowRef<PresenceUser[]>([]);
  watch(
    () => toValue(channel) ?? null,
    (name, _previous, onCleanup) => {
      onCleanup(followPresence(client, name, (next) => { users.value = next; }));
    },
    { immediate: true },
  );
  return computed(() => users.value);
}

export { applyLiveEvent };
