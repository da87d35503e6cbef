import { describe, expect, test } from 'vitest';

import { type EventType, type JsonObject, type StromEvent, applyLiveEvent, applyLiveEvents, compareVersions } from '../../src/index.js';

let seq = 0;
function event(type: EventType, data: JsonObject, extra: Partial<StromEvent> = {}): StromEvent {
  seq += 1;
  return {
    type,
    collection: 'posts',
    record_id: String(data.id ?? ''),
    data,
    old_data: null,
    timestamp: '2025-01-01T00:00:00Z',
    seq,
    ...extra,
  };
}

const a = { id: 'a', title: 'A' };
const b = { id: 'b', title: 'B' };

describe('applyLiveEvent', () => {
  test('created adds at the end', () => {
    expect(applyLiveEvent([a], event('record.created', b))).toEqual([a, b]);
  });

  test('created for a key already there replaces it (no duplicates)', () => {
    const a2 = { id: 'a', title: 'A again' };
    expect(applyLiveEvent([a, b], event('record.created', a2))).toEqual([a2, b]);
  });

  test('updated replaces in place', () => {
    const b2 = { id: 'b', title: 'B2' };
    expect(applyLiveEvent([a, b], event('record.updated', b2, { old_data: b }))).toEqual([a, b2]);
  });

  test('updated for an unknown record adds it (it entered the filter)', () => {
    expect(applyLiveEvent([a], event('record.updated', b))).toEqual([a, b]);
  });

  test('left_filter removes the record', () => {
    const b2 = { id: 'b', title: 'B', published: false };
    expect(applyLiveEvent([a, b], event('record.updated', b2, { old_data: b, left_filter: true }))).toEqual([a]);
  });

  test('left_filter for a record not in the list changes nothing', () => {
    const list = [a];
    expect(applyLiveEvent(list, event('record.updated', b, { left_filter: true }))).toBe(list);
  });

  test('deleted removes; unknown deletes change nothing', () => {
    expect(applyLiveEvent([a, b], event('record.deleted', a))).toEqual([b]);
    const list = [b];
    expect(applyLiveEvent(list, event('record.deleted', { id: 'zzz' }))).toBe(list);
  });

  test('deleted with empty data uses record_id', () => {
    expect(applyLiveEvent([a, b], event('record.deleted', {}, { record_id: 'a' }))).toEqual([b]);
  });

  test('other event types leave the same array', () => {
    const list = [a, b];
    for (const type of ['collection.created', 'collection.updated', 'collection.deleted', 'user.joined', 'user.left'] as const) {
      expect(applyLiveEvent(list, event(type, { id: 'a' }))).toBe(list);
    }
  });

  test('a custom key', () => {
    const x = { slug: 'x', n: 1 };
    const x2 = { slug: 'x', n: 2 };
    expect(applyLiveEvent([x], event('record.updated', x2, { record_id: 'ignored' }), { key: 'slug' })).toEqual([x2]);
  });

  test('numbers and strings as keys compare equal', () => {
    expect(applyLiveEvent([{ id: 7, v: 1 }], event('record.updated', { id: '7', v: 2 }))).toEqual([{ id: '7', v: 2 }]);
  });

  test('sort keeps the list ordered', () => {
    const byTitle = (x: JsonObject, y: JsonObject) => String(x.title).localeCompare(String(y.title));
    expect(applyLiveEvent([b], event('record.created', a), { sort: byTitle })).toEqual([a, b]);
  });

  test('never mutates its input', () => {
    const list = [a, b];
    const frozen = Object.freeze(list.slice());
    applyLiveEvent(frozen, event('record.created', { id: 'c' }));
    applyLiveEvent(frozen, event('record.updated', { id: 'a', title: 'x' }));
    applyLiveEvent(frozen, event('record.deleted', b));
    expect(frozen).toEqual(list);
  });
});

describe('applyLiveEvent with a version field', () => {
  const v = { version: 'v' };

  test('an update older than the record in the list changes nothing', () => {
    const list = [{ id: 'a', v: 3, title: 'new' }];
    expect(applyLiveEvent(list, event('record.updated', { id: 'a', v: 2, title: 'old' }), v)).toBe(list);
  });

  test('an update as new or newer applies', () => {
    const list = [{ id: 'a', v: 3, title: 'x' }];
    expect(applyLiveEvent(list, event('record.updated', { id: 'a', v: 3, title: 'same' }), v)).toEqual([{ id: 'a', v: 3, title: 'same' }]);
    expect(applyLiveEvent(list, event('record.updated', { id: 'a', v: 4, title: 'newer' }), v)).toEqual([{ id: 'a', v: 4, title: 'newer' }]);
  });

  test('a delete of an older version, or leaving the filter at one, keeps a newer record', () => {
    const list = [{ id: 'a', v: 5 }];
    expect(applyLiveEvent(list, event('record.deleted', { id: 'a' }, { old_data: { id: 'a', v: 4 } }), v)).toBe(list);
    expect(applyLiveEvent(list, event('record.deleted', { id: 'a', v: 4 }), v)).toBe(list);
    expect(applyLiveEvent(list, event('record.updated', { id: 'a', v: 4 }, { left_filter: true }), v)).toBe(list);
    expect(applyLiveEvent(list, event('record.deleted', { id: 'a' }, { old_data: { id: 'a', v: 5 } }), v)).toEqual([]);
  });

  test('events without a version, and records without one, always apply', () => {
    expect(applyLiveEvent([{ id: 'a', v: 9 }], event('record.updated', { id: 'a', title: 't' }), v)).toEqual([{ id: 'a', title: 't' }]);
    expect(applyLiveEvent([{ id: 'a' }], event('record.updated', { id: 'a', v: 1 }), v)).toEqual([{ id: 'a', v: 1 }]);
  });

  test('updated_at timestamps compare as times, numeric strings as numbers', () => {
    const at = { version: 'updated_at' };
    const list = [{ id: 'a', updated_at: '2025-01-01T10:00:00.500Z' }];
    expect(applyLiveEvent(list, event('record.updated', { id: 'a', updated_at: '2025-01-01T11:00:00+01:00' }), at)).toBe(list);
    expect(applyLiveEvent(list, event('record.updated', { id: 'a', updated_at: '2025-01-01T10:00:01Z' }), at)).toHaveLength(1);
    expect(compareVersions('10', '9')).toBeGreaterThan(0);
    expect(compareVersions(10, '9')).toBeGreaterThan(0);
    expect(compareVersions('b', 'a')).toBeGreaterThan(0);
    expect(compareVersions('2025-01-02', 'draft')).toBe(0); // a time and a word: not comparable
    expect(compareVersions(undefined, 1)).toBe(0);
  });

  test('applyLiveEvents applies in order', () => {
    const events = [
      event('record.created', { id: 'x', v: 1 }),
      event('record.updated', { id: 'x', v: 2 }),
      event('record.deleted', { id: 'y' }),
    ];
    expect(applyLiveEvents([{ id: 'y', v: 1 }], events, v)).toEqual([{ id: 'x', v: 2 }]);
  });
});
