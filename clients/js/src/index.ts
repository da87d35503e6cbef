export { StromClient, jwtExpiry } from './client.js';
export { Backoff, DEFAULT_BACKOFF_BASE_MS, DEFAULT_BACKOFF_MAX_MS } from './backoff.js';
export { StromError, type StromErrorCode } from './errors.js';
export { applyLiveEvent, applyLiveEvents, compareVersions, type LiveQueryOptions } from './live-query.js';
export { subscribeAndLoad, type SubscribeAndLoadOptions } from './subscribe-and-load.js';
export { followPresence } from './presence.js';
export { filterToText, presenceFilter, quoteFilterString, shorthandToText } from './filter.js';
export { SseParser, type SseMessage } from './sse-parser.js';
export { CloseCode } from './ws-transport.js';
export {
  EVENT_TYPES,
  type BackoffOptions,
  type ConnectionState,
  type EventType,
  type Filter,
  type JsonObject,
  type PresenceData,
  type PresenceEvent,
  type PresenceSnapshot,
  type PresenceUser,
  type PublishEvent,
  type ResetInfo,
  type StromClientOptions,
  type StromEvent,
  type SubscribeOptions,
  type SubscribedInfo,
  type TokenSource,
  type TransportKind,
  type WebSocketFactory,
  type WebSocketLike,
} from './types.js';
