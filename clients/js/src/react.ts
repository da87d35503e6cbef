// React hooks for strom-client. React is an optional peer dependency: only
// this entry point (`strom-client/react`) imports it.

// The default import works both in bundlers and in Node's ESM loader (React
// is published as CommonJS).
import React from 'react';
import type { ReactElement, ReactNode } from 'react';
import type { QueryClient } from '@tanstack/query-core';

import { StromClient } from './client.js';
import { stableStringify } from './filter.js';
import { type UseLiveQueryOptions, applyLiveEvent } from './live-query.js';
import { followPresence } from './presence.js';
import { subscribeAndLoad } from './subscribe-and-load.js';
import { type CacheStrategy, syncQueryCache } from './tanstack.js';
import type {
  ConnectionState, Filter, JsonObject, PresenceUser, ResetInfo, StromClientOptions, StromEvent, SubscribeOptions,
} from './types.js';

const { createContext, createElement, useCallback, useContext, useEffect, useMemo, useRef, useState, useSyncExternalStore } = React;

// --- the provider -------------------------------------------------------------

/** What `useRealtimeContext()` returns. */
export interface RealtimeContextValue {
  /** The client shared by the tree. */
  client: StromClient;
  connectionState: ConnectionState;
  isConnected: boolean;
  /** False after `disconnect()` or `enabled={false}`: the client stays closed. */
  enabled: boolean;
  /** Switches realtime off (closes the connection) and on again (reconnects and resumes). */
  setEnabled: (enabled: boolean) => void;
  /** `setEnabled(true)`, and connects now if the client was closed. */
  connect: () => void;
  /** `setEnabled(false)`: closes the connection; subscriptions stay and resume on `connect()`. */
  disconnect: () => void;
  /** `client.subscribe`, with a plain callback as a shorthand for `{ onEvent }`. */
  subscribe: <T extends JsonObject = JsonObject>(
    collection: string,
    handler: ((event: StromEvent<T>) => void) | SubscribeOptions<T>,
  ) => () => void;
  /** Sends a message on a channel (`client.broadcast`); resolves to its seq. The functions are stable per client. */
  send: (channel: string, data?: JsonObject) => Promise<number>;
}

const RealtimeContext = createContext<RealtimeContextValue | null>(null);

export interface RealtimeProviderProps {
  /** The client to share. Its owner closes it; create it with `autoConnect: false` if `enabled` may start false. */
  client?: StromClient;
  /** Or options: the provider creates its client (once, at mount) and closes it at unmount. */
  options?: StromClientOptions;
  /** Realtime on or off (default true). Changing it closes or reconnects the client. */
  enabled?: boolean;
  /** With `cacheStrategies`: keep this QueryClient's cache in step (see `strom-client/tanstack`). */
  queryClient?: QueryClient;
  /** Read when the provider mounts and when `client` or `queryClient` changes. */
  cacheStrategies?: readonly CacheStrategy<object>[];
  children?: ReactNode;
}

/**
 * Shares one client with every hook below it (`useRealtimeContext`, and the
 * hooks called without a client), switches it on and off with `enabled`,
 * and optionally syncs a TanStack QueryClient with `cacheStrategies`.
 */
export function RealtimeProvider(props: RealtimeProviderProps): ReactElement {
  const [owned] = useState(() => (props.client || !props.options ? null : new StromClient({ ...props.options, autoConnect: false })));
  const client = props.client ?? owned;
  if (!client) throw new TypeError('RealtimeProvider needs a `client` or `options`');

  // `enabled` is state that follows the prop when the prop changes.
  const [enabled, setEnabled] = useState(props.enabled ?? true);
  const [enabledProp, setEnabledProp] = useState(props.enabled);
  if (props.enabled !== enabledProp) {
    setEnabledProp(props.enabled);
    setEnabled(props.enabled ?? true);
  }

  useEffect(() => {
    if (enabled) client.connect();
    else client.close();
  }, [client, enabled]);
  useEffect(() => (owned ? () => owned.close() : undefined), [owned]);

  const strategies = useRef(props.cacheStrategies);
  strategies.current = props.cacheStrategies;
  const { queryClient } = props;
  useEffect(() => {
    if (!queryClient || !strategies.current?.length) return undefined;
    return syncQueryCache(client, queryClient, strategies.current);
  }, [client, queryClient]);

  const connectionState = useRealtime(client);
  // The functions depend on the client only, so effects may list them as
  // dependencies without resubscribing at every state change.
  const actions = useMemo(() => ({
    connect: () => {
      setEnabled(true);
      client.connect();
    },
    disconnect: () => {
      setEnabled(false);
      client.close();
    },
    subscribe: <T extends JsonObject = JsonObject>(collection: string, handler: ((event: StromEvent<T>) => void) | SubscribeOptions<T>) =>
      client.subscribe<T>(collection, typeof handler === 'function' ? { onEvent: handler } : handler),
    send: (channel: string, data: JsonObject = {}) => client.broadcast(channel, data),
  }), [client]);
  const value = useMemo<RealtimeContextValue>(() => ({
    client,
    connectionState,
    isConnected: connectionState === 'connected',
    enabled,
    setEnabled,
    ...actions,
  }), [client, connectionState, enabled, actions]);

  return createElement(RealtimeContext.Provider, { value }, props.children);
}

/** The provider's client, state and controls; throws outside a `RealtimeProvider`. */
export function useRealtimeContext(): RealtimeContextValue {
  const value = useContext(RealtimeContext);
  if (!value) throw new Error('useRealtimeContext must be used inside a <RealtimeProvider>');
  return value;
}

function isClient(value: unknown): value is StromClient {
  return typeof value === 'object' && value !== null && typeof (value as StromClient).subscribe === 'function';
}

