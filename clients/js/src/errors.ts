/** Error codes of strom's error map, plus the client's own. */
export type StromErrorCode =
  | 'invalid_argument'
  | 'unauthenticated'
  | 'permission_denied'
  | 'not_found'
  | 'resource_exhausted'
  | 'unavailable'
  | 'internal'
  // The client's own:
  | 'network'
  | 'protocol'
  | (string & {});

/** An error from the server (`{code, message}`) or from the client itself. */
export class StromError extends Error {
  readonly code: StromErrorCode;
  /** The HTTP status, for REST and SSE requests. */
  readonly status?: number;
  /** The WebSocket close code, when the error ended a connection. */
  readonly closeCode?: number;

  constructor(code: StromErrorCode, message: string, extra: { status?: number; closeCode?: number; cause?: unknown } = {}) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = 'StromError';
    this.code = code;
    if (extra.status !== undefined) this.status = extra.status;
    if (extra.closeCode !== undefined) this.closeCode = extra.closeCode;
  }
}

/** The code strom uses for an HTTP status (its error map, reversed). */
export function codeForStatus(status: number): StromErrorCode {
  switch (status) {
    case 400: return 'invalid_argument';
    case 401: return 'unauthenticated';
    case 403: return 'permission_denied';
    case 404: return 'not_found';
    case 429: return 'resource_exhausted';
    case 503: return 'unavailable';
    default: return 'internal';
  }
}

/**
 * Reads an error body: REST answers `{"error": {"code", "message"}}`,
 * WebSocket and SSE error messages carry `{"code", "message"}`.
 */
export function errorFromBody(body: unknown, fallback: { status?: number; text?: string } = {}): StromError {
  const outer = body && typeof body === 'object' ? (body as Record<string, unknown>) : {};
  const inner = outer.error && typeof outer.error === 'object' ? (outer.error as Record<string, unknown>) : outer;
  const code = typeof inner.code === 'string' ? inner.code : fallback.status !== undefined ? codeForStatus(fallback.status) : 'internal';
  const message = typeof inner.message === 'string'
    ? inner.message
    : fallback.text || (fallback.status !== undefined ? `HTTP ${fallback.status}` : 'unknown error');
  return new StromError(code, message, fallback.status !== undefined ? { status: fallback.status } : {});
}
