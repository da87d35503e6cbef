import type { JsonObject, StromEvent } from './types.js';

export interface LiveQueryOptions<T> {
  /** The field identifying a record (default `'id'`); the event's `record_id` when the data lacks it. */
  key?: string;
  /** Keep the list sorted with this comparison (default: insertion order). */
  sort?: (a: T, b: T) => number;
}

function identity(record: unknown, key: string): string | null {
  if (record && typeof record === 'object') {
    const value = (record as JsonObject)[key];
    if (value !== undefined && value !== null) return String(value);
  }
  return null;
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
 */
export function applyLiveEvent<T extends JsonObject>(records: readonly T[], event: StromEvent, options: LiveQueryOptions<T> = {}): T[] {
  const key = options.key ?? 'id';
  const id = identity(event.data, key) ?? (event.record_id ? String(event.record_id) : null);
  if (id === null) return records as T[];
  const index = records.findIndex((record) => identity(record, key) === id);
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