/** The client passed in, else the provider's. */
function useClient(client: StromClient | null | undefined, hook: string): StromClient {
  const context = useContext(RealtimeContext);
  const resolved = client ?? context?.client;
  if (!resolved) throw new Error(`${hook} needs a client: pass one or render it inside a <RealtimeProvider>`);
  return resolved;
}

// --- hooks ----------------------------------------------------------------------

/** The connection state (of `client`, or the provider's); re-renders when it changes. */
export function useRealtime(client?: StromClient | null): ConnectionState {
  const resolved = useClient(client, 'useRealtime');
  const subscribe = useCallback((notify: () => void) => resolved.onStateChange(notify), [resolved]);
  const read = () => resolved.state;
  return useSyncExternalStore(subscribe, read, read);
}

export type { UseLiveQueryOptions } from './live-query.js';

/**
 * Keeps a list of records in sync with a collection: created records are
 * added, updated ones replaced (or added when they enter the filter), deleted
 * ones and those that leave the filter removed.
 *
 * `initialRecords` is the list to start from (e.g. loaded over your API). It
 * is compared by reference: the list is reset to it when it changes, so pass
 * a stable array (state, memo or a constant), not a new literal each render
 * (an empty array literal is fine). `filter` may be a new object each render:
 * it is compared by value. With `options.load` the hook loads the records
 * itself, without a race against live events.
 *
 * The client may be left out inside a `RealtimeProvider`:
 * `useLiveQuery('posts', filter, [], options)`.
 */
export function useLiveQuery<T extends JsonObject = JsonObject>(
  collection: string,
  filter?: Filter | null,
  initialRecords?: readonly T[],
  options?: UseLiveQueryOptions<T>,
): T[];
export function useLiveQuery<T extends JsonObject = JsonObject>(
  client: StromClient | null | undefined,
  collection: string,
  filter: Filter | null | undefined,
  initialRecords: readonly T[],
  options?: UseLiveQueryOptions<T>,
): T[];
export function useLiveQuery<T extends JsonObject = JsonObject>(...args: unknown[]): T[] {
  const withClient = typeof args[0] !== 'string';
  const [clientArg, collection, filter, initialArg, optionsArg] = (withClient ? args : [null, ...args]) as [
    StromClient | null | undefined, string, Filter | null | undefined, readonly T[] | undefined, UseLiveQueryOptions<T> | undefined,
  ];
  const client = useClient(clientArg, 'useLiveQuery');
  const options = optionsArg ?? {};
  const initialRecords = initialArg ?? EMPTY;

  const filterKey = filter == null ? '' : typeof filter === 'string' ? filter : stableStringify(filter);
  const recordId = options.recordId ?? null;
  const since = options.since ?? null;
  const withLoad = typeof options.load === 'function';
  const queryKey = `${collection}\u0000${filterKey}\u0000${recordId ?? ''}`;

  const [records, setRecords] = useState<T[]>(() => initialRecords.slice() as T[]);
  // Reset the list when the initial records or the query change (during
  // render, React's pattern for state derived from props).
  const [source, setSource] = useState({ initialRecords, queryKey });
  const sameInitial = source.initialRecords === initialRecords
    || (source.initialRecords.length === 0 && initialRecords.length === 0);
  if (!sameInitial || source.queryKey !== queryKey) {
    setSource({ initialRecords, queryKey });
    setRecords(initialRecords.slice() as T[]);
  }

  const latest = useRef(options);
  latest.current = options;
  const filterRef = useRef(filter);
  filterRef.current = filter;

  useEffect(() => {
    const current = latest.current;
    const rules = () => ({
      key: latest.current.key ?? 'id',
      ...(latest.current.sort ? { sort: latest.current.sort } : {}),
      ...(latest.current.version ? { version: latest.current.version } : {}),
    });
    const onEvent = (event: StromEvent<T>) => {
      setRecords((previous) => applyLiveEvent(previous, event, rules()));
      latest.current.onEvent?.(event);
    };
    const onReset = (info: ResetInfo) => latest.current.onReset?.(info);
    const onError = (error: Error) => latest.current.onError?.(error);
    if (withLoad) {
      return subscribeAndLoad<T>(client, collection, {
        filter: filterRef.current ?? null,
        recordId,
        ...rules(),
        load: () => (latest.current.load ?? current.load!)(),
        onLoaded: setRecords,
        onEvent,
        onReset,
        onError,
      });
    }
    return client.subscribe<T>(collection, { filter: filterRef.current ?? null, recordId, since, onEvent, onReset, onError });
    // filterKey stands for filter; the callbacks are read through `latest`.
  }, [client, collection, filterKey, recordId, since, withLoad]);

  return records;
}

const EMPTY: readonly never[] = [];

/**
 * Who is online: everyone connected (`channel` null) or everyone subscribed
 * to a collection. Starts from a snapshot (`GET /api/v1/presence`), follows
 * joins and leaves, and takes a fresh snapshot after each reconnect (presence
 * events are not replayed). Inside a `RealtimeProvider` the client may be
 * left out: `usePresence('posts')`.
 */
export function usePresence(channel: string | null): PresenceUser[];
export function usePresence(client: StromClient | null | undefined, channel: string | null): PresenceUser[];
export function usePresence(...args: unknown[]): PresenceUser[] {
  const withClient = args.length >= 2 || isClient(args[0]);
  const clientArg = withClient ? (args[0] as StromClient | null | undefined) : null;
  const channel = ((withClient ? args[1] : args[0]) as string | null | undefined) ?? null;
  const client = useClient(clientArg, 'usePresence');
  const [users, setUsers] = useState<PresenceUser[]>([]);
  useEffect(() => followPresence(client, channel, setUsers), [client, channel]);
  return users;
}

export { applyLiveEvent };
export type { CacheStrategy };
