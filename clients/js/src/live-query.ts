import type { JsonObject, ResetInfo, StromEvent } from './types.js';

export interface LiveQueryOptions<T> {
  /** The field identifying a record (default `'id'`); the event's `record_id` when the data lacks it. */
  key?: string;
  /** Keep the list sorted with this comparison (default: insertion order). */
  sort?: (a: T, b: T) => number;
  /**
   * A field that grows with every change of a record: a version number or an
   * `updated_at` timestamp. When set, an event never replaces or removes a
   * record whose version is newer than the event's, so an event that is
   * older than the loaded rows (one held while they loaded, or one that lags
   * the database) cannot undo them.
   */
  version?: string;
}

/** The options of `useLiveQuery`, the same for React and Vue. */
export interface UseLiveQueryOptions<T extends JsonObject = JsonObject> extends LiveQueryOptions<T> {
  /** Only this record's events. */
  recordId?: string | null;
  /**
   * The seq the initial records correspond to: events after it are replayed,
   * so nothing published between loading them and subscribing is missed.
   * (Not used with `load`, which needs no seq.)
   */
  since?: number | null;
  /**
   * Loads the records race-free: called once the subscription is live, while
   * events are held; the held events are then applied on top of its result.
   * Called again after a reset. The list shows the initial records until then.
   */
  load?: () => Promise<readonly T[]> | readonly T[];
  /**
   * The server no longer has every event after the resume position: the
   * list may be incomplete. With `load`, it is reloaded after this; without,
   * reload it yourself or keep it as it is (the default).
   */
  onReset?: (info: ResetInfo) => void;
  /** A refused subscription, or a failed `load`. */
  onError?: (error: Error) => void;
  /** Called with every live event after it was applied. */
  onEvent?: (event: StromEvent<T>) => void;
}

/** The value of `record[key]` as a string, or null when there is none. */
export function recordKey(record: unknown, key: string): string | null {
  if (record && typeof record === 'object') {
    const value = (record as JsonObject)[key];
    if (value !== undefined && value !== null) return String(value);
  }
  return null;
}

/** The id of the record an event is about: `data[key]`, else `record_id`. */
export function eventKey(event: StromEvent, key: string): string | null {
  return recordKey(event.data, key) ?? (event.record_id ? String(event.record_id) : null);
}

/** Numbers and numeric strings compare as numbers, dates (to the ms) as times. */
function versionValue(value: unknown): number | string | null {
  if (typeof value === 'number') return Number.isNaN(value) ? null : value;
  if (typeof value === 'bigint') return Number(value);
  if (typeof value !== 'string' || value === '') return null;
  if (/^\s*-?\d+(\.\d+)?\s*$/.test(value)) return Number(value);
  const time = Date.parse(value);
  return Number.isNaN(time) ? value : time;
}

/**
 * Compares two versions: positive when `a` is newer, negative when `b` is,
 * 0 when they are equal or cannot be compared (missing, or of different kinds).
 */
export function compareVersions(a: unknown, b: unknown): number {
  const x = versionValue(a);
  const y = versionValue(b);
  if (x === null || y === null || typeof x !== typeof y) return 0;
  return x < y ? -1 : x > y ? 1 : 0;
}

/**
 * Is `current` newer than what the event carries? The event's version is
 * read from `incoming` (its data, possibly transformed); for a delete, from
 * `old_data` first (the version that was deleted).
 */
export function isNewerThanEvent(current: unknown, event: StromEvent, field: string, incoming: unknown = event.data): boolean {
  const mine = (current as JsonObject | null)?.[field];
  const theirs = event.type === 'record.deleted'
    ? (event.old_data?.[field] ?? (incoming as JsonObject | null)?.[field])
    : (incoming as JsonObject | null)?.[field];
  return compareVersions(mine, theirs) > 0;
}

/**
 * Applies one event to the records of a live query and returns the new list
 * (the same array when nothing changed, so React can skip a render):
 *
 * - `record.created`: added (replaces a record with the same key);
 * - `record.updated`: replaced, or added when the record entered the filter;
 * - `record.updated` with `left_filter: true`: removed (it left the query);
 * - `record.deleted`: removed;
 * - anything else: no change.
 *
 * With `version`, an event older than the record in the list changes nothing.
 */
export function applyLiveEvent<T extends JsonObject>(records: readonly T[], event: StromEvent, options: LiveQueryOptions<T> = {}): T[] {
  const key = options.key ?? 'id';
  const id = eventKey(event, key);
  if (id === null) return records as T[];
  const index = records.findIndex((record) => recordKey(record, key) === id);
  if (index !== -1 && options.version && isNewerThanEvent(records[index], event, options.version)) {
    return records as T[];
  }
  let next: T[];
  switch (event.type) {
    case 'record.created':
    case 'record.updated': {
      if (event.left_filter === true) {
        if (index === -1) return records as T[];
        next = records.filter((_, i) => i !== index);
        break;
      }
      const record = event.data as T;
      next = records.slice();
      if (index === -1) next.push(record);
      else next[index] = record;
      break;
    }
    case 'record.deleted':
      if (index === -1) return records as T[];
      next = records.filter((_, i) => i !== index);
      break;
    default:
      return records as T[];
  }
  if (options.sort) next.sort(options.sort);
  return next;
}

/** Applies events in order (see `applyLiveEvent`). */
export function applyLiveEvents<T extends JsonObject>(records: readonly T[], events: readonly StromEvent[], options: LiveQueryOptions<T> = {}): T[] {
  let next = records as T[];
  for (const event of events) next = applyLiveEvent(next, event, options);
  return next;
}
