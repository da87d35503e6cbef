/** One dispatched Server-Sent Event. */
export interface SseMessage {
  /** `event:` (default `message`). */
  event: string;
  data: string;
  /** `id:` of this message, or null when it had none. */
  id: string | null;
}

/**
 * An incremental parser of the `text/event-stream` format (the WHATWG
 * rules): feed it decoded text in chunks of any size, it calls `onMessage`
 * for each complete event. Comment lines (`: keep-alive`) are skipped.
 */
export class SseParser {
  private buffer = '';
  private event = '';
  private data: string[] = [];
  private id: string | null = null;
  private sawCarriageReturn = false;

  constructor(private readonly onMessage: (message: SseMessage) => void) {}

  feed(chunk: string): void {
    let text = chunk;
    // A CRLF split across chunks: drop the LF that follows a CR we ended on.
    if (this.sawCarriageReturn && text.startsWith('\n')) text = text.slice(1);
    this.sawCarriageReturn = false;
    this.buffer += text;
    let start = 0;
    for (;;) {
      const match = /\r\n|\r|\n/g;
      match.lastIndex = start;
      const found = match.exec(this.buffer);
      if (!found) break;
      // A lone CR at the very end may be the first half of a CRLF.
      if (found[0] === '\r' && found.index === this.buffer.length - 1) {
        this.sawCarriageReturn = true;
      }
      this.line(this.buffer.slice(start, found.index));
      start = found.index + found[0].length;
    }
    this.buffer = this.buffer.slice(start);
  }

  private line(line: string): void {
    if (line === '') {
      this.dispatch();
      return;
    }
    if (line.startsWith(':')) return;
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    switch (field) {
      case 'event':
        this.event = value;
        break;
      case 'data':
        this.data.push(value);
        break;
      case 'id':
        if (!value.includes('\0')) this.id = value;
        break;
      default:
        // `retry` and unknown fields: nothing to do for this client.
        break;
    }
  }

  private dispatch(): void {
    const hadData = this.data.length > 0;
    const message: SseMessage = { event: this.event || 'message', data: this.data.join('\n'), id: this.id };
    this.event = '';
    this.data = [];
    this.id = null;
    if (hadData) this.onMessage(message);
  }
}
