import { describe, expect, test } from 'vitest';

import { SseParser, type SseMessage, filterToText, presenceFilter, quoteFilterString, shorthandToText } from '../../src/index.js';
import { stableStringify } from '../../src/filter.js';

describe('filters', () => {
  test('the object shorthand in the text form, with the server meaning', () => {
    expect(shorthandToText({ published: true, author: { name: 'ann' }, tag: ['a', 'b'] }))
      .toBe('published = true && author.name = "ann" && tag in ("a", "b")');
    expect(shorthandToText({ price: 10.5, deleted_at: null, n: -3 })).toBe('price = 10.5 && deleted_at = null && n = -3');
    expect(shorthandToText({})).toBe('');
  });

  test('string literals are escaped', () => {
    expect(quoteFilterString('say "hi"\\ \n\t')).toBe('"say \\"hi\\"\\\\ \\n\\t"');
  });

  test('what the text form cannot express is refused', () => {
    expect(() => shorthandToText({ 'a b': 1 })).toThrow(/cannot be written/);
    expect(() => shorthandToText({ a: [{ nested: 1 }] })).toThrow(/string, number, boolean or null/);
    expect(() => shorthandToText({ a: Number.NaN })).toThrow(/finite/);
  });

  test('filterToText', () => {
    expect(filterToText(null)).toBe('');
    expect(filterToText('  price > 1 ')).toBe('price > 1');
    expect(filterToText({ a: 'x' })).toBe('a = "x"');
  });

  test('presence filters', () => {
    expect(presenceFilter(null)).toBe('channel = null');
    expect(presenceFilter('posts')).toBe('channel = "posts"');
  });

  test('stableStringify ignores key order', () => {
    expect(stableStringify({ b: 1, a: { d: [1, { y: 1, x: 2 }], c: null } }))
      .toBe(stableStringify({ a: { c: null, d: [1, { x: 2, y: 1 }] }, b: 1 }));
  });
});

describe('SseParser', () => {
  function parse(chunks: string[]): SseMessage[] {
    const out: SseMessage[] = [];
    const parser = new SseParser((m) => out.push(m));
    for (const chunk of chunks) parser.feed(chunk);
    return out;
  }

  const stream = 'event: connected\ndata: {"connection_id":"x"}\n\n'
    + ': keep-alive\n\n'
    + 'id: 42\nevent: record.created\ndata: {"seq":42}\n\n'
    + 'event: user.joined\ndata: {"seq":0}\n\n';

  const expected: SseMessage[] = [
    { event: 'connected', data: '{"connection_id":"x"}', id: null },
    { event: 'record.created', data: '{"seq":42}', id: '42' },
    { event: 'user.joined', data: '{"seq":0}', id: null },
  ];

  test('whole stream', () => {
    expect(parse([stream])).toEqual(expected);
  });

  test('any chunking gives the same messages', () => {
    for (let size = 1; size <= 7; size += 1) {
      const chunks: string[] = [];
      for (let i = 0; i < stream.length; i += size) chunks.push(stream.slice(i, i + size));
      expect(parse(chunks)).toEqual(expected);
    }
  });

  test('CRLF and CR line endings, also split between chunks', () => {
    const crlf = stream.replace(/\n/g, '\r\n');
    expect(parse([crlf])).toEqual(expected);
    const chunks: string[] = [];
    for (let i = 0; i < crlf.length; i += 3) chunks.push(crlf.slice(i, i + 3));
    expect(parse(chunks)).toEqual(expected);
    expect(parse([stream.replace(/\n/g, '\r')])).toEqual(expected);
  });

  test('multi-line data, a field without a space, an incomplete last event', () => {
    expect(parse(['data:one\ndata: two\n\nevent: x\ndata: never'])).toEqual([{ event: 'message', data: 'one\ntwo', id: null }]);
  });
});
