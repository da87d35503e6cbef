import type { BackoffOptions } from './types.js';

export const DEFAULT_BACKOFF_BASE_MS = 500;
export const DEFAULT_BACKOFF_MAX_MS = 30_000;

/**
 * Exponential backoff with full jitter: the delay before retry number
 * `attempt` (0 for the first) is uniform in `[0, min(max, base * 2^attempt)]`.
 * Full jitter spreads a crowd of clients that lost the same server over the
 * whole window instead of having them return in waves.
 */
export class Backoff {
  readonly baseMs: number;
  readonly maxMs: number;
  private attempt = 0;

  constructor(options: BackoffOptions = {}, private readonly random: () => number = Math.random) {
    const base = options.baseMs ?? DEFAULT_BACKOFF_BASE_MS;
    const max = options.maxMs ?? DEFAULT_BACKOFF_MAX_MS;
    if (!(Number.isFinite(base) && base >= 0)) throw new RangeError(`backoff.baseMs must be >= 0, got ${base}`);
    if (!(Number.isFinite(max) && max >= base)) throw new RangeError(`backoff.maxMs must be >= baseMs, got ${max}`);
    this.baseMs = base;
    this.maxMs = max;
  }

  /** The upper bound of the delay for retry number `attempt`. */
  ceiling(attempt: number): number {
    // 2^attempt overflows to Infinity for large attempts; min() handles it.
    return Math.min(this.maxMs, this.baseMs * 2 ** attempt);
  }

  /** The delay before the next retry; each call counts one more attempt. */
  next(): number {
    const ceiling = this.ceiling(this.attempt);
    this.attempt += 1;
    // random() is in [0, 1), so this is an integer in [0, ceiling].
    return Math.min(ceiling, Math.floor(this.random() * (ceiling + 1)));
  }

  /** How many retries were counted since the last reset. */
  get attempts(): number {
    return this.attempt;
  }

  /** Call once a connection has succeeded. */
  reset(): void {
    this.attempt = 0;
  }
}
