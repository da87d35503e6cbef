// React hooks for strom-client. React is an optional peer dependency: only
// this entry point (`strom-client/react`) imports it.

// The default import works both in bundlers and in Node's ESM loader (React
// is published as CommonJS).
import React from 'react';

import type { StromClient } from './client.js';
import { stableStringify } from './filter.js';
import { applyLiveEvent } from './live-query.js';
import type {
  ConnectionState, Filter, JsonObject, PresenceEvent, PresenceUser, ResetInfo, StromEvent,
} from './types.js';

const { useEffect, useRef, useState, useSyncExternalStore } = React;

/** The client's connection state; re-renders when it changes. */
export function useRealtime(client: StromClient): ConnectionState {
  return useSyncExternalStore(
    (notify) => client.onStateChange(notify),
    () => client.state,
    () => client.state,
  );
}

export interface UseLiveQueryOptions<T extends JsonObject = JsonObject> {
  /** The field identifying a record (default `'id'`). */
  key?: string;
  /** Only this record's events. */
  recordId?: string | null;
  /**
   * The seq the initial records correspond to: events after it are replayed,
   * so nothing published between loading them and subscribing is missed.
   */
  since?: number | null;
  /** Keep the list sorted. */
  sort?: (a: T, b: T) => number;
  /**
   * The server no longer has every event after the resume position: the
   * list may be incomplete. Reload it (and pass new `initialRecords`);
   * by default the list is kept as it is.
   */
  onReset?: (info: ResetInfo) => void;
  onError?: (error: Error) => void;
  /** Called with every event after it was applied. */
  onEvent?: (event: StromEvent<T>) => void;
}

/**
 * Keeps a list of records in sync with a collection: created records are
 * added, updated ones replaced (or added when they enter the filter), deleted
 * ones and those that leave the filter removed.
 *
 * `initialRecords` is the list to start from (e.g. loaded over your API). It
 * is compared by reference: the list is reset to it when it changes, so pass
 * a stable array (state, memo or a constant), not a new literal each render
 * (an empty array literal is fine). `filter` may be a new object each render:
 * it is compared by value.
 */
export function useLiveQuery<T extends JsonObject = JsonObject>(
  client: StromClient,
  collection: string,
  filter: Filter | null | undefined,
  initialRecords: readonly T[],
  options: UseLiveQueryOptions<T> = {},
): T[] {
  const filterKey = filter == null ? '' : typeof filter === 'string' ? filter : stableStringify(filter);
  const recordId = options.recordId ?? null;
  const since = options.since ?? null;
  const queryKey = `${collection}\u0000${filterKey}\u0000${recordId ?? ''}`;

  const [records, setRecords] = useState<T[]>(() => initialRecords.slice());
  // Reset the list when the initial records or the query change (during
  // render, React's pattern for state derived from props).
  const [source, setSource] = useState({ initialRecords, queryKey });
  const sameInitial = source.initialRecords === initialRecords
    || (source.initialRecords.length === 0 && initialRecords.length === 0);
  if (!sameInitial || source.queryKey !== queryKey) {
    setSource({ initialRecords, queryKey });
    setRecords(initialRecords.slice());
  }

  const latest = useRef(options);
  latest.current = options;
  const filterRef = useRef(filter);
  filterRef.current = filter;

  useEffect(() => {
    return client.subscribe<T>(collection, {
      filter: filterRef.current ?? null,
      recordId,
      since,
      onEvent: (event) => {
        const { key, sort, onEvent } = latest.current;
        setRecords((previous) => applyLiveEvent(previous, event, { key: key ?? 'id', ...(sort ? { sort } : {}) }));
        onEvent?.(event);
      },
      onReset: (info) => latest.current.onReset?.(info),
      onError: (error) => latest.current.onError?.(error),
    });
    // filterKey stands for filter; the callbacks are read through `latest`.
  }, [client, collection, filterKey, recordId, since]);

  return records;
}

/**
 * Who is online: everyone connected (`channel` null) or everyone subscribed
 * to a collection. Starts from a snapshot (`GET /api/v1/presence`), follows
 * joins and leaves, and takes a fresh snapshot after each reconnect (presence
 * events are not replayed).
 */
export function usePresence(client: StromClient, channel: string | null): PresenceUser[] {
  const [users, setUsers] = useState<PresenceUser[]>([]);

  useEffect(() => {
    let cancelled = false;
    let known = new Map<string, PresenceUser>();
    // Events received while a snapshot is loading, applied on top of it.
    let buffered: PresenceEvent[] | null = null;

    const apply = (event: PresenceEvent) => {
      const data = event.data;
      if (!data || typeof data.user_id !== 'string') return;
      if (event.type === 'user.joined') {
        known.set(data.user_id, {
          user_id: data.user_id,
          user_name: data.user_name ?? null,
          connections: data.connections,
          last_seen: data.last_seen,
        });
      } else if (event.type === 'user.left') {
        known.delete(data.user_id);
      }
    };
    const show = () => {
      if (!cancelled) setUsers([...known.values()]);
    };
    const load = () => {
      const pending: PresenceEvent[] = [];
      buffered = pending;
      client.getPresence(channel).then(
        (snapshot) => {
          if (cancelled || buffered !== pending) return;
          known = new Map(snapshot.users.map((user) => [user.user_id, user]));
          for (const event of pending) apply(event);
          buffered = null;
          show();
        },
        () => {
          if (buffered !== pending) return;
          // No snapshot: go on from the events alone.
          for (const event of pending) apply(event);
          buffered = null;
          show();
        },
      );
    };

    const stop = client.onPresence(
      channel,
      (event) => {
        if (buffered) {
          buffered.push(event);
          return;
        }
        apply(event);
        show();
      },
      { onSubscribed: load },
    );
    return () => {
      cancelled = true;
      stop();
    };
  }, [client, channel]);

  return users;
}

export { applyLiveEvent };
