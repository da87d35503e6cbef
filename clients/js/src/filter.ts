import type { Filter, JsonObject } from './types.js';

/** Characters strom's filter language allows in a bare word (a field path). */
const WORD = /^[\p{L}\p{N}_\-.@:/+$]+$/u;

/** A string literal of strom's text filter language. */
export function quoteFilterString(value: string): string {
  const escaped = value
    .replace(/\\/g, '\\\\')
    .replace(/"/g, '\\"')
    .replace(/\n/g, '\\n')
    .replace(/\t/g, '\\t');
  return `"${escaped}"`;
}

function literal(value: unknown, path: string): string {
  if (value === null) return 'null';
  if (typeof value === 'boolean') return String(value);
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) throw new TypeError(`filter value for ${path} is not a finite number`);
    return String(value);
  }
  if (typeof value === 'string') return quoteFilterString(value);
  throw new TypeError(`filter value for ${path} must be a string, number, boolean or null`);
}

/**
 * The text form of the object shorthand, with the server's meaning:
 * `{published: true, author: {name: 'ann'}, tag: ['a', 'b']}` is
 * `published = true && author.name = "ann" && tag in ("a", "b")`.
 * An empty object is no filter (`''`). SSE takes only the text form.
 */
export function shorthandToText(filter: JsonObject): string {
  const conditions: string[] = [];
  const walk = (object: JsonObject, prefix: string) => {
    for (const [key, value] of Object.entries(object)) {
      const path = prefix ? `${prefix}.${key}` : key;
      if (!WORD.test(path)) throw new TypeError(`filter field ${JSON.stringify(path)} cannot be written in the text form`);
      if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
        walk(value as JsonObject, path);
      } else if (Array.isArray(value)) {
        conditions.push(`${path} in (${value.map((item) => literal(item, path)).join(', ')})`);
      } else {
        conditions.push(`${path} = ${literal(value, path)}`);
      }
    }
  };
  walk(filter, '');
  return conditions.join(' && ');
}

/** The text form of any filter (`''` for none). */
export function filterToText(filter: Filter | null | undefined): string {
  if (filter == null) return '';
  return typeof filter === 'string' ? filter.trim() : shorthandToText(filter);
}

/** JSON with object keys sorted: equal filters give equal strings. */
export function stableStringify(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(stableStringify).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    const entries = Object.keys(value as JsonObject)
      .sort()
      .map((key) => `${JSON.stringify(key)}:${stableStringify((value as JsonObject)[key])}`);
    return `{${entries.join(',')}}`;
  }
  return JSON.stringify(value) ?? 'null';
}

/** A filter as the WebSocket `subscribe` action sends it: null for none. */
export function normalizeFilter(filter: Filter | null | undefined): Filter | null {
  if (filter == null) return null;
  if (typeof filter === 'string') return filter.trim() === '' ? null : filter;
  return filter;
}

/** The `presence` filter for a channel; `null` means "connected at all". */
export function presenceFilter(channel: string | null): string {
  return channel === null ? 'channel = null' : `channel = ${quoteFilterString(channel)}`;
}
