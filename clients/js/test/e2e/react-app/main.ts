// A React app as an application would write it: React Query reads the orders
// from the app's API, RealtimeProvider keeps that cache current through a
// cache strategy, useLiveQuery keeps a second list with a race-free load,
// and a chat panel uses the context's subscribe and send. The e2e test
// bundles it with Vite (strom-client resolved to dist/ through the
// package's "exports") and drives it in headless Chromium.

import { QueryClient, QueryClientProvider, useQuery } from '@tanstack/react-query';
import { createElement as h, useEffect, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { type JsonObject, StromClient } from 'strom-client';
import { RealtimeProvider, useLiveQuery, useRealtimeContext } from 'strom-client/react';
import type { CacheStrategy } from 'strom-client/tanstack';

interface Order extends JsonObject {
  id: string;
  title: string;
  v: number;
}

const params = new URLSearchParams(location.search);
const collection = params.get('collection') ?? 'orders';
const room = `chat.${collection}`;
const client = new StromClient({
  url: params.get('strom') ?? location.origin,
  transport: 'websocket',
  backoff: { baseMs: 100, maxMs: 1000 },
  autoConnect: false,
});
const queryClient = new QueryClient({ defaultOptions: { queries: { retry: false, staleTime: Infinity } } });
const strategies: CacheStrategy[] = [{ collection, queryKey: ['orders'], filter: { open: true }, version: 'v' }];

const fetchOrders = async (): Promise<Order[]> => (await fetch('/api/orders')).json() as Promise<Order[]>;

function OrderList({ id, orders }: { id: string; orders: readonly Order[] }) {
  return h('ul', { id }, orders.map((o) => h('li', { key: o.id, 'data-id': o.id }, `${o.id}: ${o.title} (v${o.v})`)));
}

/** React Query owns this list; the provider's cache strategy keeps it current. */
function QueryOrders() {
  const { data = [] } = useQuery({ queryKey: ['orders'], queryFn: fetchOrders });
  return h(OrderList, { id: 'query', orders: data });
}

/** The same list through useLiveQuery with a load (no React Query). */
function LiveOrders() {
  const orders = useLiveQuery<Order>(collection, { open: true }, [], { load: fetchOrders, version: 'v' });
  return h(OrderList, { id: 'live', orders });
}

function Chat() {
  const { subscribe, send } = useRealtimeContext();
  const [messages, setMessages] = useState<string[]>([]);
  useEffect(() => subscribe(room, (event) => setMessages((list) => [...list, String(event.data.text)])), [subscribe]);
  return h('div', null,
    h('button', { id: 'send', onClick: () => void send(room, { text: 'hello from the page' }) }, 'Send'),
    h('ul', { id: 'chat' }, messages.map((text, i) => h('li', { key: i }, text))));
}

function App() {
  const { connectionState, enabled, setEnabled } = useRealtimeContext();
  return h('div', null,
    h('h1', null, 'Orders, live from strom through React Query'),
    h('div', { className: 'bar' },
      h('span', { id: 'state', className: 'state', 'data-state': connectionState }, connectionState),
      h('button', { id: 'toggle', onClick: () => setEnabled(!enabled) }, enabled ? 'Go offline' : 'Go online')),
    h('div', { className: 'columns' },
      h('div', null, h('h2', null, 'useQuery + cache strategy'), h(QueryOrders)),
      h('div', null, h('h2', null, 'useLiveQuery + load'), h(LiveOrders)),
      h('div', null, h('h2', null, 'Channel'), h(Chat))));
}

createRoot(document.getElementById('root')!).render(
  h(QueryClientProvider, { client: queryClient },
    h(RealtimeProvider, { client, queryClient, cacheStrategies: strategies }, h(App))),
);
