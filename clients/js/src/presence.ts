// Who is online, kept current: shared by the React and Vue presence hooks.

import type { StromClient } from './client.js';
import type { PresenceEvent, PresenceUser } from './types.js';

/**
 * Follows who is online: everyone connected (`channel` null) or everyone
 * subscribed to a collection. Starts from a snapshot (`GET /api/v1/presence`),
 * applies joins and leaves, and takes a fresh snapshot after each reconnect
 * (presence events are not replayed). `onChange` gets the users once the
 * first snapshot is in, then after every change. Returns the function that
 * stops.
 */
export function followPresence(client: StromClient, channel: string | null, onChange: (users: PresenceUser[]) => void): () => void {
  let stopped = false;
  let known = new Map<string, PresenceUser>();
  // Events received while a snapshot is loading, applied on top of it.
  let buffered: PresenceEvent[] | null = null;

  const apply = (event: PresenceEvent) => {
    const data = event.data;
    if (!data || typeof data.user_id !== 'string') return;
    if (event.type === 'user.joined') {
      known.set(data.user_id, {
        user_id: data.user_id,
        user_name: data.user_name ?? null,
        connections: data.connections,
        last_seen: data.last_seen,
      });
    } else if (event.type === 'user.left') {
      known.delete(data.user_id);
    }
  };
  const show = () => {
    if (!stopped) onChange([...known.values()]);
  };
  const load = () => {
    const pending: PresenceEvent[] = [];
    buffered = pending;
    const finish = () => {
      for (const event of pending) apply(event);
      buffered = null;
      show();
    };
    client.getPresence(channel).then(
      (snapshot) => {
        if (stopped || buffered !== pending) return;
        known = new Map(snapshot.users.map((user) => [user.user_id, user]));
        finish();
      },
      () => {
        // No snapshot: go on from the events alone.
        if (buffered === pending) finish();
      },
    );
  };

  const stop = client.onPresence(
    channel,
    (event) => {
      if (buffered) {
        buffered.push(event);
        return;
      }
      apply(event);
      show();
    },
    { onSubscribed: load },
  );
  return () => {
    stopped = true;
    stop();
  };
}
