import { describe, expect, test } from 'vitest';

import { Backoff, DEFAULT_BACKOFF_BASE_MS, DEFAULT_BACKOFF_MAX_MS } from '../../src/index.js';

describe('Backoff (exponential, full jitter)', () => {
  test('the ceiling doubles from base and stops at max', () => {
    const backoff = new Backoff({ baseMs: 100, maxMs: 1_000 });
    expect([0, 1, 2, 3, 4, 5, 6].map((n) => backoff.ceiling(n))).toEqual([100, 200, 400, 800, 1_000, 1_000, 1_000]);
    expect(backoff.ceiling(5_000)).toBe(1_000); // 2^5000 is Infinity: still capped
  });

  test('defaults', () => {
    const backoff = new Backoff();
    expect(backoff.baseMs).toBe(DEFAULT_BACKOFF_BASE_MS);
    expect(backoff.maxMs).toBe(DEFAULT_BACKOFF_MAX_MS);
  });

  test('each delay is an integer in [0, ceiling(attempt)]', () => {
    const backoff = new Backoff({ baseMs: 50, maxMs: 3_000 });
    for (let attempt = 0; attempt < 2_000; attempt += 1) {
      const ceiling = backoff.ceiling(backoff.attempts);
      const delay = backoff.next();
      expect(Number.isInteger(delay)).toBe(true);
      expect(delay).toBeGreaterThanOrEqual(0);
      expect(delay).toBeLessThanOrEqual(ceiling);
    }
  });

  test('the extremes of random() give 0 and the ceiling', () => {
    const low = new Backoff({ baseMs: 100, maxMs: 1_000 }, () => 0);
    expect([low.next(), low.next(), low.next()]).toEqual([0, 0, 0]);
    const high = new Backoff({ baseMs: 100, maxMs: 1_000 }, () => 0.999_999_999);
    expect([high.next(), high.next(), high.next(), high.next(), high.next(), high.next()]).toEqual([100, 200, 400, 800, 1_000, 1_000]);
  });

  test('full jitter spreads delays over the whole window, not just its upper half', () => {
    // Equal jitter would keep every delay >= ceiling/2; full jitter does not.
    const samples: number[] = [];
    for (let i = 0; i < 2_000; i += 1) {
      const backoff = new Backoff({ baseMs: 1_000, maxMs: 1_000 });
      samples.push(backoff.next());
    }
    expect(Math.min(...samples)).toBeLessThan(100);
    expect(Math.max(...samples)).toBeGreaterThan(900);
    const mean = samples.reduce((a, b) => a + b, 0) / samples.length;
    expect(mean).toBeGreaterThan(400);
    expect(mean).toBeLessThan(600);
  });

  test('reset starts over from base', () => {
    const backoff = new Backoff({ baseMs: 100, maxMs: 10_000 }, () => 0.999_999);
    backoff.next();
    backoff.next();
    backoff.next();
    expect(backoff.attempts).toBe(3);
    backoff.reset();
    expect(backoff.attempts).toBe(0);
    expect(backoff.next()).toBe(100);
  });

  test('bad options are refused', () => {
    expect(() => new Backoff({ baseMs: -1 })).toThrow(RangeError);
    expect(() => new Backoff({ baseMs: 100, maxMs: 50 })).toThrow(RangeError);
    expect(() => new Backoff({ baseMs: Number.NaN })).toThrow(RangeError);
  });
});
