// A small realtime client that speaks strom's WebSocket protocol the way the
// FastCMS browser client ("Vanilla JavaScript" FastCMSRealtime class in the
// FastCMS realtime docs) does: same URL, same action frames, same ping/pong
// handling and the same event names emitted to listeners.
//
// Differences from the browser class, all on the client side only:
//   - it uses the `ws` package instead of the browser WebSocket;
//   - it never reconnects (a test wants a dropped connection to be visible);
//   - sending on a socket that is not open throws instead of doing nothing,
//     so a test fails at the faulty step rather than by a later timeout;
//   - `onMessage` lets a test see every parsed server message, in order.

import WebSocket from 'ws';

export const REALTIME_PATH = '/api/v1/ws/realtime';

export class FastCMSClient {
  /**
   * @param {string} baseUrl  e.g. "http://127.0.0.1:8000" (no trailing slash)
   * @param {string|null} token  JWT sent as `?token=` when given
   */
  constructor(baseUrl, token = null) {
    // Same rewrite as the browser client: the first "http" becomes "ws",
    // so http:// -> ws:// and https:// -> wss://.
    this.baseUrl = baseUrl.replace('http', 'ws');
    this.token = token;
    this.ws = null;
    this.listeners = new Map(); // event name -> [callback]
    this.messageHooks = [];     // callbacks that see every parsed message
  }

  /** The WebSocket URL, built exactly as the browser client builds it. */
  get url() {
    return this.token
      ? `${this.baseUrl}${REALTIME_PATH}?token=${this.token}`
      : `${this.baseUrl}${REALTIME_PATH}`;
  }

  connect() {
    const ws = new WebSocket(this.url);
    this.ws = ws;

    // Like the browser client, 'connected' is emitted once when the socket
    // opens (no data) and again when the server's `connected` message arrives.
    ws.on('open', () => this.emit('connected'));

    ws.on('message', (raw, isBinary) => {
      const message = JSON.parse(isBinary ? Buffer.from(raw).toString('utf8') : raw.toString());
      for (const hook of this.messageHooks) hook(message);

      // Heartbeat: answer and stop, as the browser client does.
      if (message.type === 'ping') {
        this.send({ action: 'pong' });
        return;
      }

      // Data change: per-collection and per-type notifications.
      if (message.type === 'event') {
        const { type, collection, data } = message.data;
        this.emit(`${collection}:${type}`, data);
        this.emit(type, { collection, data });
      }

      this.emit(message.type, message.data);
    });

    ws.on('close', (code, reason) => this.emit('disconnected', { code, reason: reason.toString() }));
    ws.on('error', (error) => this.emit('error', error));

    return this;
  }

  /** Resolves once the socket is open; rejects if it fails to open. */
  opened() {
    const ws = this.ws;
    if (!ws) return Promise.reject(new Error('connect() was not called'));
    if (ws.readyState === WebSocket.OPEN) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const onOpen = () => { ws.off('error', onError); resolve(); };
      const onError = (err) => { ws.off('open', onOpen); reject(err); };
      ws.once('open', onOpen);
      ws.once('error', onError);
    });
  }

  subscribe(collection, filter = null) {
    return this.send({ action: 'subscribe', collection, filter });
  }

  unsubscribe(collection) {
    return this.send({ action: 'unsubscribe', collection });
  }

  auth(token) {
    return this.send({ action: 'auth', token });
  }

  /** Sends one JSON text frame. */
  send(payload) {
    return this.sendRaw(JSON.stringify(payload));
  }

  /** Sends a text frame as is (used to send malformed input). */
  sendRaw(text) {
    if (this.ws?.readyState !== WebSocket.OPEN) {
      throw new Error(`cannot send, socket is not open: ${text}`);
    }
    this.ws.send(text);
    return this;
  }

  on(event, callback) {
    if (!this.listeners.has(event)) this.listeners.set(event, []);
    this.listeners.get(event).push(callback);
    return this;
  }

  off(event, callback) {
    const callbacks = this.listeners.get(event);
    const index = callbacks ? callbacks.indexOf(callback) : -1;
    if (index > -1) callbacks.splice(index, 1);
    return this;
  }

  emit(event, data) {
    for (const callback of [...(this.listeners.get(event) ?? [])]) callback(data);
  }

  /** Registers a callback for every parsed server message (pings included). */
  onMessage(callback) {
    this.messageHooks.push(callback);
    return this;
  }

  disconnect() {
    this.ws?.close();
  }
}
